"""Your own data (--dataset folder): the folder layout of docs/folder_dataset.md, the classes its labels decide,
and binary or multi-class scoring.

    ROOT/train/images/<name>.<any image format>     ROOT/test/images/...   (optional: without it, k-fold over
    ROOT/train/labels/<name>.<lossless format>      ROOT/test/labels/...    train with FOLD and NUM_FOLDS)
    ROOT/train/masks/<name>.<lossless format>       ROOT/test/masks/...    (optional: region to score inside)

The classes are decided once, before training, from the labels of ROOT/train (or declared with FOLDER_CLASSES),
and recorded in the checkpoint as CLASS_VALUES, so test.py reads every label the way training did.
"""
import sys
from pathlib import Path

import numpy as np

from errors import UserError
from metrics import as_device_tensor, binary_metrics_and_roc, dice_coefficient, f1_by_threshold, nanmean_rows, \
    overlap_error, thin_curve
from tasks.files import IMAGE_SUFFIXES, MASK_SUFFIXES, check_same_size, files_by_stem, image_files, read_array, \
    read_mask
from tasks.pictures import UnreadableImage, read_picture_pages
from tasks.sample import Dataset, Sample
from tasks.splits import fold_names

LAYOUT = "ROOT/train/images and ROOT/train/labels (see docs/folder_dataset.md)"
LOSSY_SUFFIXES = tuple(suffix for suffix in IMAGE_SUFFIXES if suffix not in MASK_SUFFIXES)
# What may join an image's name to the ending its label's name adds (case1 -> case1_anno, "benign (1)_mask").
NAME_SEPARATORS = "_-. "

# More distinct values than this in the training labels is far more likely a grey picture (or a JPEG-smoothed
# mask) saved as a label than that many classes; a real many-class set declares its count (FOLDER_CLASSES).
MAX_INFERRED_CLASSES = 32
MAX_CLASSES = 256  # class maps are held as uint8


# --- the layout ----------------------------------------------------------------------------------------------

def split_folder(root, split):
    """(folder holding `split`'s files, whether the split is a fold of it): ROOT/test for the test split when
    there is a test folder, else ROOT/train, cut into folds when there is no test folder."""
    has_test = (root / "test").is_dir()
    if split == "test" and has_test:
        return root / "test", False
    return root / "train", not has_test


def require_folder(folder, what):
    if not folder.is_dir():
        extra = "; remove ROOT/test to test by k-fold over ROOT/train instead" if folder.parent.name == "test" else ""
        raise UserError(f"{what} folder {folder} not found: the folder dataset needs {LAYOUT}{extra}")
    return folder


def annotation_files(folder, what, images, announce=True, threshold=0):
    """{image name: path} of the lossless files in `folder` for `images` ({name: path}; see `paired_by_image`),
    refusing a lossy one: JPEG changes the stored values along every edge, which turns a class map into noise.
    With a label threshold (binary masks read as value >= threshold) JPEG files are read too: the threshold
    undoes the smearing of a 0/255 mask."""
    if threshold:
        return paired_by_image(files_by_stem(folder, IMAGE_SUFFIXES), images, folder, what, announce)
    lossy = files_by_stem(folder, LOSSY_SUFFIXES)
    found = files_by_stem(folder, MASK_SUFFIXES)
    for stem, path in lossy.items():
        if stem not in found:
            raise UserError(f"{what} {path} is a lossy {path.suffix} file, whose compression changes the values "
                            f"along every edge; if the {what}s are binary masks (Kvasir-SEG's are JPEG), read them "
                            f"with --label-threshold 128 (foreground where the value is at least 128), else save "
                            f"them losslessly (PNG) from their source")
    return paired_by_image(found, images, folder, what, announce)


def image_named_before(stem, image_names):
    """The longest image name that `stem` begins with, followed by a separator (``case1`` for ``case1_anno``,
    not ``case1`` for ``case10``), or None."""
    for end in range(len(stem) - 1, 0, -1):
        if stem[end] in NAME_SEPARATORS and stem[:end] in image_names:
            return stem[:end]
    return None


def paired_by_image(files, images, folder, what, announce=True):
    """{image name: path} of the annotation files of `folder` ({stem: path}) for `images` ({name: path}). An
    annotation pairs with the image of its own stem. When no image has one, but every file adds one fixed ending
    to its image's name (ISIC's ``ISIC_0000000_segmentation.png``, GlaS's ``train_1_anno.bmp``, DRIVE's
    ``21_training_mask.gif``), they pair by the name without that ending. Mixed endings stop with one line."""
    if any(name in files for name in images):
        return files
    tails = {}
    for stem in files:
        owner = image_named_before(stem, images)
        if owner is not None:
            tails.setdefault(stem[len(owner):], stem)
    if not tails:
        return files
    if len(tails) > 1:
        examples = ", ".join(f"{example} ({tail})" for tail, example in sorted(tails.items())[:3])
        raise UserError(f"the {what}s in {folder} add different endings to their image names: {examples}; keep "
                        f"one {what} per image, named as the image or as the image plus one ending for all")
    (tail,) = tails
    paired = {stem[:-len(tail)]: path for stem, path in files.items()
              if stem.endswith(tail) and stem[:-len(tail)] in images}
    missing = sorted(set(images) - set(paired))
    if missing:
        raise UserError(f"{what} for image {images[missing[0]]} missing: expected {folder / (missing[0] + tail)}"
                        f".png (or {', '.join(MASK_SUFFIXES[1:])}), named as the other {what}s are")
    if announce:
        print(f"folder dataset: {what}s in {folder} are named <image name>{tail}", file=sys.stderr)
    return paired


def paired_file(name, image_path, files, folder, what):
    if name not in files:
        raise UserError(f"{what} for image {image_path} missing: expected {folder / name}"
                        f" with one of {', '.join(MASK_SUFFIXES)}")
    return files[name]


def root_folders(root):
    """The training images and labels folders of a folder dataset, with one clear error for each missing part."""
    if not root.is_dir():
        raise UserError(f"folder dataset root {root} does not exist; put your data there as {LAYOUT}, "
                        f"or pass --data-root PATH")
    train = require_folder(root / "train", "training")
    return require_folder(train / "images", "training images"), require_folder(train / "labels", "training labels")


# --- reading -------------------------------------------------------------------------------------------------

def read_picture(path):
    """An image as RGB uint8, read as predict.py reads a new image (tasks.pictures): 8-bit files as stored,
    deeper ones (16-bit PNG, 16-bit or float TIFF) windowed to 8 bits per image between their own percentiles,
    as the CT readers do, so a 12-bit scan is not clipped to white."""
    try:
        pages = read_picture_pages(path)
    except UnreadableImage as error:
        raise UserError(f"{error}. Replace the file with an intact copy.")
    if len(pages) != 1:
        raise UserError(f"image {path} holds {len(pages)} pages; a training image is one picture: save each page "
                        f"as its own file (with its own label)")
    return pages[0]


def read_stored_label(path, threshold=0):
    """A label's stored values as an (H, W) integer array. A colour label counts a pixel by its strongest channel
    (a red-on-black mask reads as its red values), unless that would merge two of its colours into one class.
    With `threshold` > 0 the label is a binary mask: 1 where that value is at least `threshold`, else 0."""
    array = read_array(path)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        colour = array[..., :3]
        strongest = colour.max(axis=-1)
        # A binary mask read at a threshold needs no class per colour (and a lossy file has smeared its colours).
        if not threshold and distinct_colours(colour) > len(np.unique(strongest)):
            raise UserError(f"label {path} is a colour image whose colours would merge into one class (e.g. pure "
                            f"red and pure green); save it as a grey or palette image of one value per class")
        array = strongest
    if array.ndim != 2:
        raise UserError(f"label {path} has shape {array.shape}; expected one 2-D label image")
    if threshold:
        return (array >= threshold).astype(np.uint8)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.round(array)):
            raise UserError(f"label {path} holds fractional values ({array.dtype}); a label stores one whole "
                            f"number per class")
        array = array.astype(np.int64)
    return array


def distinct_colours(colour):
    if colour.dtype == np.uint8:
        codes = (colour[..., 0].astype(np.uint32) << 16) | (colour[..., 1].astype(np.uint32) << 8) | colour[..., 2]
        return len(np.unique(codes))
    return len(np.unique(colour.reshape(-1, 3), axis=0))


def stored_values(array):
    """The distinct values of an integer label; a histogram for 8-bit labels, much faster than sorting."""
    if array.dtype == np.uint8:
        return set(np.flatnonzero(np.bincount(array.ravel(), minlength=256)).tolist())
    return set(np.unique(array).tolist())


def is_binary(values):
    """Two classes with 0 as background: every nonzero stored value is foreground, the rule of every reader here
    (so labels saved as 0/1 and as 0/255 read the same, whatever the training labels held)."""
    return len(values) == 2 and values[0] == 0


def to_classes(stored, values, path):
    """Stored label values -> class map 0..K-1 (the index of each value in `values`), one clear error for a
    value that is none of the classes."""
    if is_binary(values):
        return (stored != 0).astype(np.uint8)
    table = np.asarray(values)
    index = np.minimum(np.searchsorted(table, stored), len(table) - 1)
    outside = table[index] != stored
    if outside.any():
        raise UserError(f"label {path} has value {int(stored[outside][0])}, which is none of the "
                        f"{describe_values(values)}; fix the annotation, or declare the classes with "
                        f"--folder-classes K (labels 0..K-1, docs/folder_dataset.md)")
    return index.astype(np.uint8)


def read_region(path, image, image_path, threshold=0):
    region = read_stored_label(path, threshold).astype(bool) if threshold else read_mask(path)
    check_same_size(image, region, image_path, path)
    if not region.any():
        raise UserError(f"mask {path} has no pixel inside (all 0), so nothing of {image_path} could be scored; "
                        f"mark the region to score with nonzero values")
    return region


def read_sample(name, image_path, label_path, mask_path, values, threshold=0):
    image = read_picture(image_path)
    stored = read_stored_label(label_path, threshold)
    check_same_size(image, stored, image_path, label_path)
    region = read_region(mask_path, image, image_path, threshold) if mask_path is not None else None
    return Sample(name, image, to_classes(stored, values, label_path), region)


def read_folder(root, split, options):
    """The samples of `split` (docs/folder_dataset.md): ROOT/test when there is one, else fold FOLD of NUM_FOLDS
    of ROOT/train; labels read with the classes a checkpoint recorded (CLASS_VALUES), else decided now."""
    root = Path(root)
    threshold = options.label_threshold
    check_threshold(threshold, 0)
    values = tuple(options.class_values) or decide_classes(root, options.folder_classes, threshold)
    folder, as_fold = split_folder(root, split)
    image_dir = require_folder(folder / "images", f"{folder.name} images")
    label_dir = require_folder(folder / "labels", f"{folder.name} labels")
    images = image_files(image_dir, IMAGE_SUFFIXES)
    labels = annotation_files(label_dir, "label", images, threshold=threshold)
    mask_dir = folder / "masks"
    masks = annotation_files(mask_dir, "mask", images, threshold=threshold) if mask_dir.is_dir() else None
    names = fold_names(list(images), split, options) if as_fold else sorted(images)
    samples = []
    for name in names:
        label_path = paired_file(name, images[name], labels, label_dir, "label")
        mask_path = paired_file(name, images[name], masks, mask_dir, "mask") if masks is not None else None
        samples.append(read_sample(name, images[name], label_path, mask_path, values, threshold))
    return samples


# --- classes -------------------------------------------------------------------------------------------------

def check_declared(count):
    if count != 0 and not 2 <= count <= MAX_CLASSES:
        raise UserError(f"--folder-classes {count} is out of range: it must be 0 (decided by the labels) or "
                        f"2..{MAX_CLASSES} (the number of classes, background included)")


def check_threshold(threshold, declared):
    if threshold < 0:
        raise UserError(f"--label-threshold {threshold} is out of range: 0 reads labels as stored, T > 0 reads "
                        f"binary masks (foreground where the value is at least T, e.g. 128 for 0/255 masks)")
    if threshold and declared not in (0, 2):
        raise UserError(f"--label-threshold {threshold} reads binary masks, but --folder-classes {declared} "
                        f"declares {declared} classes; drop one of the two")


def decide_classes(root, declared=0, threshold=0):
    """The stored label values of classes 0..K-1 (sorted). `declared` K >= 2 (FOLDER_CLASSES) means labels hold
    0..K-1; 0 decides from every label of ROOT/train (all folds, so each fold of a k-fold run gets the same
    classes): a single nonzero value makes a binary task, more make one class per distinct value. A label
    `threshold` (LABEL_THRESHOLD) makes a binary task of masks read as value >= threshold: classes (0, 1)."""
    check_declared(declared)
    check_threshold(threshold, declared)
    if declared and not threshold:
        return tuple(range(declared))
    image_dir, label_dir = root_folders(Path(root))
    images = image_files(image_dir, IMAGE_SUFFIXES)
    labels = annotation_files(label_dir, "label", images, announce=False, threshold=threshold)
    found = set()
    for name, image_path in images.items():
        label_path = paired_file(name, image_path, labels, label_dir, "label")
        found |= stored_values(read_stored_label(label_path, threshold))
    foreground = sorted(found - {0})
    if not foreground:
        reached = f" at --label-threshold {threshold} (no stored value reaches it)" if threshold else ""
        raise UserError(f"every label in {label_dir} is 0 (background only){reached}, so there is nothing to "
                        f"learn; check that they are the right files")
    if len(foreground) == 1:
        return (0, foreground[0])
    values = tuple(sorted(found))
    if len(values) > MAX_INFERRED_CLASSES:
        shown = ", ".join(str(value) for value in values[:6])
        raise UserError(f"the labels in {label_dir} hold {len(values)} distinct values ({shown}, ...): are they "
                        f"grey pictures or JPEG-smoothed masks (binary masks: --label-threshold 128)? If there "
                        f"really are {len(values)} classes, store them as 0..{len(values) - 1} and pass "
                        f"--folder-classes {len(values)}")
    return values


def describe_values(values):
    if is_binary(values):
        return "2 classes (binary: 0 is background, any other value foreground)"
    mapping = ", ".join(f"{value} -> {index}" for index, value in enumerate(values))
    return f"{len(values)} classes of the stored label values ({mapping})"


def announce_classes(root, options):
    """`decide_classes` for training (the registry's hook), saying what it decided: a multi-class mapping of
    0/128/255 to classes 0/1/2 should never be a surprise."""
    values = decide_classes(root, options.folder_classes, options.label_threshold)
    how = f"--folder-classes {options.folder_classes}" if options.folder_classes else "the training labels"
    if options.label_threshold:
        how += f" read as binary masks at --label-threshold {options.label_threshold} (value >= it is foreground)"
    print(f"folder dataset: {describe_values(values)}, from {how}", file=sys.stderr)
    return values


# --- scoring -------------------------------------------------------------------------------------------------

def overlaps(predicted, truth):
    """Dice and IoU (= 1 - overlap error) of two boolean masks; NaN when both are empty (nothing to agree on),
    so an absent class is left out of the means rather than counted as perfect."""
    if not predicted.any() and not truth.any():
        return float("nan"), float("nan")
    return dice_coefficient(predicted, truth), 1.0 - overlap_error(predicted, truth)


def regions(sample):
    """(key prefix, pixels to score) pairs: the whole image alone, or the whole image and inside the mask."""
    if sample.fov is None:
        return [("", None)]
    return [("whole ", None), ("ROI ", sample.fov)]


def score_binary(prob, sample, threshold):
    """AUC, Acc, Sen, Spe, F1, Dice and IoU; the ROC curve inside the mask when there is one."""
    foreground = prob[0].float()
    label = as_device_tensor(sample.label > 0, foreground.device)
    predicted, truth = (foreground > threshold).cpu().numpy(), sample.label > 0
    row, curve = {}, None
    for prefix, region in regions(sample):
        where = None if region is None else as_device_tensor(region, foreground.device)
        scores, (fpr, tpr) = binary_metrics_and_roc(foreground, label, where, threshold)
        inside = slice(None) if region is None else region
        scores["Dice"], scores["IoU"] = overlaps(predicted[inside], truth[inside])
        row.update({prefix + key: value for key, value in scores.items()})
        curve = (*thin_curve(fpr, tpr), scores["AUC"])
    return row, curve


def f1_by_threshold_in_region(prob, sample, thresholds):
    """score_binary's F1 at each of `thresholds`, inside the image's mask when it has one (Dataset.f1_by_threshold)."""
    foreground = prob[0].float()
    label = as_device_tensor(sample.label > 0, foreground.device)
    prefix, region = regions(sample)[-1]
    where = None if region is None else as_device_tensor(region, foreground.device)
    return prefix + "F1", f1_by_threshold(foreground, label, where, thresholds)


def score_classes(prob, sample):
    """Dice and IoU of each foreground class 1..K-1 of the argmax class map, and their mean."""
    predicted = prob.argmax(0).cpu().numpy()
    row = {}
    for prefix, region in regions(sample):
        inside = slice(None) if region is None else region
        guess, truth = predicted[inside], sample.label[inside]
        pairs = [overlaps(guess == index, truth == index) for index in range(1, prob.shape[0])]
        for position, name in enumerate(("Dice", "IoU")):
            values = np.array([pair[position] for pair in pairs], np.float64)
            row.update({f"{prefix}{name} {index}": float(value) for index, value in enumerate(values, start=1)})
            row[f"{prefix}mean {name}"] = float(nanmean_rows(values[None])[0])
    return row


def score_folder(prob, sample, threshold):
    if prob.shape[0] == 1:
        return score_binary(prob, sample, threshold)
    return score_classes(prob, sample), None


NOTES = ("Your own data (--dataset folder, docs/folder_dataset.md), at each image's native resolution. Binary: AUC of "
         "the probabilities, and Acc, Sen, Spe, F1, Dice and IoU of the mask thresholded as stated. Multi-class: "
         "Dice and IoU of each foreground class c of the argmax class map ('Dice c', 'IoU c'; classes numbered as "
         "the run's CLASS_VALUES map the stored label values) and their mean over the classes; background (class 0) "
         "is not scored on its own. With masks, 'ROI' counts only the pixels inside an image's mask and 'whole' "
         "every pixel. A class absent from both an image's annotation and its prediction has no Dice or IoU there "
         "(null, left out of the means).")

FOLDER = Dataset(read_folder, num_classes=0, score=score_folder, notes=NOTES, label_values=announce_classes,
                 f1_by_threshold=f1_by_threshold_in_region,
                 source=f"your own images and labels, laid out as {LAYOUT}")
