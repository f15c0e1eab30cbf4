"""EM cell membranes (paper, Table IV): the ISBI 2012 challenge reader, V^Rand / V^Info scoring, and the
membrane post-processings scoring may apply before thinning (POSTPROCESS)."""
from dataclasses import replace

import numpy as np
import torch
from scipy import ndimage
from skimage.segmentation import watershed

from errors import UserError
from metrics import foreground_mask, membrane_segments, rand_info_over_thresholds, rand_info_scores
from tasks.files import MASK_SUFFIXES, check_same_size, files_by_stem, image_files, is_grey, natural_key, \
    read_array, read_class_map, read_pairs, read_scan, require_dir, scan_to_rgb
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


def with_neighbours(pages):
    """(H, W, 3) uint8 images whose red, green and blue are the slice before, the slice itself and the one after,
    for grey `pages` in stack order; the first and last slices stand in for their missing neighbour. Sections of
    a serial EM stack lie 40-50 nm apart, so a membrane that is faint or oblique in one slice is often plain in
    the next: the two neighbours give a 2-D network that third dimension at no extra cost."""
    last = len(pages) - 1
    return [between(pages[index - 1] if index else None, page, pages[index + 1] if index < last else None)
            for index, page in enumerate(pages)]


def between(before, grey, after):
    """One stacked image: red the slice `before`, green `grey`, blue the slice `after`; a missing (None)
    neighbour is the slice itself. The one convention the reader and predict.py share."""
    return np.stack([grey if before is None else before, grey, grey if after is None else after], axis=-1)


def grey_slice(rgb, path):
    """The grey values of a slice read as RGB; a colour slice has no single grey to stack."""
    if not is_grey(rgb):
        raise UserError(f"{path} is a colour image; stacking neighbouring slices needs grey slices "
                        f"(use --dataset isbi2012 for colour images)")
    return rgb[..., 1]


def slice_files(root):
    """{stem: path} of the per-slice images in images/; where neither layout is there, one error naming both."""
    if not (root / "images").is_dir():
        raise UserError(f"neither {root / ISBI_VOLUME} nor a per-slice {root / 'images'} folder found; "
                        f"see docs/datasets.md for the ISBI 2012 layouts")
    return image_files(root / "images", (".png", ".tif", ".tiff"))


def read_isbi2012(root, split, options):
    """ISBI 2012 EM: train-volume.tif + train-labels.tif, or images/ + labels/ with one file per slice.
    The challenge's test labels are secret, so the 30 training slices are cross-validated in contiguous
    blocks (FOLD 0 of 5 = slices 0-5 for testing)."""
    if (root / ISBI_VOLUME).is_file():
        samples = isbi_volume_samples(root)
        return [samples[name] for name in fold_names(list(samples), split, options, contiguous=True)]
    images = slice_files(root)
    label_dir = require_dir(root / "labels", "ISBI 2012 labels")
    names = fold_names(list(images), split, options, contiguous=True)
    labels = files_by_stem(label_dir, MASK_SUFFIXES)
    return read_pairs(names, images, labels, label_dir, read_scan, read_membrane_label)


def read_isbi2012_stack(root, split, options):
    """As read_isbi2012, each slice's image made of it and its two neighbours (with_neighbours): the pages of
    train-volume.tif, or the files of images/ in natural order. A held-out slice's neighbours may be training
    slices: their pixels are input, their labels are not read for it."""
    if (root / ISBI_VOLUME).is_file():
        samples = list(isbi_volume_samples(root).values())
        stacked = with_neighbours([grey_slice(sample.image, root / ISBI_VOLUME) for sample in samples])
        chosen = set(fold_names([sample.name for sample in samples], split, options, contiguous=True))
        return [Sample(sample.name, image, sample.label)
                for sample, image in zip(samples, stacked) if sample.name in chosen]
    images = slice_files(root)
    names = sorted(images, key=natural_key)
    greys = [grey_slice(read_scan(images[name]), images[name]) for name in names]
    stacked = dict(zip(names, with_neighbours(greys)))
    label_dir = require_dir(root / "labels", "ISBI 2012 labels")
    chosen = fold_names(names, split, options, contiguous=True)
    return read_pairs(chosen, images, files_by_stem(label_dir, MASK_SUFFIXES), label_dir,
                      lambda path: stacked[path.stem], read_membrane_label)


# --- post-processing of the predicted membranes (POSTPROCESS) ---------------------------------------------
# A Rand score punishes topology: a gap of one pixel in a membrane merges two cells. Each choice turns the
# probability map into the membrane map that is thinned and scored.
POSTPROCESSINGS = {
    "none": "membranes = probability above the threshold",
    "closing": "membranes = probability above the threshold, closed with a 3x3 square (dilation then erosion), "
               "which bridges gaps of 1 px",
    "watershed": "membranes = the lines of a seeded watershed of the probability map: seeds = the 4-connected "
                 "components of confident cell interior (probability below WATERSHED_SEED, opened with a 3x3 "
                 "square), flooded over the probability (the threshold plays no part)",
}
SQUARE = np.ones((3, 3), bool)
SEED_LEVEL = 0.2  # WATERSHED_SEED's default: below it a pixel is confidently inside a cell


def closed_membranes(mask):
    """A bool membrane map closed with a 3x3 square. The edge is replicated outside the image first: the
    erosion would otherwise treat the outside as background and cut every membrane where it meets the border,
    merging the two cells it separates there."""
    padded = np.pad(mask, 1, mode="edge")
    return ndimage.binary_closing(padded, structure=SQUARE)[1:-1, 1:-1]


def watershed_membranes(prob, seed_level=SEED_LEVEL):
    """Membranes as watershed lines, bool (H, W), of an (H, W) membrane probability map: seeds = 4-connected
    components of (prob < seed_level) opened with a 3x3 square (which cuts bridges under 3 px wide between
    two cells' interiors), each flooding the probability landscape from its low ground (4-connected, as the
    segments are counted); where two floods meet is a line. A faint gap in a membrane still lies higher than
    the cells on its sides, so the line runs through it. No seed: no membrane (one segment)."""
    interior = ndimage.binary_opening(prob < seed_level, structure=SQUARE)
    seeds, count = ndimage.label(interior)
    if count == 0:
        return np.zeros(prob.shape, bool)
    return watershed(prob, seeds, connectivity=1, watershed_line=True) == 0


def membrane_map(prob, threshold, postprocess="none", watershed_seed=SEED_LEVEL):
    """The predicted membranes (H, W) bool of a (1, H, W) probability map under POSTPROCESS `postprocess`."""
    if postprocess not in POSTPROCESSINGS:
        raise UserError(f"unknown post-processing {postprocess!r}; choose one of: {', '.join(POSTPROCESSINGS)}")
    if postprocess == "watershed":
        return watershed_membranes(membrane_probability(prob), watershed_seed)
    mask = foreground_mask(prob, threshold)
    return closed_membranes(mask) if postprocess == "closing" else mask


def score_cells(prob, sample, threshold, postprocess="none", watershed_seed=SEED_LEVEL):
    """EM cell contours (paper, Table IV): V^Rand and V^Info of the membrane map (`membrane_map`: probability
    above the threshold, post-processed) against the labelled membranes, both thinned as in the ISBI 2012
    challenge; with a post-processing, also the raw map's ("VRand raw", "VInfo raw"); and the challenge
    leaderboard's figures, each score's maximum over the thresholds 0.05, 0.10, ..., 0.95 of the raw
    probability map with the threshold that gave it ("VRand max", "VRand max threshold", ...)."""
    truth = sample.label == 1
    row = rand_info_scores(membrane_map(prob, threshold, postprocess, watershed_seed), truth)
    if postprocess != "none":
        raw = rand_info_scores(foreground_mask(prob, threshold), truth)
        row.update({f"{name} raw": value for name, value in raw.items()})
    row.update(rand_info_over_thresholds(membrane_probability(prob), truth))
    return row, None


# --- where the topology fails: merges and splits ----------------------------------------------------------
# A predicted segment "takes part" in a true cell when it covers at least this share of the cell's pixels (and
# at least MIN_PART_PIXELS of them): smaller overlaps are a membrane drawn a few pixels off, which costs the
# Rand score little, not a cell lost or cut.
MIN_PART_SHARE = 0.2
MIN_PART_PIXELS = 50
MERGED_COLOUR = np.array([255, 150, 0], np.float32)
SPLIT_COLOUR = np.array([0, 170, 255], np.float32)
MERGED_AND_SPLIT_COLOUR = np.array([230, 60, 230], np.float32)


def merges_and_splits(pred_segments, true_segments):
    """The true cells (ids of `true_segments`, 0 = membrane) that the prediction merges and splits, as two
    sorted lists. Merged: the cell shares a predicted segment with another cell (that segment takes part in
    both). Split: two or more predicted segments take part in the cell. Both maps are label images as
    `membrane_segments` makes them; predicted membrane pixels (0) belong to no segment."""
    inside = (true_segments != 0) & (pred_segments != 0)
    pairs, counts = np.unique(np.stack([pred_segments[inside], true_segments[inside]]), axis=1, return_counts=True)
    cell_ids, cell_sizes = np.unique(true_segments[true_segments != 0], return_counts=True)
    size_of = dict(zip(cell_ids.tolist(), cell_sizes.tolist()))
    parts = [(int(pred), int(cell)) for (pred, cell), count in zip(pairs.T, counts)
             if count >= MIN_PART_PIXELS and count >= MIN_PART_SHARE * size_of[int(cell)]]
    cells_of_segment, segments_of_cell = {}, {}
    for pred, cell in parts:
        cells_of_segment.setdefault(pred, []).append(cell)
        segments_of_cell.setdefault(cell, []).append(pred)
    merged = sorted({cell for cells in cells_of_segment.values() if len(cells) > 1 for cell in cells})
    split = sorted(cell for cell, segments in segments_of_cell.items() if len(segments) > 1)
    return merged, split


def cell_errors_picture(prob, sample, threshold, postprocess="none", watershed_seed=SEED_LEVEL):
    """An RGB uint8 picture of where the membrane map of a (1, H, W) probability tensor (as score_cells scores it, thinned) fails the Rand score:
    true cells it merges with a neighbour tinted orange, cells it splits blue, cells both merged and split
    magenta, and the thinned predicted membranes white over the darkened slice. Returns (picture, number of
    merged cells, number of split cells)."""
    predicted = membrane_segments(membrane_map(prob, threshold, postprocess, watershed_seed))
    truth = membrane_segments(sample.label == 1)
    merged, split = merges_and_splits(predicted, truth)
    # Green is the slice itself (an isbi2012_stack image holds its neighbours in red and blue).
    picture = np.repeat(sample.image[..., 1:2], 3, axis=-1).astype(np.float32) * 0.55
    for cells, colour in ((set(merged) - set(split), MERGED_COLOUR), (set(split) - set(merged), SPLIT_COLOUR),
                          (set(merged) & set(split), MERGED_AND_SPLIT_COLOUR)):
        tinted = np.isin(truth, sorted(cells))
        picture[tinted] = 0.5 * picture[tinted] + 0.5 * colour
    picture[predicted == 0] = 255
    return picture.round().astype(np.uint8), len(merged), len(split)


def cell_pictures(prob, sample, threshold, postprocess="none", watershed_seed=SEED_LEVEL):
    """The extra pictures evaluation saves per slice: {"cells": cell_errors_picture}."""
    picture, _, _ = cell_errors_picture(prob, sample, threshold, postprocess, watershed_seed)
    return {"cells": picture}


def membrane_probability(prob):
    """The (H, W) float32 NumPy plane of a (1, H, W) probability map (tensor or array)."""
    return torch.as_tensor(prob)[0].float().cpu().numpy()


NOTES = ('EM cell contours (paper Table IV): foreground-restricted V^Rand and V^Info of the ISBI 2012 challenge; '
         'predicted membrane = probability above the threshold (after the post-processing the protocol names, if '
         'any; "raw": without it), both membrane maps thinned to one pixel (their edges replicated outwards first, '
         'so membranes still reach the image border), segments = 4-connected regions between membranes. "max": '
         'max over thresholds (the challenge leaderboard\'s), each slice at its own best threshold of 0.05, 0.10, '
         '..., 0.95 of the raw probability map, which that threshold column names.')

# Gu et al., IEEE TMI 2019, Table IV: scored by the challenge's organisers on its 30 test slices (labels never
# released), an ImageNet-pretrained encoder, trained on a GPU on all 30 training slices.
PAPER = {"source": "paper Table IV: the challenge's hidden test labels, ImageNet-pretrained encoder, GPU, "
                   "trained on all 30 slices (ours: 5-fold cross-validation over those 30, random weights, CPU)",
         "figures": {"unet": {"VRand": 0.9432, "VInfo": 0.9562}, "backbone": {"VRand": 0.9569, "VInfo": 0.9716},
                     "cenet": {"VRand": 0.9743, "VInfo": 0.9878}}}

ISBI2012 = Dataset(read_isbi2012, num_classes=1, score=score_cells, notes=NOTES, paper=PAPER,
                   source="the ISBI 2012 EM challenge, http://brainiac2.mit.edu/isbi_challenge/",
                   score_settings=("POSTPROCESS", "WATERSHED_SEED"), postprocessings=tuple(POSTPROCESSINGS),
                   extra_pictures=cell_pictures,
                   predicted_mask=membrane_map)

# The same slices, labels and scoring; each image holds the slice and its two neighbours (read_isbi2012_stack).
ISBI2012_STACK = replace(ISBI2012, reader=read_isbi2012_stack, scores_like="isbi2012", stacks_slices=True)
