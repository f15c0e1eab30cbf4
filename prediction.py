"""Segmenting any images with a trained or released model: the work behind predict.py.

Inputs are image files and folders of them (PNG, JPEG, TIFF, BMP, GIF, PPM/PGM; not searched recursively: a
notice names the subfolders and other files a folder holds), read by tasks.pictures as the folder dataset
reads its training images: grey, palette, transparency, EXIF orientation, 16-bit and float pixels are all
handled there. A multi-page TIFF gives one image per page, named <stem>_p1, <stem>_p2, ...; every other image
is named by its file stem. A model trained on stacked slices (isbi2012_stack) sees each slice between its
neighbours, as in training: the pages of one multi-page TIFF form a stack, and so do consecutive single-image
inputs (a folder of slices, in natural order).

The model sees each image exactly as test.py shows a test image (inference.predict_samples, with the
checkpoint's preprocessing, input size or native resolution, and PATCH_SCALE), one image at a time, so
any size and aspect ratio works.

Field of view (--fov): for fundus models (tasks.fundus_datasets()) pixels outside the camera's
field of view are set to 0 in every output. `auto` (their default) estimates it with fov.estimate_fov;
a folder gives a mask per image, matched by stem (<stem>.png, <stem>_mask.gif, <stem>_fov.tif, ...;
nonzero = inside); `none` (the default of every other model) keeps the whole image.

Scale (--scale): 1 keeps each image's size. A number resizes the image by that factor before
prediction; `auto` (fundus models only) picks, per image, the factor that gives its field of view the
diameter of the model's training images (DRIVE: fov.DRIVE_FOV_DIAMETER, 540 px; CHASE_DB1: 915 px): a
3000-px-wide fundus photograph is shrunk and a small one enlarged, so vessels come out as wide as the
model knows them (the DRIVE model on CHASE_DB1's 999 x 960 images: 1.4 % of the FOV found as vessel at
scale 1, 5.2 % at auto, about 0.59). With --fov none, auto still measures the diameter on
fov.estimate_fov's mask. The probabilities are resized back to the native size (antialiased bilinear),
so every output has the input's size. For models that resize every image to IMAGE_SIZE (PATCH_SIZE 0)
the scale has no effect and is ignored with a notice.

Outputs under OUT, per image: <name>_prob.png (probability x 255), <name>_mask.png (0/255 at the
threshold; for an isbi2012 model the membrane map after --postprocess, as test.py scores it) and <name>_overlay.png (the predicted vessels drawn over the darkened image, the field of
view's edge outlined); a multi-class model writes <name>_classes.png (the class index of each pixel)
and a colour <name>_overlay.png instead. --save-float adds <name>_prob.tif, float32 probabilities
((K, H, W) for K classes). predictions.csv has a row per image, written as each image is done.
A file that cannot be decoded is reported in one warning line and skipped; the rest are written.
"""
import csv
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from scipy import ndimage

import data
import devices
import evaluation
import fov
import inference
import report
from errors import UserError
import tasks
from tasks.em_cells import between
from tasks.files import MASK_SUFFIXES, check_same_size, is_grey, natural_key, read_mask
from tasks.pictures import UnreadableImage, read_picture_pages
from tasks.sample import Sample

REPO = Path(__file__).resolve().parent
DEFAULT_CHECKPOINT = REPO / "weights" / "released" / "cenet_drive_cpu_clahe.pth"

INPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm", ".pnm")

# Endings a field-of-view mask may add to its image's stem (DRIVE: 01_test.tif -> 01_test_mask.gif).
MASK_ENDINGS = ("", "_mask", "_fov")

# --scale factors outside this range are almost surely a typo (and 10 x a photograph does not fit memory).
SCALE_RANGE = (0.1, 10.0)
UNIFORM_RANGE = 2   # grey levels: an image whose every channel spans no more is one colour (plus JPEG noise)

CSV_COLUMNS = ("input", "name", "width", "height", "fov", "fov_fraction", "scale", "foreground_fraction",
               "seconds")

VESSEL_COLOUR = np.array([60, 255, 60], np.uint8)    # green stands out on a red fundus
FOV_EDGE_COLOUR = np.array([40, 140, 255], np.uint8)

# Class colours of a multi-class overlay (class 0, the background, is left undrawn); repeats past 10.
CLASS_COLOURS = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                          [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60],
                          [250, 190, 190]], np.uint8)


# --------------------------------------------------------------------------------------------
# Choices
# --------------------------------------------------------------------------------------------

def fov_choice(text, dataset):
    """"auto", "none" or a mask folder (Path); None means the default for `dataset`'s model."""
    if text is None:
        return "auto" if dataset in tasks.fundus_datasets() else "none"
    if text in ("auto", "none"):
        return text
    folder = Path(text)
    if not folder.is_dir():
        raise UserError(f"--fov {text}: expected auto, none or a folder of field-of-view masks, and there is "
                        f"no folder {folder}")
    return folder


def scale_choice(text):
    """"auto" or a factor in SCALE_RANGE."""
    if text == "auto":
        return text
    try:
        factor = float(text)
    except ValueError:
        raise UserError(f"--scale {text}: expected auto or a number such as 1 or 0.5")
    if not SCALE_RANGE[0] <= factor <= SCALE_RANGE[1]:
        raise UserError(f"--scale {text} is out of range: it must be auto or in "
                        f"[{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}]")
    return factor


def effective_scale(choice, settings):
    """The scale choice a model can use: a model that resizes every image to IMAGE_SIZE ignores it."""
    if choice != 1 and not settings["PATCH_SIZE"]:
        shown = choice if choice == "auto" else f"{choice:g}"
        print(f"notice: --scale {shown} ignored: this model resizes every image to {settings['IMAGE_SIZE']} px "
              f"(PATCH_SIZE 0), whatever its size", file=sys.stderr)
        return 1.0
    return choice


# --------------------------------------------------------------------------------------------
# Inputs and the output folder
# --------------------------------------------------------------------------------------------

def collect_inputs(paths):
    """The image files named by `paths` (files as given, folders' images in natural order); one error
    for a missing path, a folder without images, or two inputs whose outputs would share a name."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found, subfolders, others = folder_entries(path)
            if not found:
                raise UserError(f"no images ({', '.join(INPUT_SUFFIXES)}) in folder {path}"
                                + (f"; its subfolders ({named(subfolders)}) are not searched: name them as inputs"
                                   if subfolders else ""))
            if subfolders or others:
                print(f"notice: in {path}, not read: " + "; ".join(
                    part for part in (subfolders and f"subfolders {named(subfolders)} (name them as inputs)",
                                      others and f"files of other types {named(others)}") if part), file=sys.stderr)
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"input {path} not found")
    seen = {}
    for path in files:
        if path.stem in seen and seen[path.stem].resolve() != path.resolve():
            raise UserError(f"{seen[path.stem]} and {path} would both be written as {path.stem}_*; rename one "
                            f"or predict them in separate runs")
        seen[path.stem] = path
    return list({path.resolve(): path for path in files}.values())  # a file named twice is predicted once


def folder_entries(folder):
    """(images in natural order, subfolder names, other file names) of one folder; hidden entries are left out."""
    entries = sorted((item for item in folder.iterdir() if not item.name.startswith(".")),
                     key=lambda item: natural_key(item.name))
    images = [item for item in entries if item.is_file() and item.suffix.lower() in INPUT_SUFFIXES]
    subfolders = [item.name for item in entries if item.is_dir()]
    others = [item.name for item in entries if item.is_file() and item.suffix.lower() not in INPUT_SUFFIXES]
    return images, subfolders, others


def named(names, shown=3):
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_output_folder(out, overwrite):
    """Refuse a non-empty OUT unless `overwrite`: nothing a user already has there is replaced by accident."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file; choose a folder with -o")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder {out} is not empty; choose a new folder, or pass --overwrite to replace "
                        f"same-named files in it")


def make_output_folder(out):
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output folder {out} ({error.strerror or error})")
    return Path(out)


# --------------------------------------------------------------------------------------------
# Reading any image as RGB uint8
# --------------------------------------------------------------------------------------------

def read_pages(path):
    """[(name, (H, W, 3) uint8 RGB)] of one input file: one entry, or one per page of a multi-page TIFF,
    named <stem>_p1, <stem>_p2, .... Raises UnreadableImage for a file that cannot be decoded."""
    path = Path(path)
    images = read_picture_pages(path)
    if len(images) == 1:
        return [(path.stem, images[0])]
    return [(f"{path.stem}_p{number}", image) for number, image in enumerate(images, start=1)]


# --------------------------------------------------------------------------------------------
# Field of view and scale
# --------------------------------------------------------------------------------------------

def mask_files(folder):
    """{lower-case stem: path} of the masks in `folder` (lossless formats only: JPEG smears the edge)."""
    return {path.stem.lower(): path for path in sorted(Path(folder).iterdir())
            if path.is_file() and path.suffix.lower() in MASK_SUFFIXES and not path.name.startswith(".")}


def find_mask(masks, folder, names):
    """The mask for the first of `names` (page name, then file stem) found with one of MASK_ENDINGS."""
    for name in names:
        for ending in MASK_ENDINGS:
            if f"{name}{ending}".lower() in masks:
                return masks[f"{name}{ending}".lower()]
    raise UserError(f"no field-of-view mask for {names[-1]} in {folder}: expected {Path(folder) / names[-1]}.png "
                    f"or {names[-1]}_mask.png (or {', '.join(suffix for suffix in MASK_SUFFIXES if suffix != '.png')})")


def check_masks_exist(choice, files):
    """With a mask folder, every input file needs a mask (its own, or one per page): fail before predicting."""
    if not isinstance(choice, Path):
        return
    masks = mask_files(choice)
    for path in files:
        if any(key.startswith(f"{path.stem.lower()}_p") for key in masks):
            continue  # masks per page of a multi-page file, checked page by page
        find_mask(masks, choice, [path.stem])


def field_of_view(choice, image, name, stem, masks):
    """(bool mask, what the CSV calls it) for one image under --fov `choice`."""
    if choice == "none":
        return np.ones(image.shape[:2], bool), "none"
    if choice == "auto":
        return fov.estimate_fov(image), "auto"
    path = find_mask(masks, choice, [name, stem])
    mask = read_mask(path)
    check_same_size(image, mask, f"image {name}", path)
    return mask, path.name


def reference_diameter(choice, dataset):
    """The FOV diameter --scale auto brings images to: that of the fundus dataset the model was trained on."""
    if choice != "auto":
        return None
    reference = tasks.dataset(dataset).fov_diameter
    if reference is None:
        raise UserError(f"--scale auto matches a fundus photograph's field of view to the training images' "
                        f"({', '.join(tasks.fundus_datasets())}), and this model was trained on {dataset!r}; "
                        f"give a factor such as --scale 0.5 instead")
    return reference


def image_scale(choice, image, mask, fov_used, reference):
    """The resize factor for one image: a fixed factor, or (auto) the one giving its FOV the `reference`
    diameter."""
    if choice != "auto":
        return choice
    if fov_used == "none":
        mask = fov.estimate_fov(image)
    return fov.scale_to_match(mask, reference)


# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------

def segment(model, image, scale, settings, device, fmt):
    """(K, H, W) float32 probabilities at the image's native size, predicted along test.py's path
    (inference.predict_samples) on the image resized by `scale`."""
    shape = image.shape[:2]
    if scale != 1:
        # The raw pixels are resized; the preprocessing (CLAHE) then runs at the new size, as in test.py.
        image = data.resize_image(image, data.scaled_shape(shape, scale), "ours").permute(1, 2, 0).numpy()
    # The label only tells the inference code the image's size; it is never looked at.
    sample = Sample("input", image, np.zeros(image.shape[:2], np.uint8))
    prob = inference.predict_samples(model, [sample], device, image_size=settings["IMAGE_SIZE"],
                                     patch_size=settings["PATCH_SIZE"], tta=settings["TTA"], amp=settings["AMP"],
                                     fmt=fmt, preprocess=settings["PREPROCESS"],
                                     patch_scale=settings["PATCH_SCALE"], images_per_chunk=1)[0]
    if tuple(prob.shape[-2:]) != shape:
        prob = F.interpolate(prob[None], size=shape, mode="bilinear", antialias=True, align_corners=False)[0]
    return prob.numpy().astype(np.float32)


def fov_edge(mask):
    """The inner rim of the field of view, about 1/300 of the image's side wide (at least 1 px)."""
    width = max(1, min(mask.shape) // 300)
    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=1)


def predicted_foreground(prob, threshold, spec, options):
    """The binary mask of a one-channel prediction as test.py scores it: the dataset's own rule where it has one
    (isbi2012: the membrane map after POSTPROCESS), else probability above the threshold."""
    if spec.predicted_mask is None:
        return prob[0] > threshold
    return spec.predicted_mask(torch.from_numpy(prob), threshold, **options)


def pictures(image, prob, mask, foreground):
    """{file ending: array} for one image; `prob` is already zero outside the field of view, and `foreground`
    (binary models) is its mask, inside the field of view only."""
    if prob.shape[0] == 1:
        overlay = (image * 0.6).astype(np.uint8)
        overlay[foreground] = VESSEL_COLOUR
        if not mask.all():
            overlay[fov_edge(mask)] = FOV_EDGE_COLOUR
        return {"prob.png": (prob[0] * 255).round().astype(np.uint8),
                "mask.png": foreground.astype(np.uint8) * 255, "overlay.png": overlay}
    classes = np.where(mask, prob.argmax(0), 0).astype(np.uint8)
    colours = CLASS_COLOURS[np.where(classes == 0, 0, (classes - 1) % (len(CLASS_COLOURS) - 1) + 1)]
    drawn = classes > 0
    overlay = image.copy()
    overlay[drawn] = (image[drawn] * 0.5 + colours[drawn] * 0.5).astype(np.uint8)
    return {"classes.png": classes, "overlay.png": overlay}


def is_uniform(image):
    """True for an (H, W, 3) image of one colour: no structure to segment, whatever the model outputs."""
    channels = image.reshape(-1, image.shape[-1])
    return int((channels.max(0).astype(np.int32) - channels.min(0)).max()) <= UNIFORM_RANGE


def foreground_fraction(prob, mask, foreground):
    """The share of field-of-view pixels predicted as foreground (any class but 0); None for an empty FOV."""
    inside = int(mask.sum())
    if inside == 0:
        return None
    foreground = foreground if prob.shape[0] == 1 else prob.argmax(0) > 0
    return float((foreground & mask).sum() / inside)


def write_image_outputs(out, name, image, prob, mask, foreground, save_float):
    for ending, picture in pictures(image, prob, mask, foreground).items():
        report.save_png(picture, out / f"{name}_{ending}")
    if save_float:
        tifffile.imwrite(out / f"{name}_prob.tif", prob[0] if prob.shape[0] == 1 else prob)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def prepare_model(checkpoint, settings, given):
    """(model on its device, settings, device, memory format), as evaluation.evaluate prepares them."""
    model, settings, _ = evaluation.load_model(checkpoint, settings, given)
    data.check_image_size(settings["PATCH_SIZE"] or settings["IMAGE_SIZE"])
    device = devices.select_device(settings["DEVICE"])
    devices.configure_speed(device, settings["DETERMINISTIC"])
    fmt = devices.inference_memory_format(device, settings["CHANNELS_LAST"])
    return model.to(device, memory_format=fmt), settings, device, fmt


def csv_row(path, name, image, fov_used, mask, scale, fraction, seconds):
    return {"input": str(path), "name": name, "width": image.shape[1], "height": image.shape[0], "fov": fov_used,
            "fov_fraction": f"{mask.mean():.4f}", "scale": f"{scale:.4f}",
            "foreground_fraction": "" if fraction is None else f"{fraction:.4f}", "seconds": f"{seconds:.3f}"}


def skip(skipped, entry, warning):
    """Record a skipped input for the summary and say so at once, without breaking the progress bar."""
    from tqdm import tqdm
    skipped.append(entry)
    tqdm.write(f"warning: {warning}", file=sys.stderr)


def read_inputs(files, skipped):
    """(path, name, image, seconds to read it) of every page of every file, in order, with a progress bar over
    the files; a file that cannot be decoded is reported in one warning line, added to `skipped`, left out."""
    from tqdm import tqdm
    for path in tqdm(files, desc="predict", unit="file", file=sys.stderr, dynamic_ncols=True):
        start = time.perf_counter()
        try:
            pages = read_pages(path)
        except UnreadableImage as error:
            skip(skipped, str(error), f"skipped: {error}")
            continue
        read_seconds = (time.perf_counter() - start) / len(pages)
        for name, image in pages:
            yield path, name, image, read_seconds


def distinct_pages(entries, names, skipped):
    """`entries` as (path, name, image, image, seconds), the image also the network's input, without a page
    whose name another input already took (its outputs would overwrite that input's); `names` collects them."""
    for path, name, image, read_seconds in entries:
        if name in names:
            skip(skipped, f"{path}: page {name} has the name of another input",
                 f"skipped page {name} of {path}: another input has that name")
            continue
        names.add(name)
        yield path, name, image, image, read_seconds


def between_neighbours(entries, skipped):
    """For a model trained on stacked slices (Dataset.stacks_slices): each entry's network input becomes the
    slice with the one before it as red and the one after it as blue, as the training images were made
    (tasks.em_cells.with_neighbours). The pages of one multi-page file form a stack, and so do consecutive
    single-image inputs (a folder of slices in natural order); the first and last slice of a stack stand in
    for their missing neighbour, and a slice of another size starts a new stack. A colour image has no grey to
    stack: it is skipped with a warning. One slice is held in memory beyond the one being predicted, so a stack
    of any length fits."""
    waiting = None  # the slice waiting for its successor: (stack, entry, its grey, the grey of the one before)
    for path, name, image, _, read_seconds in entries:
        if not is_grey(image):
            skip(skipped, f"{path}: {name} is a colour image; this model takes grey slices",
                 f"skipped {name} of {path}: a colour image, and this model takes grey slices")
            continue
        stack, grey = (path if name != path.stem else None), image[..., 1]
        same_stack = waiting is not None and waiting[0] == stack and waiting[2].shape == grey.shape
        if waiting is not None:
            yield stacked_entry(waiting[1], waiting[2], waiting[3], grey if same_stack else None)
        waiting = (stack, (path, name, image, read_seconds), grey, waiting[2] if same_stack else None)
    if waiting is not None:
        yield stacked_entry(waiting[1], waiting[2], waiting[3], None)


def stacked_entry(entry, grey, before, after):
    """`entry` with its network input, the slice between its neighbours (tasks.em_cells.between)."""
    path, name, image, read_seconds = entry
    return path, name, image, between(before, grey, after), read_seconds


def predict_files(inputs, out, checkpoint, settings, given, fov_text=None, scale_text="1", save_float=False,
                  overwrite=False):
    """Predict every input and write the outputs; returns (rows written, warnings about skipped files, OUT)."""
    if settings.get("ADAPT_BN", "none") != "none":
        raise UserError("--adapt-bn is for test.py, which scores a dataset; predict.py keeps the model's own "
                        "BatchNorm statistics: leave --adapt-bn out")
    files = collect_inputs(inputs)
    check_output_folder(out, overwrite)
    scale_wanted = scale_choice(scale_text)
    fov_given = None if fov_text is None else fov_choice(fov_text, None)
    check_masks_exist(fov_given, files)  # all of these before the model loads: a typo fails at once
    model, settings, device, fmt = prepare_model(checkpoint, settings, given)
    spec = tasks.dataset(settings["DATASET"])
    mask_options = evaluation.score_options(settings, spec)  # refuses --postprocess for a model it cannot apply to
    fov_wanted = fov_given or fov_choice(None, settings["DATASET"])
    scale_wanted = effective_scale(scale_wanted, settings)
    reference = reference_diameter(scale_wanted, settings["DATASET"])
    masks = mask_files(fov_wanted) if isinstance(fov_wanted, Path) else {}
    out = make_output_folder(out)  # only now: a bad flag or checkpoint leaves no empty folder

    rows, skipped, names, empty, uniform = [], [], set(), [], []
    entries = distinct_pages(read_inputs(files, skipped), names, skipped)
    if spec.stacks_slices:
        entries = between_neighbours(entries, skipped)
    with open(out / "predictions.csv", "w", newline="") as table:
        writer = csv.DictWriter(table, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for path, name, image, network_input, read_seconds in entries:
            if is_uniform(image):
                uniform.append(name)
            page_start = time.perf_counter()
            mask, fov_used = field_of_view(fov_wanted, image, name, path.stem, masks)
            scale = image_scale(scale_wanted, image, mask, fov_used, reference)
            prob = segment(model, network_input, scale, settings, device, fmt)
            prob[:, ~mask] = 0
            foreground = predicted_foreground(prob, settings["THRESHOLD"], spec, mask_options) & mask \
                if prob.shape[0] == 1 else None
            write_image_outputs(out, name, image, prob, mask, foreground, save_float)
            fraction = foreground_fraction(prob, mask, foreground)
            if not fraction:
                empty.append(name)
            seconds = read_seconds + time.perf_counter() - page_start
            rows.append(csv_row(path, name, image, fov_used, mask, scale, fraction, seconds))
            writer.writerow(rows[-1])
            table.flush()  # a stopped run still leaves the rows of the images it finished
    if empty:
        print(f"warning: {len(empty)} of {len(rows)} masks have no foreground at threshold {settings['THRESHOLD']} "
              f"({named(empty, 5)}): an image unlike the model's training images in size (see --scale) or in "
              f"kind, or one with nothing to find", file=sys.stderr)
    if uniform:
        print(f"warning: {len(uniform)} of {len(rows)} images are a single colour ({named(uniform, 5)}): there is "
              f"nothing in them to segment, so their masks mean nothing; check that these are the right files",
              file=sys.stderr)
    return rows, skipped, out
