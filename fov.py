"""The field of view (FOV) of a fundus photograph: the lit disc of retina inside the camera's black surround.

One method for every place that needs a FOV and has no mask file (CHASE_DB1 ships none, predict.py's
--fov auto, --scale auto):

1. threshold the red channel at 15 % of the way from its 1st to its 99th percentile: the retina is
   red-dominant everywhere, including dark vessels and the fovea, while the surround is near black
   (DRIVE: red about 8 outside, above 70 inside);
2. a morphological opening (radius about 1/190 of the shorter side, 3 px on DRIVE) removes JPEG noise and
   the camera's text labels;
3. the largest connected component is the FOV, with its holes filled (a dark lesion is still retina);
4. an erosion of about 1/565 of the shorter side (1 px on DRIVE) drops the dim rim that some cameras
   light just outside the aperture. Measured on DRIVE's 20 test masks, larger erosions lose more of the
   FOV than they remove rim (2 px: mean Dice 0.993, 6 px: 0.978; 1 px: 0.996).

A photograph whose shorter side exceeds WORKING_SIDE is measured on a copy reduced by a whole factor, and
the mask resized back. An image with no recognisable FOV (grey, all black, all white, or nothing bright covering at least
MIN_FOV_FRACTION of it) gets an all-True mask: every pixel counts, as if the image had no surround.
"""
import math

import numpy as np
from PIL import Image
from scipy import ndimage

from errors import UserError

THRESHOLD_FRACTION = 0.15   # of the way from the red channel's 1st to its 99th percentile
MIN_CONTRAST = 10           # grey levels between those percentiles below which nothing stands out
MIN_FOV_FRACTION = 0.05     # a smaller bright region is a speck, not a field of view
OPENING_PER_SIDE = 1 / 190  # opening radius, as a fraction of the shorter image side
EROSION_PER_SIDE = 1 / 565  # erosion radius, likewise
WORKING_SIDE = 1024         # a photograph with a longer shorter side is measured reduced to about this

# The FOV diameter of DRIVE (fov_diameter of each test/mask/*_test_mask.gif), the size --scale auto
# brings other fundus images to. Measured with
#   python -c "import fov, glob, tasks.files as f; print(sorted(fov.fov_diameter(f.read_mask(p))
#              for p in glob.glob('/work/shared/DRIVE/test/mask/*.gif')))"
# 535 to 541 px over the 20 masks (median 540), in 565 x 584 images.
DRIVE_FOV_DIAMETER = 540

# The EVAL_SCALE rules that derive each image's scale from its field of view (the others are numbers):
# "auto" matches FOV diameters, "field" also the cameras' field angles (evaluation.evaluation_scales).
FOV_SCALE_RULES = ("auto", "field")


# Erosion and dilation by a disc (a square would cut the FOV's curve) through Euclidean distance transforms:
# the same pixels as ndimage.binary_erosion / binary_dilation with a disc, at a cost that does not grow with
# the radius (an opening of radius 15 on a 3000 x 2900 photograph: 2 s, against 8 s for binary_opening).

def erode(mask, radius):
    """Pixels whose every neighbour within `radius` is in `mask` (outside the image counts as outside)."""
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    return distance > radius


def dilate(mask, radius):
    """Pixels within `radius` of `mask`."""
    if not mask.any():
        return mask
    return ndimage.distance_transform_edt(~mask) <= radius


def estimate_fov(image):
    """(H, W) bool, True inside the field of view of an (H, W, 3) uint8 RGB fundus image (see the
    module docstring for the method; all True when no FOV stands out)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] < 3:
        raise UserError(f"a field of view is estimated from an RGB image; got shape {image.shape}")
    height, width = image.shape[:2]
    factor = math.ceil(min(height, width) / WORKING_SIDE)
    if factor == 1:
        return estimate_at_this_size(image)
    # A large photograph is measured at 1/factor of its size (box-averaged) and the mask brought back with a
    # bilinear resize: the edge moves by well under `factor` pixels, and a 3000-px image takes 0.3 s, not 5 s.
    small = np.asarray(Image.fromarray(np.ascontiguousarray(image[..., :3])).reduce(factor))
    mask = Image.fromarray(estimate_at_this_size(small).astype(np.uint8) * 255)
    return np.asarray(mask.resize((width, height), Image.BILINEAR)) > 127


def estimate_at_this_size(image):
    """The method of the module docstring on `image` as given, at its own resolution."""
    everything = np.ones(image.shape[:2], bool)
    red = image[..., 0].astype(np.float32)
    low, high = np.percentile(red, [1, 99])
    if high - low < MIN_CONTRAST:
        return everything
    bright = red > low + THRESHOLD_FRACTION * (high - low)
    side = min(image.shape[:2])
    opening = max(1, round(side * OPENING_PER_SIDE))
    bright = dilate(erode(bright, opening), opening)  # an opening: drops what a disc of that radius cannot fill
    labels, count = ndimage.label(bright)
    if count == 0:
        return everything
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    mask = ndimage.binary_fill_holes(labels == largest)
    mask = erode(mask, max(1, round(side * EROSION_PER_SIDE)))
    if mask.mean() < MIN_FOV_FRACTION:
        return everything
    return mask


def fov_diameter(mask):
    """The FOV's diameter in pixels: the longer side of the mask's bounding box. A fundus FOV is a disc,
    often cut flat at the top and bottom by the sensor but never stretched, so the longer side is the
    disc's diameter where an area-based figure (2 sqrt(area / pi)) would shrink with the cut."""
    mask = np.asarray(mask, bool)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return 0
    return int(max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1)


def scale_to_match(mask, reference_diameter=DRIVE_FOV_DIAMETER):
    """The resize factor that gives this image's FOV the diameter `reference_diameter` (> 1 enlarges)."""
    diameter = fov_diameter(mask)
    if diameter == 0:
        raise UserError("the field-of-view mask is empty, so there is no diameter to scale from; "
                        "check the mask or use --fov none")
    return reference_diameter / diameter
