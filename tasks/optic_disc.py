"""Optic disc (paper, Table I): ORIGA, Messidor and RIM-ONE readers, the paper's 800 x 800 crop
around the disc, and the overlap-error scoring. Layouts and sources: docs/datasets.md."""
import re

import numpy as np
from scipy import ndimage

from errors import UserError
from metrics import dice_coefficient, foreground_mask, overlap_error
from tasks.files import (IMAGE_SUFFIXES, MASK_SUFFIXES, TIFF_SUFFIXES, check_same_size, files_by_stem, image_files,
                         read_binary_label, read_image, read_pairs, require_dir)
from tasks.sample import Dataset, Sample
from tasks.splits import fold_names, listed_names, split_names


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


def crop_around_brightest(image, label, size=800):
    """The size x size window of `image` and `label` centred on the brightest point of the image
    (the optic disc in a fundus photograph), shifted to stay inside the image; an image smaller
    than the window is padded with black first. Smoothing uses sigma = size / 20 (40 px for the
    paper's 800), about the radius of a disc at the scale the crop size is chosen for."""
    row, column = brightest_point(image, sigma=size / 20)
    image, label = pad_to(image, size), pad_to(label, size)
    top = min(max(row - size // 2, 0), image.shape[0] - size)
    left = min(max(column - size // 2, 0), image.shape[1] - size)
    return image[top:top + size, left:left + size], label[top:top + size, left:left + size]


def disc_crop(size):
    if size <= 0:
        raise UserError(f"crop size {size} must be positive (the paper uses 800)")
    return lambda image, label: crop_around_brightest(image, label, size)


ORIGA_LISTS = {"train": "Set_A.txt", "test": "Set_B.txt"}


def read_origa(root, split, options):
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
    return read_pairs(names, images, masks, mask_dir, read_image, read_binary_label, disc_crop(options.crop_size))


def read_messidor(root, split, options):
    """Messidor: images/**/*.tif (the Base11..Base34 subfolders may stay), masks/<stem>.png|tif|bmp
    (University of Huelva disc annotations); train.txt/test.txt if present, else k-fold; disc crop."""
    image_dir = require_dir(root / "images", "Messidor images")
    mask_dir = require_dir(root / "masks", "Messidor masks")
    images = image_files(image_dir, TIFF_SUFFIXES, recursive=True)
    names = split_names(root, split, options, images, image_dir, ("train.txt", "test.txt"))
    masks = files_by_stem(mask_dir, MASK_SUFFIXES)
    return read_pairs(names, images, masks, mask_dir, read_image, read_binary_label, disc_crop(options.crop_size))


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


def read_rimone(root, split, options):
    """RIM-ONE r1: cropped disc images in diagnosis folders, five experts each; k-fold stratified by group."""
    records = rimone_records(root)
    groups = {name: group for name, (group, _, _) in records.items()}
    names = fold_names(list(records), split, options, groups=groups)
    return [read_rimone_sample(name, *records[name][1:]) for name in names]


def score_disc(prob, sample, threshold):
    """Optic disc (paper, Table I): overlap error E and Dice against the ground truth and, where the
    dataset has several experts (RIM-ONE), E against each expert's own mask as well."""
    predicted, truth = foreground_mask(prob, threshold), sample.label > 0
    row = {"E": overlap_error(predicted, truth), "Dice": dice_coefficient(predicted, truth)}
    for number, expert in enumerate(sample.experts if sample.experts is not None else (), start=1):
        row[f"E expert{number}"] = overlap_error(predicted, expert)
    return row, None


NOTES = "Optic disc (paper Table I): overlap error E = 1 - |S∩G|/|S∪G| and Dice of the thresholded prediction on the evaluated image (the 800 x 800 disc crop for ORIGA and Messidor); for RIM-ONE the ground truth is the experts' majority vote and 'E expertN' scores against expert N alone."

ORIGA = Dataset(read_origa, num_classes=1, score=score_disc, notes=NOTES,
                source="ORIGA (Singapore Eye Research Institute, on request; see docs/datasets.md)")
MESSIDOR = Dataset(read_messidor, num_classes=1, score=score_disc, notes=NOTES,
                   source="Messidor, https://www.adcis.net/en/third-party/messidor/ with the disc masks of the "
                          "University of Huelva (see docs/datasets.md)")
RIMONE = Dataset(read_rimone, num_classes=1, score=score_disc, notes=NOTES,
                 source="RIM-ONE release 1, University of La Laguna (see docs/datasets.md)")
