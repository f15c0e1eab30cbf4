"""Reading images and annotations from disk, and pairing them by file name.

One rule for binary annotations in every reader: a pixel is foreground when its stored value is
nonzero, so 0/1, 0/255 and disc-and-cup (0/1/2) masks all read the same way.
"""
import re
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageOps, UnidentifiedImageError

from errors import UserError
from tasks.sample import Sample

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg", ".gif")


MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".gif")  # lossless only: JPEG smears class edges


TIFF_SUFFIXES = (".tif", ".tiff")



def upright(image):
    """A PIL image turned as its EXIF orientation says. A camera stores a portrait photograph's pixels sideways
    with a tag that says so, and viewers (and annotation tools) show it turned; masks drawn on it or predicted
    from it carry no such tag, so every reader turns the pixels, or a mask would lie rotated against its image."""
    return ImageOps.exif_transpose(image)


def read_image(path):
    """RGB uint8 array; an unreadable or truncated file is a UserError naming it."""
    try:
        with Image.open(path) as image:
            return np.array(upright(image).convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise UserError(f"cannot read image {path}: {error}. Replace the file with an intact copy.")


def read_mask(path):
    """A binary annotation or field-of-view mask as a bool array (nonzero = foreground)."""
    return read_binary_label(path).astype(bool)


def require_dir(path, what):
    if not Path(path).is_dir():
        # Most often --data-root names another dataset's folder, or one unpacked a level too deep or shallow.
        raise UserError(f"{what} folder {path} not found: is --data-root that dataset's folder, in the layout it is "
                        f"distributed in, and does --dataset name it? (docs/datasets.md)")
    return Path(path)


def check_same_size(image, other, image_path, other_path):
    if image.shape[:2] != other.shape[:2]:
        raise UserError(f"size mismatch: {image_path} is {image.shape[1]}x{image.shape[0]} but "
                        f"{other_path} is {other.shape[1]}x{other.shape[0]}")


def read_array(path):
    """The stored pixels at their own depth: TIFF through tifffile (16-bit, float, multi-page
    stacks), other formats through PIL (a palette file gives its indices, as class maps need)."""
    try:
        if Path(path).suffix.lower() in TIFF_SUFFIXES:
            return np.asarray(tifffile.imread(path))
        with Image.open(path) as image:
            return np.array(upright(image))
    except Exception as error:  # decoders raise many unrelated types for a damaged file
        raise UserError(f"cannot read {path}: {error}. Replace the file with an intact copy.")


def read_class_map(path):
    """An annotation as stored, (H, W) integers. A colour file counts a pixel by its strongest
    channel, so a red-on-black mask and a grey class map both keep their values."""
    array = read_array(path)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        array = array[..., :3].max(axis=-1)
    if array.ndim != 2:
        raise UserError(f"annotation {path} has shape {array.shape}; expected one 2-D label image")
    return array


def read_binary_label(path):
    """Foreground = any nonzero value, so 0/1, 0/255 and disc-and-cup (0/1/2) masks all work."""
    return (read_class_map(path) > 0).astype(np.uint8)


def check_class_range(label, path, dataset, num_classes):
    highest = int(label.max()) if label.size else 0
    if int(label.min()) < 0 or highest >= num_classes:
        value = highest if highest >= num_classes else int(label.min())
        raise UserError(f"label map {path} has value {value} but dataset {dataset} has {num_classes} "
                        f"classes (0..{num_classes - 1}); fix or replace the annotation")


def grey_to_rgb(grey):
    """The model always takes RGB; a grey scan is the same plane three times."""
    return np.repeat(grey[..., None], 3, axis=2)


def is_grey(rgb):
    """Whether an (H, W, 3) image is one grey plane three times (as grey_to_rgb makes it)."""
    return np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])


def window_to_uint8(array, low=0.5, high=99.5):
    """Deeper-than-8-bit data (16-bit or float CT) -> uint8 between its own `low` and `high`
    percentiles. Percentiles rather than min/max, so a few extreme pixels (metal, padding) do not
    squeeze the tissue into a handful of grey levels; per image, because the stored values of
    the slices need not be Hounsfield units. Where those percentiles meet (an image more than 99 %
    one value: sparse fluorescence, a padded scan) its minimum and maximum are used instead, or its few
    other pixels would vanish; non-finite values (NaN padding) count as the bottom; a constant image is black."""
    values = array.astype(np.float32)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(array.shape, np.uint8)
    known = values[finite]
    bottom, top = np.percentile(known, [low, high])
    if top <= bottom:
        bottom, top = known.min(), known.max()
    if top <= bottom:
        return np.zeros(array.shape, np.uint8)
    values = np.where(finite, values, bottom)
    return np.round((values.clip(bottom, top) - bottom) * (255 / (top - bottom))).astype(np.uint8)


def scan_to_rgb(array, path):
    """A grey scan of any depth -> (H, W, 3) uint8; 8-bit data is kept as stored."""
    if array.ndim == 3 and array.shape[-1] in (3, 4) and array.dtype == np.uint8:
        return np.ascontiguousarray(array[..., :3])
    if array.ndim != 2:
        raise UserError(f"{path} has shape {array.shape}; expected one 2-D grey image")
    if array.dtype != np.uint8:
        array = window_to_uint8(array)
    return grey_to_rgb(array)


def read_scan(path):
    return scan_to_rgb(read_array(path), path)


def natural_key(name):
    """Sort key that puts slice2 before slice10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def files_by_stem(folder, suffixes, recursive=False):
    """{stem: path} of the files in `folder` with one of `suffixes` (hidden files skipped)."""
    found = {}
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    for path in sorted(candidates):
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in suffixes:
            continue
        if path.stem in found:
            raise UserError(f"{found[path.stem]} and {path} have the same name {path.stem!r}; keep one of them")
        found[path.stem] = path
    return found


def image_files(folder, suffixes, recursive=False):
    found = files_by_stem(folder, suffixes, recursive)
    if not found:
        raise UserError(f"no images ({', '.join(suffixes)}) in {folder}")
    return found


def read_pairs(names, images, labels, label_dir, read_pixels, read_label, finish=None):
    """Samples for `names`, each an image file and the same-stem annotation in `label_dir`;
    `finish(image, label)` may crop the pair once both are read."""
    samples = []
    for name in names:
        if name not in labels:
            raise UserError(f"annotation for image {images[name]} missing: expected {label_dir / name}"
                            f" with one of {', '.join(MASK_SUFFIXES)}")
        image, label = read_pixels(images[name]), read_label(labels[name])
        check_same_size(image, label, images[name], labels[name])
        if finish is not None:
            image, label = finish(image, label)
        samples.append(Sample(name, image, label))
    return samples

