"""Drishti-GS1 optic disc and cup (Sivaswamy et al., ISBI 2014): reader of the official archive, the disc
crop, and disc (E, Dice) or disc-and-cup (E, Dice, cup-to-disc ratio error) scoring.

The archive's layout (docs/datasets.md): Training/Images/drishtiGS_NNN.png with
Training/GT/drishtiGS_NNN/SoftMap/drishtiGS_NNN_ODsegSoftmap.png and ..._cupsegSoftmap.png, and the same
under Test/ with the annotations in Test/Test_GT/. A soft map stores, per pixel, the fraction of the four
experts who marked it as disc (or cup): 8-bit grey levels 0, 64, 128, 191 and 255 for 0 to 4 of 4.
"""
import sys

import numpy as np

from errors import UserError
from metrics import dice_coefficient, overlap_error
from tasks.files import check_same_size, read_class_map, read_image, require_dir
from tasks.optic_disc import brightest_point, pad_to, score_disc
from tasks.sample import Dataset, Sample

# The official split: the archive's Training/ (50 images) and Test/ (51) folders, with the folder that
# holds each one's annotations.
FOLDERS = {"train": ("Training", "GT"), "test": ("Test", "Test_GT")}
OFFICIAL_COUNTS = {"train": 50, "test": 51}

# A pixel is disc (cup) when at least half of the experts marked it: soft map >= 0.5, i.e. 2 of 4.
SOFT_THRESHOLD = 0.5

# Where the disc sits, as a fraction of (height, width): the mean centre of the disc (soft map >= 0.5) over
# the 50 training images (row 0.538 +- 0.047, column 0.487 +- 0.048). Drishti-GS1 is photographed centred
# on the disc, but the plain brightest-point rule of tasks/optic_disc.py still lands on a bright artefact
# near the border in 5 of the 101 images, and its 800 x 800 crop then misses part or all of the disc; searching
# for the brightest point only inside the crop-sized window around this prior keeps the whole disc in the
# crop of all 101 (measured on the GitHub copy named in docs/datasets.md).
DISC_PRIOR = (0.538, 0.487)

# --dataset picks the target: the disc alone (binary, the paper's optic-disc task) or disc and cup as
# three classes (0 background, 1 rim = disc outside the cup, 2 cup).
TARGETS = {"drishti": "disc", "drishti_cup": "disc and cup"}
RIM, CUP = 1, 2


def archive_root(root):
    """The folder holding Training/ and Test/: `root`, or the Drishti-GS1_files folder inside it (the
    archive unpacks as Drishti-GS1_files/Drishti-GS1_files/..., so up to two levels are looked through)."""
    for _ in range(3):
        if (root / "Training").is_dir() or (root / "Test").is_dir() or not (root / "Drishti-GS1_files").is_dir():
            return root
        root = root / "Drishti-GS1_files"
    return root


def read_soft_map(path):
    """A soft map as the fraction of experts, (H, W) float in [0, 1] (an 8-bit map divided by 255; a colour
    copy counts its strongest channel, as every annotation reader does)."""
    array = read_class_map(path)
    if array.dtype == bool:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float32) / np.iinfo(array.dtype).max
    return array.astype(np.float32)


def soft_map_path(gt_dir, name, kind):
    path = gt_dir / name / "SoftMap" / f"{name}_{kind}segSoftmap.png"
    if not path.is_file():
        raise UserError(f"soft map {path} missing for image {name}: Drishti-GS1 names it "
                        f"{gt_dir.name}/{name}/SoftMap/{name}_{kind}segSoftmap.png")
    return path


def read_target(gt_dir, name, image, image_path, with_cup):
    """The class map of one image: the disc as 1 (soft map >= SOFT_THRESHOLD) and, `with_cup`, the cup as 2."""
    disc_path = soft_map_path(gt_dir, name, "OD")
    disc = read_soft_map(disc_path) >= SOFT_THRESHOLD
    check_same_size(image, disc, image_path, disc_path)
    label = disc.astype(np.uint8)
    if with_cup:
        cup_path = soft_map_path(gt_dir, name, "cup")
        cup = read_soft_map(cup_path) >= SOFT_THRESHOLD
        check_same_size(image, cup, image_path, cup_path)
        label[cup] = CUP  # a cup is part of the disc, even where an expert drew it a hair outside
    return label


def window_at(shape, centre, size):
    """(top, left) of the size x size window centred on `centre`, shifted to stay inside `shape`."""
    top = min(max(int(centre[0]) - size // 2, 0), max(shape[0] - size, 0))
    left = min(max(int(centre[1]) - size // 2, 0), max(shape[1] - size, 0))
    return top, left


def locate_disc(image, size):
    """(row, column) of the disc: the brightest point (tasks.optic_disc.brightest_point, sigma size / 20) of
    the size x size window around DISC_PRIOR, so a bright artefact far from the disc cannot win."""
    prior = (DISC_PRIOR[0] * image.shape[0], DISC_PRIOR[1] * image.shape[1])
    top, left = window_at(image.shape, prior, size)
    row, column = brightest_point(image[top:top + size, left:left + size], sigma=size / 20)
    return top + row, left + column


def crop_disc(image, label, size):
    """The size x size window of `image` and `label` centred on locate_disc, inside the image; an image smaller
    than the window is padded with black (background label) at the bottom and right first."""
    if size <= 0:
        raise UserError(f"crop size {size} must be positive (the paper uses 800)")
    centre = locate_disc(image, size)
    image, label = pad_to(image, size), pad_to(label, size)
    top, left = window_at(image.shape, centre, size)
    return image[top:top + size, left:left + size], label[top:top + size, left:left + size]


def read_drishti(root, split, options, with_cup):
    """Every image of the official `split` folder with its disc (and cup) target, cropped around the disc."""
    root = archive_root(root)
    folder, gt_folder = FOLDERS[split]
    image_dir = require_dir(root / folder / "Images", f"Drishti-GS1 {folder}/Images")
    gt_dir = require_dir(root / folder / gt_folder, f"Drishti-GS1 {folder}/{gt_folder}")
    image_paths = sorted(path for path in image_dir.glob("drishtiGS_*.png") if not path.name.startswith("."))
    if not image_paths:
        raise UserError(f"no drishtiGS_NNN.png images in {image_dir}")
    if len(image_paths) != OFFICIAL_COUNTS[split]:
        print(f"warning: {len(image_paths)} images in {image_dir}; the official Drishti-GS1 {folder} set has "
              f"{OFFICIAL_COUNTS[split]}", file=sys.stderr)
    samples = []
    for path in image_paths:
        image = read_image(path)
        label = read_target(gt_dir, path.stem, image, path, with_cup)
        image, label = crop_disc(image, label, options.crop_size)
        samples.append(Sample(path.stem, image, label))
    return samples


def vertical_extent(mask):
    rows = np.flatnonzero(mask.any(axis=1))
    return int(rows[-1] - rows[0] + 1) if rows.size else 0


def vertical_cdr(cup, disc):
    """Vertical cup-to-disc ratio: the cup's height over the disc's (rows spanned); NaN without a disc."""
    disc_height = vertical_extent(disc)
    return vertical_extent(cup) / disc_height if disc_height else float("nan")


def score_disc_and_cup(prob, sample, threshold):
    """Disc and cup from the argmax class map (disc = rim or cup): E and Dice of each, and the absolute error
    of the vertical cup-to-disc ratio against the annotation's. The threshold plays no part."""
    predicted = prob.argmax(0).cpu().numpy()
    disc, cup = predicted >= RIM, predicted == CUP
    true_disc, true_cup = sample.label >= RIM, sample.label == CUP
    return {"E disc": overlap_error(disc, true_disc), "Dice disc": dice_coefficient(disc, true_disc),
            "E cup": overlap_error(cup, true_cup), "Dice cup": dice_coefficient(cup, true_cup),
            "CDR error": abs(vertical_cdr(cup, disc) - vertical_cdr(true_cup, true_disc))}, None


def read_disc(root, split, options):
    return read_drishti(root, split, options, with_cup=False)


def read_disc_and_cup(root, split, options):
    return read_drishti(root, split, options, with_cup=True)


CROP_NOTE = ("images cropped to CROP_SIZE x CROP_SIZE (800) around the brightest point of the window around the "
             "training set's mean disc position, and scored on that crop at its native resolution")
DISC_NOTES = (f"Drishti-GS1 optic disc: overlap error E = 1 - |S∩G|/|S∪G| and Dice of the thresholded prediction; "
              f"ground truth = disc soft map >= 0.5 (at least 2 of the 4 experts); {CROP_NOTE}.")
CUP_NOTES = (f"Drishti-GS1 disc and cup (3 classes: background, rim, cup; argmax): E and Dice of the disc (rim + "
             f"cup) and of the cup, and |vCDR predicted - vCDR annotated|, the vertical cup-to-disc ratio as cup "
             f"height over disc height; ground truth = soft maps >= 0.5 (2 of 4 experts); {CROP_NOTE}.")
SOURCE = "Drishti-GS1, http://cvit.iiit.ac.in/projects/mip/drishti-gs/mip-dataset2/Home.php (registration)"

DRISHTI = Dataset(read_disc, num_classes=1, score=score_disc, notes=DISC_NOTES, source=SOURCE, family="optic disc")
DRISHTI_CUP = Dataset(read_disc_and_cup, num_classes=3, score=score_disc_and_cup, notes=CUP_NOTES, source=SOURCE,
                      family="optic disc and cup")
