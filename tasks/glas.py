"""GlaS gland instance segmentation (MICCAI 2015 challenge; FullNet's own task): reader, instance maps from the
probability map (glands here; nuclei for tasks/monuseg.py), and the challenge's object-level scores.

Layout (the challenge's distribution, one folder): `train_N.bmp` with its instance map `train_N_anno.bmp`
(0 = background, each gland its own value), and the two test parts `testA_N.bmp` / `testA_N_anno.bmp` and
`testB_N.bmp` / `testB_N_anno.bmp`. The network learns gland vs background; objects are the connected
components of its thresholded prediction.
"""
import re
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from errors import UserError
from metrics import object_dice, object_f1, object_hausdorff
from tasks.files import check_same_size, read_array, read_image, require_dir
from tasks.sample import Dataset, Sample

# Connected components smaller than this (pixels) are dropped from a predicted instance map: specks, not glands.
MIN_OBJECT_AREA = 100
# The same for nuclei, which are far smaller (MoNuSeg's mean about 400 px at 40x): FullNet's authors drop
# predicted nuclei under 20 px.
MIN_NUCLEUS_AREA = 20
# Seeds of the optional watershed split of touching nuclei: maxima of the distance to the background that stand
# at least this many pixels above the saddle towards a neighbour, i.e. a neck that much narrower than either part.
# Measured on the 13 annotated MoNuSeg training tiles, splitting their true foreground: AJI 0.839 at depth 1,
# 0.823 at 2, 0.795 at 3, against 0.678 for its connected components (docs/datasets.md).
SEED_DEPTH = 1.0
EIGHT_CONNECTED = np.ones((3, 3), bool)
SPLIT_PREFIXES = {"train": ("train",), "test": ("testA", "testB")}
NAME = re.compile(r"^(train|testA|testB)_(\d+)\.bmp$")


def read_glas(root, split, options):
    """Every image of `split` ("train": train_*; "test": testA_* then testB_*) with its instance map."""
    folder = require_dir(Path(root), "GlaS")
    prefixes = SPLIT_PREFIXES[split]
    found = {}
    for path in folder.iterdir():
        match = NAME.match(path.name)
        if match and match.group(1) in prefixes:
            found[(prefixes.index(match.group(1)), int(match.group(2)))] = path
    if not found:
        raise UserError(f"no {' or '.join(p + '_N.bmp' for p in prefixes)} images in {folder} (GlaS layout: "
                        f"train_1.bmp with train_1_anno.bmp, testA_1.bmp with testA_1_anno.bmp, ...)")
    samples = []
    for key in sorted(found):
        image_path = found[key]
        anno_path = image_path.with_name(image_path.stem + "_anno.bmp")
        if not anno_path.is_file():
            raise UserError(f"annotation {anno_path} missing for image {image_path}")
        image, instances = read_image(image_path), read_array(anno_path)
        if instances.ndim == 3:  # an annotation saved as RGB: the instance ids sit in every channel
            instances = instances[..., 0]
        check_same_size(image, instances, image_path, anno_path)
        instances = instances.astype(np.int64)
        samples.append(Sample(image_path.stem, image, (instances > 0).astype(np.uint8),
                              instances=instances))
    return samples


def instances_from_probability(prob, threshold=0.5, min_area=MIN_OBJECT_AREA):
    """(H, W) int64 instance map from a (1, H, W) probability map: threshold, drop 8-connected components
    smaller than `min_area` pixels, number the rest 1, 2, ..."""
    return numbered_components(foreground_of(prob, threshold), min_area)


def nuclei_from_probability(prob, threshold=0.5, min_area=MIN_NUCLEUS_AREA, split_touching=False):
    """(H, W) int64 nucleus instance map from a (1, H, W) probability map, FullNet's nuclei post-processing on a
    binary prediction: threshold, fill holes (a nucleus with a pale centre is still one solid nucleus), drop
    8-connected components under `min_area` pixels, number the rest 1, 2, ... With `split_touching`, each
    remaining component is cut by a seeded watershed (`split_touching_nuclei`) before numbering."""
    foreground = ndimage.binary_fill_holes(foreground_of(prob, threshold))
    instances = numbered_components(foreground, min_area)
    if split_touching:
        instances = split_touching_nuclei(instances > 0)
    return instances


def foreground_of(prob, threshold):
    return (torch.as_tensor(prob)[0] > threshold).cpu().numpy()


def numbered_components(foreground, min_area):
    """The 8-connected components of a bool map with at least `min_area` pixels, numbered 1, 2, ... in scan
    order; the smaller ones become background."""
    components, count = ndimage.label(foreground, structure=EIGHT_CONNECTED)
    if count == 0:
        return components.astype(np.int64)
    areas = np.bincount(components.ravel(), minlength=count + 1)
    keep = areas >= min_area
    keep[0] = False
    renumbered = np.zeros(count + 1, np.int64)
    renumbered[keep] = np.arange(1, int(keep.sum()) + 1)
    return renumbered[components]


def split_touching_nuclei(foreground):
    """A seeded watershed of a bool nuclei map, numbered 1, 2, ...: the distance to the background has one
    maximum per round nucleus, and two touching nuclei meet at a neck where it dips. Seeds are the maxima at
    least SEED_DEPTH px above that dip (h-maxima); each seed floods the negated distance within the
    foreground, so blobs are cut along their necks. A blob too thin for any seed stays whole."""
    distance = ndimage.distance_transform_edt(foreground)
    seeds, count = ndimage.label(h_maxima(distance, SEED_DEPTH).astype(bool) & foreground,
                                 structure=EIGHT_CONNECTED)
    blobs, _ = ndimage.label(foreground, structure=EIGHT_CONNECTED)
    seeded = np.unique(blobs[seeds > 0])
    unseeded = foreground & ~np.isin(blobs, seeded)
    seeds[unseeded] = count + blobs[unseeded]
    flooded = watershed(-distance, seeds, mask=foreground, connectivity=2)
    values, numbered = np.unique(flooded, return_inverse=True)
    numbered = numbered.reshape(flooded.shape).astype(np.int64)
    return numbered if values[0] == 0 else numbered + 1  # an image that is all nucleus has no 0 to keep


def score_glands(prob, sample, threshold):
    """The GlaS challenge's object-level F1, object Dice and object Hausdorff distance (pixels) of the predicted
    instance map against the annotated one."""
    truth = sample.instances if sample.instances is not None else ndimage.label(sample.label > 0)[0]
    predicted = instances_from_probability(prob, threshold)
    row = {"object F1": object_f1(predicted, truth), "object Dice": object_dice(predicted, truth),
           "object Hausdorff": object_hausdorff(predicted, truth)}
    return row, None


NOTES = ("GlaS challenge object-level scores against the annotated instance maps: objects are the 8-connected "
         f"components of the thresholded prediction of at least {MIN_OBJECT_AREA} pixels; object F1 (a "
         "segmented object covering at least half of its best-overlapping gland is a hit), object Dice and "
         "object Hausdorff distance (pixels), each weighted by object area as the challenge defines them.")

GLAS = Dataset(read_glas, num_classes=1, score=score_glands, notes=NOTES,
               source="GlaS (MICCAI 2015 Gland Segmentation Challenge, Warwick-QU), "
                      "https://warwick.ac.uk/fac/cross_fac/tia/data/glascontest")
