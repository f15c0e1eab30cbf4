"""EM cell membranes (paper, Table IV): the ISBI 2012 challenge reader and V^Rand / V^Info scoring."""
import numpy as np

from errors import UserError
from metrics import foreground_mask, rand_info_scores
from tasks.files import MASK_SUFFIXES, check_same_size, files_by_stem, image_files, read_array, read_class_map, \
    read_pairs, read_scan, require_dir, scan_to_rgb
from tasks.sample import Dataset, Sample
from tasks.splits import fold_names


def read_membrane_label(path):
    """ISBI 2012 labels are white (255) inside cells and black (0) on membranes; membrane = class 1."""
    return (read_class_map(path) == 0).astype(np.uint8)


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


def read_isbi2012(root, split, options):
    """ISBI 2012 EM: train-volume.tif + train-labels.tif, or images/ + labels/ with one file per slice.
    The challenge's test labels are secret, so the 30 training slices are cross-validated in contiguous
    blocks (FOLD 0 of 5 = slices 0-5 for testing)."""
    if (root / ISBI_VOLUME).is_file():
        samples = isbi_volume_samples(root)
        return [samples[name] for name in fold_names(list(samples), split, options, contiguous=True)]
    if not (root / "images").is_dir():
        raise UserError(f"neither {root / ISBI_VOLUME} nor a per-slice {root / 'images'} folder found; "
                        f"see docs/datasets.md for the ISBI 2012 layouts")
    image_dir = root / "images"
    label_dir = require_dir(root / "labels", "ISBI 2012 labels")
    images = image_files(image_dir, (".png", ".tif", ".tiff"))
    names = fold_names(list(images), split, options, contiguous=True)
    labels = files_by_stem(label_dir, MASK_SUFFIXES)
    return read_pairs(names, images, labels, label_dir, read_scan, read_membrane_label)


def score_cells(prob, sample, threshold):
    """EM cell contours (paper, Table IV): V^Rand and V^Info of the membrane map (probability above
    the threshold) against the labelled membranes, both thinned as in the ISBI 2012 challenge."""
    return rand_info_scores(foreground_mask(prob, threshold), sample.label == 1), None


NOTES = 'EM cell contours (paper Table IV): foreground-restricted V^Rand and V^Info of the ISBI 2012 challenge; predicted membrane = probability above the threshold, both membrane maps thinned to one pixel, segments = 4-connected regions between membranes.'

ISBI2012 = Dataset(read_isbi2012, num_classes=1, score=score_cells, notes=NOTES,
                   source="the ISBI 2012 EM challenge, http://brainiac2.mit.edu/isbi_challenge/")
