"""Any image file as the (H, W, 3) uint8 RGB pictures a model takes: one reader for training on your own
folders (tasks.folder) and for predict.py, so a model is shown a new image exactly as it was shown its
training images.

PNG, JPEG, TIFF, BMP, GIF and PPM/PGM. Grey is repeated over three channels, a palette is expanded,
transparency is composited over black (the colour of a fundus surround), an EXIF orientation is applied
(pixels as a viewer shows them), and 16-bit, 32-bit or float pixels are windowed between their own 0.5th and
99.5th percentiles (tasks.files.window_to_uint8), so a 12-bit scan is neither clipped to white nor left nearly
black. A multi-page TIFF gives one picture per page.
"""
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageSequence

from errors import UserError
from tasks.files import TIFF_SUFFIXES, grey_to_rgb, upright, window_to_uint8


class UnreadableImage(UserError):
    """A file that cannot be decoded (predict.py warns and goes on with the others)."""


def read_picture_pages(path):
    """[(H, W, 3) uint8 RGB], one per page (one for every format but a multi-page TIFF). Raises
    UnreadableImage for a file that cannot be decoded."""
    path = Path(path)
    try:
        arrays = read_tiff_pages(path) if path.suffix.lower() in TIFF_SUFFIXES else [read_with_pil(path)]
        images = [to_rgb8(array) for array in arrays]
    except UnreadableImage:
        raise
    except Exception as error:  # decoders raise many unrelated types for a damaged file
        raise UnreadableImage(f"cannot read {path}: {first_line(error)}")
    if not images:
        raise UnreadableImage(f"cannot read {path}: it holds no image")
    return images


def first_line(error):
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def read_tiff_pages(path):
    """Each full-resolution page of a TIFF at its stored depth. tifffile reads 16-bit colour, float and
    planar pages that PIL cannot; PIL reads the compressions tifffile needs the optional imagecodecs
    package for (DRIVE's LZW)."""
    try:
        with tifffile.TiffFile(path) as tiff:
            return [tiff_page_array(page) for page in tiff.pages if not page.is_reduced]
    except Exception:
        with Image.open(path) as image:
            return [pil_array(frame) for frame in ImageSequence.Iterator(image)]


def tiff_page_array(page):
    array = page.asarray()
    if page.planarconfig == 2 and array.ndim == 3:  # separate planes: (samples, H, W)
        array = np.moveaxis(array, 0, -1)
    return array


def read_with_pil(path):
    with Image.open(path) as image:
        if image.format == "PNG" and image.mode in ("RGB", "RGBA") and image.tile \
                and str(image.tile[0][3]).endswith(";16B"):  # grey 16-bit PNGs PIL reads whole (mode I;16)
            return read_deep_colour_png(path)
        return pil_array(upright(image))


def read_deep_colour_png(path):
    """A 16-bit colour PNG at full depth: PIL keeps only the high byte of each value, which leaves a 12-bit
    photograph nearly black; OpenCV reads all 16 bits (in BGR order)."""
    import cv2
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise UnreadableImage(f"cannot read {path}: OpenCV could not decode it")
    if array.ndim == 2:
        return array
    return array[..., [2, 1, 0, 3][:array.shape[-1]]]


def pil_array(image):
    """Pixels of a PIL image as an array: 8-bit modes as RGB or RGBA, deeper grey modes as stored."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return np.array(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        return np.array(image.convert("RGBA"))
    return np.array(image.convert("RGB"))


def to_rgb8(array):
    """(H, W), (H, W, 1..4+) of any dtype -> (H, W, 3) uint8 (see the module docstring)."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        return grey_to_rgb(deep_to_uint8(array))
    if array.ndim != 3 or array.shape[-1] < 2:
        raise UnreadableImage(f"pixel array of shape {array.shape} is not a 2-D grey or colour image")
    if array.shape[-1] == 2:  # grey and alpha
        array = np.concatenate([np.repeat(array[..., :1], 3, axis=2), array[..., 1:]], axis=2)
    colour = deep_to_uint8(array[..., :3])
    if array.shape[-1] == 3:
        return colour
    # Over black: a transparent surround becomes the dark background a fundus model expects.
    return np.round(colour * opacity(array[..., 3])[..., None]).astype(np.uint8)


def deep_to_uint8(array):
    """8-bit data as stored; bool as 0/255; deeper data windowed as the training readers window it
    (tasks.files.window_to_uint8), so a model sees a 16-bit or float image here as test.py shows it."""
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    return window_to_uint8(array)


def opacity(alpha):
    """An alpha channel as opacity in [0, 1]: integers over their type's whole range (16-bit: 65535 is
    opaque), floats as stored; never stretched, or an evenly opaque image would turn black."""
    if alpha.dtype == bool:
        return alpha.astype(np.float64)
    if np.issubdtype(alpha.dtype, np.integer):
        return alpha.clip(0, None) / np.iinfo(alpha.dtype).max
    return np.nan_to_num(alpha.astype(np.float64), nan=1.0).clip(0, 1)
