"""Dataset readers, in-memory tensors and the paper's augmentation.

Every reader returns a list of `Sample`s at native resolution: an RGB uint8 image, an integer class
map (0 = background; 1 = foreground for binary tasks; 0..K-1 for multi-class) and, where the dataset
ships one, a field-of-view mask. `DATASETS` is the one table mapping a dataset name to its reader,
class count and evaluation task; adding a dataset means one reader and one entry there. The paper's
five tasks are all there: vessels (drive), optic disc (origa, messidor, rimone), lung CT (lung), EM
cell membranes (isbi2012) and retinal OCT layers (oct); docs/datasets.md gives each one's layout.

Augmentation runs on whole batches of tensors on the training device (GPU when there is one), so it
never starves the model: one affine resampling per batch covers the 8 dihedral variants, 90-110 %
scaling and the random shift; HSV jitter follows on the image alone.
"""
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from cli import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Augmentation magnitudes. The paper names the transforms but not their ranges beyond the scale;
# shift and colour ranges follow the authors' released code (shift 10 % of the side, hue ±30/180 of
# the colour circle, saturation ±5/255, value ±15/255).
SCALE_RANGE = (0.9, 1.1)
SHIFT_FRACTION = 0.1
HUE_SHIFT = 30 / 180
SATURATION_SHIFT = 5 / 255
VALUE_SHIFT = 15 / 255


@dataclass
class Sample:
    name: str
    image: np.ndarray                 # (H, W, 3) uint8
    label: np.ndarray                 # (H, W) uint8 class map
    fov: Optional[np.ndarray] = None  # (H, W) bool, True inside the field of view
    experts: Optional[np.ndarray] = None  # (E, H, W) bool, each expert's own mask (RIM-ONE)


@dataclass
class DatasetSpec:
    reader: Callable                  # reader(root: Path, split: "train"|"test", settings) -> list[Sample]
    num_classes: int                  # model output channels: 1 = binary (sigmoid), K >= 2 softmax
    task: str                         # evaluation task, a key of metrics.TASKS
    source: str                       # where a user gets the data (printed when it is missing)


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------

def read_image(path):
    """RGB uint8 array; an unreadable or truncated file is a UserError naming it."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise UserError(f"cannot read image {path}: {error}. Replace the file with an intact copy.")


def read_mask(path):
    """A binary annotation (any nonzero pixel is foreground) as a bool array."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L")) > 127
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise UserError(f"cannot read annotation {path}: {error}. Replace the file with an intact copy.")


def require_dir(path, what):
    if not Path(path).is_dir():
        raise UserError(f"{what} folder {path} not found")
    return Path(path)


def check_same_size(image, other, image_path, other_path):
    if image.shape[:2] != other.shape[:2]:
        raise UserError(f"size mismatch: {image_path} is {image.shape[1]}x{image.shape[0]} but "
                        f"{other_path} is {other.shape[1]}x{other.shape[0]}")


def read_drive(root, split, settings):
    """DRIVE: training/{images,1st_manual} and test/{images,1st_manual,mask}.

    Image `21_training.tif` pairs with `1st_manual/21_manual1.gif`; test image `01_test.tif` with
    `1st_manual/01_manual1.gif` and the field-of-view mask `mask/01_test_mask.gif`. The test split is
    scored against the first annotator, as in the paper.
    """
    split = {"train": "training", "test": "test"}[split]
    folder = require_dir(Path(root) / split, f"DRIVE {split}")
    image_dir = require_dir(folder / "images", f"DRIVE {split} images")
    label_dir = require_dir(folder / "1st_manual", f"DRIVE {split} labels")
    mask_dir = require_dir(folder / "mask", "DRIVE test field-of-view mask") if split == "test" else None
    image_paths = sorted(image_dir.glob(f"*_{split}.tif"))
    if not image_paths:
        raise UserError(f"no *_{split}.tif images in {image_dir}")
    samples = []
    for image_path in image_paths:
        number = image_path.name.split("_")[0]
        label_path = label_dir / f"{number}_manual1.gif"
        if not label_path.is_file():
            raise UserError(f"label {label_path} missing for image {image_path}")
        image, label = read_image(image_path), read_mask(label_path)
        check_same_size(image, label, image_path, label_path)
        fov = None
        if mask_dir is not None:
            mask_path = mask_dir / f"{number}_test_mask.gif"
            if not mask_path.is_file():
                raise UserError(f"field-of-view mask {mask_path} missing for image {image_path}")
            fov = read_mask(mask_path)
            check_same_size(image, fov, image_path, mask_path)
        samples.append(Sample(number, image, label.astype(np.uint8), fov))
    return samples


# --------------------------------------------------------------------------------------------
# Pieces shared by the readers of the paper's other tasks
# --------------------------------------------------------------------------------------------

# Images and annotations are paired by file stem; these are the suffixes a reader looks at.
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg", ".gif")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".gif")  # lossless only: JPEG smears class edges
TIFF_SUFFIXES = (".tif", ".tiff")

# k-fold splits use their own fixed seed, so a new training SEED never moves images between the
# training and the test set of a fold.
SPLIT_SEED = 2019

# The paper crops 800 x 800 around the optic disc of ORIGA and Messidor images. A CROP_SIZE setting
# (constants.py / --crop-size, where present) overrides it.
DISC_CROP_SIZE = 800

OCT_CLASSES = 11  # 10 layer boundaries, ILM to BM, separate 11 regions


def read_array(path):
    """The stored pixels at their own depth: TIFF through tifffile (16-bit, float, multi-page
    stacks), other formats through PIL (a palette file gives its indices, as class maps need)."""
    try:
        if Path(path).suffix.lower() in TIFF_SUFFIXES:
            return np.asarray(tifffile.imread(path))
        with Image.open(path) as image:
            return np.array(image)
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


def read_membrane_label(path):
    """ISBI 2012 labels are white (255) inside cells and black (0) on membranes; membrane = class 1."""
    return (read_class_map(path) == 0).astype(np.uint8)


def read_oct_label(path):
    label = read_class_map(path)
    check_class_range(label, path, "oct", OCT_CLASSES)
    return label.astype(np.uint8)


def check_class_range(label, path, dataset, num_classes):
    highest = int(label.max()) if label.size else 0
    if int(label.min()) < 0 or highest >= num_classes:
        value = highest if highest >= num_classes else int(label.min())
        raise UserError(f"label map {path} has value {value} but dataset {dataset} has {num_classes} "
                        f"classes (0..{num_classes - 1}); fix or replace the annotation")


def grey_to_rgb(grey):
    """The model always takes RGB; a grey scan is the same plane three times."""
    return np.repeat(grey[..., None], 3, axis=2)


def window_to_uint8(array, low=0.5, high=99.5):
    """Deeper-than-8-bit data (16-bit or float CT) -> uint8 between its own `low` and `high`
    percentiles. Percentiles rather than min/max, so a few extreme pixels (metal, padding) do not
    squeeze the tissue into a handful of grey levels; per image, because the stored values of
    the slices need not be Hounsfield units."""
    values = array.astype(np.float32)
    bottom, top = np.percentile(values, [low, high])
    if top <= bottom:
        return np.zeros(array.shape, np.uint8)
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


def read_id_list(path):
    """Ids of a split list, one per line. A folder or an image suffix on a line is dropped (so
    `001`, `001.jpg` and `images/001.jpg` all name image 001); later columns and #-comments are
    ignored."""
    ids = []
    for line in path.read_text().splitlines():
        fields = line.split("#")[0].split()
        if not fields:
            continue
        entry = Path(fields[0].replace("\\", "/")).name
        if Path(entry).suffix.lower() in IMAGE_SUFFIXES:
            entry = Path(entry).stem
        if entry not in ids:
            ids.append(entry)
    return ids


def listed_names(list_path, available, image_dir):
    """The ids of a split list, each of which must be an image in `image_dir`."""
    names = read_id_list(list_path)
    if not names:
        raise UserError(f"split list {list_path} names no images; put one image id per line")
    missing = [name for name in names if name not in available]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"split list {list_path} names {missing[0]!r}{more}, but {image_dir} has no such "
                        f"image; restore the file or remove the line")
    return names


def check_folds(fold, folds, count):
    if folds < 2:
        raise UserError(f"NUM_FOLDS is {folds}, but a k-fold split needs at least 2 (e.g. --num-folds 5)")
    if not 0 <= fold < folds:
        raise UserError(f"FOLD {fold} is outside 0..{folds - 1}; pass --fold between 0 and {folds - 1}")
    if folds > count:
        raise UserError(f"{count} images cannot be split into {folds} folds; lower --num-folds")


def fold_names(names, split, settings, groups=None, contiguous=False):
    """The names in one split of a k-fold cross-validation: fold FOLD of NUM_FOLDS is the test set,
    the other folds the training set.

    Names are shuffled with SPLIT_SEED and dealt round-robin into the folds, one group after the
    other (`groups`: name -> group, e.g. RIM-ONE's diagnosis), so every fold gets the same mix and
    sizes differ by at most one. `contiguous` cuts the natural order into blocks instead: neighbouring
    slices of one volume are near-duplicates and must not sit on both sides of the split.
    """
    fold, folds = settings["FOLD"], settings["NUM_FOLDS"]
    check_folds(fold, folds, len(names))
    names = sorted(names, key=natural_key)
    if contiguous:
        fold_of = {name: index * folds // len(names) for index, name in enumerate(names)}
    else:
        groups = groups or {}
        generator = np.random.default_rng(SPLIT_SEED)
        order = []
        for group in sorted({groups.get(name, "") for name in names}):
            members = [name for name in names if groups.get(name, "") == group]
            order.extend(members[index] for index in generator.permutation(len(members)))
        fold_of = {name: index % folds for index, name in enumerate(order)}
    in_test = split == "test"
    return [name for name in names if (fold_of[name] == fold) == in_test]


def split_names(root, split, settings, images, image_dir, list_files):
    """Names of `split`: from the dataset's train/test lists when both are there, else k-fold."""
    present = [root / name for name in list_files if (root / name).is_file()]
    if len(present) == len(list_files):
        return listed_names(present[0] if split == "train" else present[1], images, image_dir)
    if present:
        missing = next(name for name in list_files if not (root / name).is_file())
        raise UserError(f"found {present[0]} but not {root / missing}; give both split lists, or neither "
                        f"to use the k-fold split (FOLD, NUM_FOLDS)")
    return fold_names(list(images), split, settings)


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


# --------------------------------------------------------------------------------------------
# Optic disc crop (paper: 800 x 800 around the brightest point, ORIGA and Messidor)
# --------------------------------------------------------------------------------------------

def block_mean(array, factor):
    """Average of each factor x factor block (edge rows/columns that do not fill a block dropped)."""
    factor = max(1, min(factor, *array.shape))
    height, width = (array.shape[0] // factor) * factor, (array.shape[1] // factor) * factor
    return array[:height, :width].reshape(height // factor, factor, width // factor, factor).mean(axis=(1, 3))


def brightest_point(image, sigma):
    """(row, column) of the peak of the Gaussian-smoothed luminance. Smoothing makes the winner a
    bright region about the size of a disc, not one hot pixel or a small reflex. Block-averaging
    first (about 4 blocks per sigma) keeps a 3072 x 2048 fundus fast and moves the peak by less
    than a block."""
    luminance = image[..., :3].astype(np.float32) @ np.float32([0.299, 0.587, 0.114])
    factor = max(1, int(sigma // 4))
    smooth = ndimage.gaussian_filter(block_mean(luminance, factor), sigma / factor)
    row, column = np.unravel_index(np.argmax(smooth), smooth.shape)
    return int(row) * factor + factor // 2, int(column) * factor + factor // 2


def pad_to(array, size):
    """Pad with zeros (black image, background label) at the bottom and right to at least size x size."""
    extra = [(0, max(0, size - array.shape[0])), (0, max(0, size - array.shape[1]))]
    return np.pad(array, extra + [(0, 0)] * (array.ndim - 2))


def crop_around_brightest(image, label, size=DISC_CROP_SIZE):
    """The size x size window of `image` and `label` centred on the brightest point of the image
    (the optic disc in a fundus photograph), shifted to stay inside the image; an image smaller
    than the window is padded with black first. Smoothing uses sigma = size / 20 (40 px for the
    paper's 800), about the radius of a disc at the scale the crop size is chosen for."""
    row, column = brightest_point(image, sigma=size / 20)
    image, label = pad_to(image, size), pad_to(label, size)
    top = min(max(row - size // 2, 0), image.shape[0] - size)
    left = min(max(column - size // 2, 0), image.shape[1] - size)
    return image[top:top + size, left:left + size], label[top:top + size, left:left + size]


def disc_crop(settings):
    size = settings.get("CROP_SIZE", DISC_CROP_SIZE)
    if size <= 0:
        raise UserError(f"crop size {size} must be positive (the paper uses 800)")
    return lambda image, label: crop_around_brightest(image, label, size)


# --------------------------------------------------------------------------------------------
# Readers of the paper's other tasks (layouts and sources in docs/datasets.md)
# --------------------------------------------------------------------------------------------

ORIGA_LISTS = {"train": "Set_A.txt", "test": "Set_B.txt"}


def read_origa(root, split, settings):
    """ORIGA: images/<id>.jpg, masks/<id>.png (disc = any value >= 1, so a cup marked 2 stays in the
    disc), Set_A.txt (training) and Set_B.txt (test) listing one id per line; 800 x 800 disc crop."""
    image_dir = require_dir(root / "images", "ORIGA images")
    mask_dir = require_dir(root / "masks", "ORIGA masks")
    list_path = root / ORIGA_LISTS[split]
    if not list_path.is_file():
        raise UserError(f"split list {list_path} not found; ORIGA trains on {ORIGA_LISTS['train']} and tests "
                        f"on {ORIGA_LISTS['test']}, one image id per line")
    images = image_files(image_dir, IMAGE_SUFFIXES)
    names = listed_names(list_path, images, image_dir)
    masks = files_by_stem(mask_dir, MASK_SUFFIXES)
    return read_pairs(names, images, masks, mask_dir, read_image, read_binary_label, disc_crop(settings))


def read_messidor(root, split, settings):
    """Messidor: images/**/*.tif (the Base11..Base34 subfolders may stay), masks/<stem>.png|tif|bmp
    (University of Huelva disc annotations); train.txt/test.txt if present, else k-fold; disc crop."""
    image_dir = require_dir(root / "images", "Messidor images")
    mask_dir = require_dir(root / "masks", "Messidor masks")
    images = image_files(image_dir, TIFF_SUFFIXES, recursive=True)
    names = split_names(root, split, settings, images, image_dir, ("train.txt", "test.txt"))
    masks = files_by_stem(mask_dir, MASK_SUFFIXES)
    return read_pairs(names, images, masks, mask_dir, read_image, read_binary_label, disc_crop(settings))


def rimone_groups(root):
    """The diagnosis folders of RIM-ONE r1 (Normal, Early, Moderate, Deep, OHT...), archive debris skipped."""
    groups = sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith((".", "__")))
    if not groups:
        raise UserError(f"no diagnosis folders (Normal, Early, ...) in {root}")
    return groups


def expert_number(folder):
    match = re.fullmatch(r"expert\s*(\d+)_masks", folder.name, flags=re.IGNORECASE)
    return int(match.group(1)) if match else None


def rimone_records(root):
    """{name: (group, image path, [mask path per expert])} over all diagnosis folders. Images sit
    in <group>/ or <group>/Images/; expert N's mask of image <id> is <group>/ExpertN_masks/<id>-expN.*."""
    records = {}
    for group in rimone_groups(root):
        experts = sorted((expert_number(path), path) for path in group.iterdir()
                         if path.is_dir() and expert_number(path) is not None)
        if not experts:
            raise UserError(f"no Expert<N>_masks folders in {group}; RIM-ONE r1 keeps each expert's disc "
                            f"masks there")
        image_dir = group / "Images" if (group / "Images").is_dir() else group
        masks = [(number, folder, files_by_stem(folder, MASK_SUFFIXES)) for number, folder in experts]
        for stem, image_path in image_files(image_dir, IMAGE_SUFFIXES).items():
            paths = []
            for number, folder, found in masks:
                key = f"{stem}-exp{number}"
                if key not in found:
                    raise UserError(f"expert mask {folder / key}.bmp missing for image {image_path}")
                paths.append(found[key])
            records[f"{group.name}_{stem}".replace(" ", "_")] = (group.name, image_path, paths)
    if len({len(paths) for _, _, paths in records.values()}) > 1:
        raise UserError(f"the diagnosis folders of {root} have different numbers of Expert<N>_masks folders; "
                        f"every image needs the same experts")
    return records


def read_rimone_sample(name, image_path, mask_paths):
    """Ground truth = majority vote of the experts (a pixel is disc when more than half mark it); the
    experts' own masks ride along so the evaluation can also score against each one (paper, Table I)."""
    image = read_image(image_path)
    experts = []
    for path in mask_paths:
        mask = read_binary_label(path).astype(bool)
        check_same_size(image, mask, image_path, path)
        experts.append(mask)
    experts = np.stack(experts)
    label = (experts.sum(0) * 2 > len(experts)).astype(np.uint8)
    return Sample(name, image, label, experts=experts)


def read_rimone(root, split, settings):
    """RIM-ONE r1: cropped disc images in diagnosis folders, five experts each; k-fold stratified by group."""
    records = rimone_records(root)
    groups = {name: group for name, (group, _, _) in records.items()}
    names = fold_names(list(records), split, settings, groups=groups)
    return [read_rimone_sample(name, *records[name][1:]) for name in names]


def read_lung(root, split, settings):
    """Kaggle "Finding and Measuring Lungs in CT Data": 2d_images/*.tif and same-name 2d_masks/*.tif;
    k-fold (FOLD picks which fifth is the test set)."""
    image_dir = require_dir(root / "2d_images", "lung CT images")
    mask_dir = require_dir(root / "2d_masks", "lung masks")
    images = image_files(image_dir, TIFF_SUFFIXES)
    names = fold_names(list(images), split, settings)
    masks = files_by_stem(mask_dir, MASK_SUFFIXES)
    return read_pairs(names, images, masks, mask_dir, read_scan, read_binary_label)


ISBI_VOLUME, ISBI_LABELS = "train-volume.tif", "train-labels.tif"


def read_stack(path):
    """A multi-page TIFF as (pages, H, W); a single page counts as a stack of one."""
    array = read_array(path)
    array = array[None] if array.ndim == 2 else array
    if array.ndim != 3:
        raise UserError(f"{path} has shape {array.shape}; expected a stack of 2-D grey pages")
    return array


def isbi_volume_samples(root):
    """The 30 training slices of train-volume.tif with the matching pages of train-labels.tif."""
    volume_path, labels_path = root / ISBI_VOLUME, root / ISBI_LABELS
    if not labels_path.is_file():
        raise UserError(f"{labels_path} not found next to {volume_path}")
    volume, labels = read_stack(volume_path), read_stack(labels_path)
    if len(volume) != len(labels):
        raise UserError(f"{volume_path} has {len(volume)} pages but {labels_path} has {len(labels)}; "
                        f"they must pair slice by slice")
    check_same_size(volume[0], labels[0], volume_path, labels_path)
    return {f"slice{index:02d}": Sample(f"slice{index:02d}", scan_to_rgb(page, volume_path),
                                        (label == 0).astype(np.uint8))
            for index, (page, label) in enumerate(zip(volume, labels))}


def read_isbi2012(root, split, settings):
    """ISBI 2012 EM: train-volume.tif + train-labels.tif, or images/ + labels/ with one file per slice.
    The challenge's test labels are secret, so the 30 training slices are cross-validated in contiguous
    blocks (FOLD 0 of 5 = slices 0-5 for testing)."""
    if (root / ISBI_VOLUME).is_file():
        samples = isbi_volume_samples(root)
        return [samples[name] for name in fold_names(list(samples), split, settings, contiguous=True)]
    if not (root / "images").is_dir():
        raise UserError(f"neither {root / ISBI_VOLUME} nor a per-slice {root / 'images'} folder found; "
                        f"see docs/datasets.md for the ISBI 2012 layouts")
    image_dir = root / "images"
    label_dir = require_dir(root / "labels", "ISBI 2012 labels")
    images = image_files(image_dir, (".png", ".tif", ".tiff"))
    names = fold_names(list(images), split, settings, contiguous=True)
    labels = files_by_stem(label_dir, MASK_SUFFIXES)
    return read_pairs(names, images, labels, label_dir, read_scan, read_membrane_label)


def read_oct(root, split, settings):
    """Retinal OCT layers: images/<name>.png (grey B-scan), labels/<name>.png (0 above the ILM ...
    10 below the BM); train.txt/test.txt if present, else k-fold."""
    image_dir = require_dir(root / "images", "OCT images")
    label_dir = require_dir(root / "labels", "OCT labels")
    images = image_files(image_dir, IMAGE_SUFFIXES)
    names = split_names(root, split, settings, images, image_dir, ("train.txt", "test.txt"))
    labels = files_by_stem(label_dir, MASK_SUFFIXES)
    return read_pairs(names, images, labels, label_dir, read_image, read_oct_label)


DATASETS = {
    "drive": DatasetSpec(read_drive, num_classes=1, task="vessel",
                         source="DRIVE, https://drive.grand-challenge.org (registration required)"),
    "origa": DatasetSpec(read_origa, num_classes=1, task="disc",
                         source="ORIGA (Singapore Eye Research Institute, on request; see docs/datasets.md)"),
    "messidor": DatasetSpec(read_messidor, num_classes=1, task="disc",
                            source="Messidor, https://www.adcis.net/en/third-party/messidor/ with the disc masks "
                                   "of the University of Huelva (see docs/datasets.md)"),
    "rimone": DatasetSpec(read_rimone, num_classes=1, task="disc",
                          source="RIM-ONE release 1, University of La Laguna (see docs/datasets.md)"),
    "lung": DatasetSpec(read_lung, num_classes=1, task="lung",
                        source="Kaggle, https://www.kaggle.com/datasets/kmader/finding-lungs-in-ct-data"),
    "isbi2012": DatasetSpec(read_isbi2012, num_classes=1, task="cell",
                            source="the ISBI 2012 EM challenge, http://brainiac2.mit.edu/isbi_challenge/"),
    "oct": DatasetSpec(read_oct, num_classes=OCT_CLASSES, task="oct",
                       source="a retinal OCT layer set exported as PNG label maps (see docs/datasets.md)"),
}


def dataset_spec(name):
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def load_split(settings, split):
    """Read the `split` ("train" or "test") of the configured dataset, with clear errors."""
    spec = dataset_spec(settings["DATASET"])
    root = Path(settings["DATA_ROOT"])
    if not root.is_dir():
        raise UserError(f"dataset root {root} does not exist. Download it from {spec.source} and unpack it "
                        f"there, or pass --data-root PATH")
    samples = spec.reader(root, split, settings)
    if not samples:
        raise UserError(f"no {split} images found under {root}")
    return samples


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------

def check_image_size(size):
    if size <= 0 or size % 32:
        multiple = max(32, round(size / 32) * 32)
        raise UserError(f"image size {size} is not a positive multiple of 32 (the encoder halves it 5 times); "
                        f"use e.g. --image-size {multiple}")


def resize_image(image, size):
    """(H, W, 3) uint8 array -> (3, size, size) uint8 tensor, antialiased bilinear."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    resized = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized[0].round().clamp(0, 255).to(torch.uint8)


def resize_label(label, size, num_classes):
    """Class map -> (size, size) uint8. Binary maps are resampled smoothly then thresholded at one half,
    which keeps thin vessels connected better than nearest-neighbour; multi-class maps use nearest."""
    tensor = torch.from_numpy(np.ascontiguousarray(label))[None, None].float()
    if num_classes == 1:
        resized = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False) > 0.5
    else:
        resized = F.interpolate(tensor, size=(size, size), mode="nearest-exact")
    return resized[0, 0].to(torch.uint8)


def stack_samples(samples, size, num_classes):
    """Decode once: all images (N, 3, S, S) and labels (N, S, S) as uint8 tensors."""
    images = torch.stack([resize_image(sample.image, size) for sample in samples])
    labels = torch.stack([resize_label(sample.label, size, num_classes) for sample in samples])
    return images, labels


def stack_native(samples, num_classes):
    """Decode once at native resolution: images (N, 3, H, W) and labels (N, H, W) as uint8 tensors, each
    zero-padded at the bottom and right to the largest height and width of the set (DRIVE: all 584 x 565,
    no padding). Padding is black with background label, as pixels moved in by the augmentation are."""
    height = max(sample.image.shape[0] for sample in samples)
    width = max(sample.image.shape[1] for sample in samples)
    images = torch.zeros(len(samples), 3, height, width, dtype=torch.uint8)
    labels = torch.zeros(len(samples), height, width, dtype=torch.uint8)
    for index, sample in enumerate(samples):
        rows, cols = sample.label.shape
        images[index, :, :rows, :cols] = torch.from_numpy(np.ascontiguousarray(sample.image)).permute(2, 0, 1)
        labels[index, :rows, :cols] = torch.from_numpy(np.ascontiguousarray(sample.label))
    return images, labels


def padded_side(height, width, multiple=32):
    """The smallest square side >= both sides that the encoder can halve five times."""
    return math.ceil(max(height, width) / multiple) * multiple


def pad_to_square(images, side):
    """(N, C, H, W) -> (N, C, side, side), zeros at the bottom and right (the original stays at [:H, :W])."""
    return F.pad(images, (0, side - images.shape[-1], 0, side - images.shape[-2]))


def normalize(images):
    """uint8 or [0, 1] float batch -> ImageNet-normalised float (the encoder's pretraining statistics)."""
    if images.dtype == torch.uint8:
        images = images.float() / 255
    mean = device_constant(IMAGENET_MEAN, images.device, images.dtype)
    std = device_constant(IMAGENET_STD, images.device, images.dtype)
    return (images - mean) / std


@functools.lru_cache(maxsize=None)
def device_constant(values, device, dtype):
    """A (1, C, 1, 1) constant made once per device: building it from a Python list every step would
    be a blocking host-to-GPU copy, which stalls the host until the GPU has run dry."""
    return torch.tensor(values, dtype=dtype).view(1, -1, 1, 1).to(device)


# --------------------------------------------------------------------------------------------
# Dihedral group: the 8 flips of the paper's augmentation and test-time augmentation
# --------------------------------------------------------------------------------------------

def dihedral(x, k):
    """Variant k (0..7) of the last two axes: bit 2 transposes (diagonal flip), bit 0 flips left-right,
    bit 1 flips up-down, applied in that order."""
    if k & 4:
        x = x.transpose(-1, -2)
    if k & 1:
        x = x.flip(-1)
    if k & 2:
        x = x.flip(-2)
    return x


def undo_dihedral(x, k):
    """Inverse of `dihedral(x, k)`: the flips first, then the transpose."""
    if k & 2:
        x = x.flip(-2)
    if k & 1:
        x = x.flip(-1)
    if k & 4:
        x = x.transpose(-1, -2)
    return x


def dihedral_matrix(k):
    """2x2 matrix acting on normalised (x, y) output coordinates that samples variant k."""
    matrix = torch.eye(2)
    if k & 4:
        matrix = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    if k & 1:
        matrix = matrix @ torch.diag(torch.tensor([-1.0, 1.0]))
    if k & 2:
        matrix = matrix @ torch.diag(torch.tensor([1.0, -1.0]))
    return matrix


DIHEDRAL_MATRICES = torch.stack([dihedral_matrix(k) for k in range(8)])


# --------------------------------------------------------------------------------------------
# Colour
# --------------------------------------------------------------------------------------------

def rgb_to_hsv(rgb):
    """(B, 3, H, W) in [0, 1] -> hue in [0, 1), saturation, value."""
    r, g, b = rgb.unbind(1)
    value, _ = rgb.max(1)
    chroma = value - rgb.min(1).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(value == r, ((g - b) / safe) % 6,
                      torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)),
                             torch.zeros_like(value))
    return torch.stack([hue % 1.0, saturation, value], 1)


def hsv_to_rgb(hsv):
    hue, saturation, value = hsv.unbind(1)
    # The standard piecewise-linear form: channel n uses k = (n + 6h) mod 6.
    offsets = device_constant((5.0, 3.0, 1.0), hsv.device, hsv.dtype)
    k = (offsets + hue[:, None] * 6) % 6
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return value[:, None] - value[:, None] * saturation[:, None] * ramp


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------

def random_affine(batch, generator, geometric=True):
    """Per-sample 2x3 matrices (output -> input, normalised coordinates): dihedral variant, scale in
    SCALE_RANGE, shift up to SHIFT_FRACTION of the side."""
    variants = torch.randint(0, 8, (batch,), generator=generator)
    scales = torch.empty(batch).uniform_(*SCALE_RANGE, generator=generator)
    # Normalised coordinates span 2 units per side, so a shift of f of the side is 2f units.
    shifts = torch.empty(batch, 2).uniform_(-2 * SHIFT_FRACTION, 2 * SHIFT_FRACTION, generator=generator)
    if not geometric:
        scales.fill_(1.0)
        shifts.zero_()
    linear = DIHEDRAL_MATRICES[variants] / scales.view(-1, 1, 1)
    return torch.cat([linear, shifts[:, :, None]], dim=2)


def random_hsv_shifts(batch, generator, colour=True):
    """Per-sample (hue, saturation, value) shifts, uniform within the limits above."""
    limits = torch.tensor([HUE_SHIFT, SATURATION_SHIFT, VALUE_SHIFT])
    shifts = (torch.rand(batch, 3, generator=generator) * 2 - 1) * limits
    return shifts if colour else torch.zeros_like(shifts)


def draw_augmentation(count, generator, geometric=True, colour=True):
    """Random parameters for `count` samples, drawn on the CPU from `generator`, so a seed gives the
    same augmentation on every device. The trainer draws a whole run's worth at once and uploads it
    once; a step then only slices device tensors and never waits on a host-to-GPU copy."""
    return random_affine(count, generator, geometric), random_hsv_shifts(count, generator, colour)


def jitter_hsv(images, shifts):
    """Shift hue (circularly), saturation and value of each image by its row of `shifts` (B, 3)."""
    hsv = rgb_to_hsv(images)
    shifts = shifts.to(images.dtype).view(-1, 3, 1, 1)
    hue = (hsv[:, :1] + shifts[:, :1]) % 1.0
    rest = (hsv[:, 1:] + shifts[:, 1:]).clamp(0, 1)
    return hsv_to_rgb(torch.cat([hue, rest], 1)).clamp(0, 1)


def random_crop_centres(count, crop, height, width, generator):
    """(count, 2) crop centres (x, y) in pixels, uniform over the positions where a crop x crop window
    fits inside a height x width image (the middle, on a side shorter than the crop)."""
    low = torch.tensor([min(crop, width), min(crop, height)]) / 2
    high = torch.tensor([width, height]) - low
    return low + torch.rand(count, 2, generator=generator) * (high - low)


def crop_affine(theta, centres, crop, height, width):
    """Matrices that sample a crop x crop window centred at `centres` (B, 2) pixels of a height x width
    image, transformed by `theta` (B, 2, 3, the square-image matrices of `random_affine`, whose shift the
    random centre replaces). Normalised input coordinates span the whole image, so the linear part is
    scaled per axis by crop / side; the window keeps square pixels whatever the image's aspect."""
    axis_scale = torch.tensor([crop / width, crop / height], dtype=theta.dtype, device=theta.device)
    linear = theta[:, :, :2] * axis_scale.view(1, 2, 1)
    sides = torch.tensor([width, height], dtype=theta.dtype, device=theta.device)
    centre = 2 * centres.to(theta.dtype) / sides - 1
    return torch.cat([linear, centre[:, :, None]], dim=2)


def apply_augmentation(images, labels, theta, hsv_shifts, out_size=None):
    """Resample image and label through the same affine grid, then jitter the image's colour.

    images: (B, 3, H, W) float in [0, 1]; labels: (B, H, W) integer class map; theta (B, 2, 3) and
    hsv_shifts (B, 3) on the images' device. The output is out_size x out_size (default: the input's
    size, which must then be square). Labels stay integer class maps (nearest-neighbour sampling);
    pixels moved in from outside the frame are black with background label.
    """
    if out_size is None:
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"augmentation needs square images, got {tuple(images.shape[-2:])}")
        out_size = images.shape[-1]
    shape = [images.shape[0], images.shape[1], out_size, out_size]
    grid = F.affine_grid(theta.to(images.dtype), shape, align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    moved = F.grid_sample(labels[:, None].to(images.dtype), grid, mode="nearest", padding_mode="zeros",
                          align_corners=False)
    return jitter_hsv(images, hsv_shifts), moved[:, 0].round().to(labels.dtype)


def augment(images, labels, generator, geometric=True, colour=True):
    """The paper's augmentation on a batch (any device), parameters drawn from `generator`."""
    theta, shifts = draw_augmentation(images.shape[0], generator, geometric, colour)
    return apply_augmentation(images, labels, theta.to(images.device), shifts.to(images.device))


class BatchStream:
    """Endless, seeded stream of index batches over N training images.

    Each epoch is one pass of a `DistributedSampler` (one process: the whole set; torchrun: this rank's
    shard), and batches run across epoch boundaries so every step has exactly `batch_size` images,
    which keeps BatchNorm statistics and compiled shapes stable.
    """

    def __init__(self, num_items, batch_size, seed, rank=0, world_size=1):
        from torch.utils.data import DistributedSampler
        self.sampler = DistributedSampler(range(num_items), num_replicas=world_size, rank=rank,
                                          shuffle=True, seed=seed)
        self.batch_size = batch_size
        self.epoch = 0
        self.buffer = []

    def next(self):
        while len(self.buffer) < self.batch_size:
            self.sampler.set_epoch(self.epoch)
            self.buffer.extend(self.sampler)
            self.epoch += 1
        batch, self.buffer = self.buffer[:self.batch_size], self.buffer[self.batch_size:]
        return torch.tensor(batch)


def steps_for(num_items, batch_size, epochs):
    """Total optimisation steps: `epochs` passes of ceil(N / batch) steps each."""
    return epochs * math.ceil(num_items / batch_size)
