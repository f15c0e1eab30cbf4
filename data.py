"""The loader and the augmentation: decoded datasets as in-memory tensors, the paper's augmentation
on whole batches, and the seeded stream of training batches.

Readers (tasks/) return `Sample`s at native resolution; this module turns them into uint8 tensors once,
either resized to a square IMAGE_SIZE (the paper) or kept at native resolution for random crops
(PATCH_SIZE). Augmentation runs on whole batches on the training device (GPU when there is one), so it
never starves the model: one affine resampling per batch covers the 8 dihedral variants, 90-110 %
scaling and the random shift (or the random crop position); HSV jitter follows on the image alone.
"""
import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)



IMAGENET_STD = (0.229, 0.224, 0.225)

# PREPROCESS's choices: how an image becomes the network's input. A model only means something with the
# preprocessing it was trained with, so checkpoints record it and test.py uses the recorded one.
PREPROCESSINGS = {
    "ours": "RGB, antialiased bilinear resize, ImageNet mean/std (the encoder's pretraining statistics)",
    "authors": "the CE-Net authors' released code: OpenCV's BGR channel order, OpenCV's own bilinear resize "
               "(cv2.resize, INTER_LINEAR: no antialiasing), x / 255 * 3.2 - 1.6",
    "clahe": "as ours, after contrast-limited adaptive histogram equalisation (CLAHE, scikit-image's defaults) "
             "of each of R, G and B at the image's decoded resolution: raises the local contrast of "
             "capillaries (not in the paper)",
}


# Augmentation magnitudes. The paper names the transforms but not their ranges beyond the scale;
# shift and colour ranges follow the authors' released code (shift 10 % of the side, hue ±30/180 of
# the colour circle, saturation ±5/255, value ±15/255).
SCALE_RANGE = (0.9, 1.1)
SHIFT_FRACTION = 0.1
HUE_SHIFT = 30 / 180
SATURATION_SHIFT = 5 / 255
VALUE_SHIFT = 15 / 255
# Elastic deformation ("elastic"; ELASTIC_ALPHA and ELASTIC_SPACING in constants.py): random displacements of a
# coarse grid of control points over the output window, interpolated bicubically to every pixel. U-Net's ISBI
# 2012 setting is a 3 x 3 grid with 10 px standard deviation; 128 px spacing is that grid on a 256 px crop.
ELASTIC_ALPHA = 10.0    # standard deviation (px) of each control point's displacement, per axis
ELASTIC_SPACING = 128   # largest distance (px) between neighbouring control points
# "camera": scale drawn log-uniformly over [1/f, f]. Cameras differ in pixels per degree of retina (DRIVE 540 px
# across 45 degrees, CHASE_DB1 about 915 across 30) and annotators in how wide they draw a vessel; a rescaling rule
# at prediction time (--eval-scale) matches the first only as well as its assumptions. On CHASE_DB1 the two rules'
# factors (FOV diameter alone, 0.59; with the field angles, 0.39) differ by 1.5, the range given here.
CAMERA_SCALE_FACTOR = 1.5
# "camera_photometric": "camera" plus what an HSV shift does not do to an image, and cameras and their settings
# do: a tone curve (gamma, log-uniform in [1/GAMMA_FACTOR, GAMMA_FACTOR]), a contrast change about the image's mean
# grey (factor uniform in CONTRAST_RANGE) and optical / compression softness (Gaussian blur, sigma uniform in
# [0, BLUR_SIGMA_MAX] px of the training crop). A thin vessel that one camera draws sharp another draws soft
# and fainter. The ranges were fixed from those effects' size, not tuned on a target dataset.
GAMMA_FACTOR = 1.5
CONTRAST_RANGE = (0.7, 1.3)
BLUR_SIGMA_MAX = 1.5

# AUGMENT's choices. "paper" applies every transform to every sample. "authors_code" follows the authors'
# released data.py: each transform with probability 0.5, an aspect-ratio jitter of +-10 % besides the
# scale, and the colour jitter before the geometric warp (so the black border stays black). "flips" keeps
# only the 8 dihedral variants: exact, label-preserving copies, which a short run from random weights
# learns from fastest (see recipes.py). "elastic" is the 8 flips plus a smooth random elastic deformation
# (`draw_displacements`), the augmentation of EM membrane work (Ciresan et al. 2012, U-Net 2015): cells bend
# and stretch from slice to slice, and a deformed membrane is still a membrane. "camera" is the paper's
# transforms with the scale widened to CAMERA_SCALE_FACTOR either way, for a model meant to meet other cameras;
# "camera_photometric" adds gamma, contrast and blur (`draw_photometric`).
AUGMENTATIONS = {
    "paper": {"flips": True, "scale_shift": True, "colour": True},
    "authors_code": {"flips": True, "scale_shift": True, "colour": True, "probability": 0.5, "aspect": 0.1,
                     "colour_first": True},
    "flips": {"flips": True, "scale_shift": False, "colour": False},
    "elastic": {"flips": True, "scale_shift": False, "colour": False, "elastic": True},
    "camera": {"flips": True, "scale_shift": True, "colour": True, "scale_factor": CAMERA_SCALE_FACTOR},
    "camera_photometric": {"flips": True, "scale_shift": True, "colour": True, "scale_factor": CAMERA_SCALE_FACTOR,
                           "photometric": True},
    "none": {"flips": False, "scale_shift": False, "colour": False},
}


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------

def check_image_size(size):
    if size <= 0 or size % 32:
        multiple = max(32, round(size / 32) * 32)
        raise UserError(f"image size {size} is not a positive multiple of 32 (the encoder halves it 5 times); "
                        f"use e.g. --image-size {multiple}")



def resize_image(image, size, preprocess="ours"):
    """(H, W, 3) uint8 array -> (3, size, size) uint8 tensor (size may also be a (height, width) pair),
    after the preprocessing's per-image step (`enhance`); bilinear: antialiased for "ours" and "clahe"; OpenCV's
    own cv2.resize for "authors" (`opencv_resize`)."""
    if preprocess == "authors":
        height, width = as_pair(size)
        resized = opencv_resize(enhance(image, preprocess), (height, width)).reshape(height, width, -1)
        return torch.from_numpy(resized).permute(2, 0, 1).contiguous()
    tensor = torch.from_numpy(np.ascontiguousarray(enhance(image, preprocess))).permute(2, 0, 1)[None].float()
    resized = F.interpolate(tensor, size=as_pair(size), mode="bilinear", antialias=True, align_corners=False)
    return resized[0].round().clamp(0, 255).to(torch.uint8)



def opencv_resize(array, shape):
    """`array` (H, W) or (H, W, C), uint8 or float32, resized to `shape` (height, width) by cv2.resize with its
    default INTER_LINEAR, as the authors' data.py and test_cenet.py resize images and maps: half-pixel centres,
    no antialiasing, the dtype kept. OpenCV itself rather than an emulation: it computes 8-bit images in fixed
    point, and a float emulation rounded to 8 bits differs from it by one grey level on about a tenth of the
    pixels of a DRIVE image. Float maps stay unrounded, as OpenCV returns them."""
    import cv2  # only the authors' way needs OpenCV; ours and clahe never load it
    height, width = as_pair(shape)
    return cv2.resize(np.ascontiguousarray(array), (width, height), interpolation=cv2.INTER_LINEAR)



def resize_label(label, size, num_classes):
    """Class map -> (size, size) uint8 (or a (height, width) pair). Binary maps are resampled smoothly then
    thresholded at one half, which keeps thin vessels connected better than nearest-neighbour; multi-class
    maps use nearest."""
    tensor = torch.from_numpy(np.ascontiguousarray(label))[None, None].float()
    if num_classes == 1:
        resized = F.interpolate(tensor, size=as_pair(size), mode="bilinear", align_corners=False) > 0.5
    else:
        resized = F.interpolate(tensor, size=as_pair(size), mode="nearest-exact")
    return resized[0, 0].to(torch.uint8)



def enhance(image, preprocess):
    """The per-image part of a preprocessing, on the decoded (H, W, 3) uint8 image: CLAHE for "clahe",
    nothing for the others (their whole work is the per-batch `normalize`)."""
    if preprocess != "clahe":
        return image
    from skimage import exposure
    channels = [exposure.equalize_adapthist(image[..., channel]) for channel in range(image.shape[-1])]
    return (np.stack(channels, -1) * 255).round().astype(np.uint8)



def as_pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)



def scaled_shape(shape, scale):
    """(height, width) of a native image shape resized by PATCH_SCALE `scale`."""
    return tuple(max(1, round(side * scale)) for side in shape[:2])



def stack_samples(samples, size, num_classes, preprocess="ours"):
    """Decode once: all images (N, 3, S, S) and labels (N, S, S) as uint8 tensors."""
    images = torch.stack([resize_image(sample.image, size, preprocess) for sample in samples])
    labels = torch.stack([resize_label(sample.label, size, num_classes) for sample in samples])
    return images, labels



def stack_native(samples, num_classes, scale=1.0, preprocess="ours"):
    """Decode once at native resolution, or resized by `scale` (PATCH_SCALE): images (N, 3, H, W) and labels
    (N, H, W) as uint8 tensors, each zero-padded at the bottom and right to the largest height and width of
    the set (DRIVE: all 584 x 565, no padding). Padding is black with background label, as pixels moved in
    by the augmentation are."""
    images, labels = zip(*(native_tensors(sample, num_classes, scale, preprocess) for sample in samples))
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    stacked_images = torch.zeros(len(samples), 3, height, width, dtype=torch.uint8)
    stacked_labels = torch.zeros(len(samples), height, width, dtype=torch.uint8)
    for index, (image, label) in enumerate(zip(images, labels)):
        rows, cols = label.shape
        stacked_images[index, :, :rows, :cols] = image
        stacked_labels[index, :rows, :cols] = label
    return stacked_images, stacked_labels



def native_tensors(sample, num_classes, scale=1.0, preprocess="ours"):
    """A sample's image (3, H, W) and label (H, W) as uint8 tensors, resized by `scale` unless it is 1."""
    if scale == 1:
        return (torch.from_numpy(np.ascontiguousarray(enhance(sample.image, preprocess))).permute(2, 0, 1),
                torch.from_numpy(np.ascontiguousarray(sample.label)).to(torch.uint8))
    shape = scaled_shape(sample.label.shape, scale)
    return resize_image(sample.image, shape, preprocess), resize_label(sample.label, shape, num_classes)



def stack_instances(samples, size=None, scale=1.0):
    """The samples' instance maps (N, H, W) int32 (0 = no instance), laid out as their labels are: resized to
    `size` (stack_samples) or by `scale` (stack_native), then zero-padded at the bottom and right to the
    largest height and width. Resizing is nearest-neighbour, since an id names an object and a blend of two ids
    would name a third."""
    maps = []
    for sample in samples:
        instances = torch.from_numpy(np.ascontiguousarray(sample.instances)).to(torch.int32)
        shape = as_pair(size) if size else scaled_shape(instances.shape, scale)
        if tuple(shape) != tuple(instances.shape):  # float32 holds every id below 2**24 exactly
            instances = F.interpolate(instances[None, None].float(), size=shape, mode="nearest-exact")[0, 0]
        maps.append(instances.to(torch.int32))
    stacked = torch.zeros(len(maps), max(m.shape[0] for m in maps), max(m.shape[1] for m in maps),
                          dtype=torch.int32)
    for index, instances in enumerate(maps):
        stacked[index, :instances.shape[0], :instances.shape[1]] = instances
    return stacked



def padded_side(height, width, multiple=32):
    """The smallest square side >= both sides that the encoder can halve five times."""
    return math.ceil(max(height, width) / multiple) * multiple



def pad_to_square(images, side):
    """(N, C, H, W) -> (N, C, side, side), zeros at the bottom and right (the original stays at [:H, :W])."""
    return F.pad(images, (0, side - images.shape[-1], 0, side - images.shape[-2]))



def normalize(images, preprocess="ours"):
    """uint8 or [0, 1] float RGB batch -> the network's input: ImageNet-normalised ("ours", and "clahe",
    whose equalisation `enhance` did at decoding), or BGR scaled to [-1.6, 1.6] ("authors": x / 255 * 3.2
    - 1.6)."""
    if images.dtype == torch.uint8:
        images = images.float() / 255
    if preprocess == "authors":
        return images.flip(1) * 3.2 - 1.6
    if preprocess not in ("ours", "clahe"):
        raise UserError(f"unknown preprocessing {preprocess!r}; choose one of: {', '.join(PREPROCESSINGS)}")
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

def random_affine(batch, generator, flips=True, scale_shift=True, aspect=0.0, probability=1.0, scale_factor=None):
    """Per-sample 2x3 matrices (output -> input, normalised coordinates): dihedral variant, scale uniform in
    SCALE_RANGE (or, with `scale_factor` f, log-uniform in [1/f, f], so that zooming in and out by the same
    ratio are equally likely), shift up to SHIFT_FRACTION of the side; with `aspect` a, the two axes are scaled by
    s * sqrt(r) and s / sqrt(r), r uniform in [1 - a, 1 + a]; scale and shift apply to a sample with
    `probability`. A part switched off is the identity; the numbers of the default parts are drawn either
    way, so switching one part off leaves the others' draws unchanged."""
    variants = torch.randint(0, 8, (batch,), generator=generator)
    if scale_factor is None:
        scales = torch.empty(batch).uniform_(*SCALE_RANGE, generator=generator)
    else:  # one draw per sample either way, so the draws after it are those of the uniform range
        log_factor = math.log(scale_factor)
        scales = torch.empty(batch).uniform_(-log_factor, log_factor, generator=generator).exp()
    # Normalised coordinates span 2 units per side, so a shift of f of the side is 2f units.
    shifts = torch.empty(batch, 2).uniform_(-2 * SHIFT_FRACTION, 2 * SHIFT_FRACTION, generator=generator)
    ratios = torch.empty(batch).uniform_(1 - aspect, 1 + aspect, generator=generator) if aspect \
        else torch.ones(batch)
    if probability < 1:
        skipped = torch.rand(batch, generator=generator) >= probability
        scales[skipped], ratios[skipped], shifts[skipped] = 1.0, 1.0, 0.0
    if not flips:
        variants.zero_()
    if not scale_shift:
        scales.fill_(1.0)
        ratios.fill_(1.0)
        shifts.zero_()
    axis_scales = torch.stack([scales * ratios.sqrt(), scales / ratios.sqrt()], dim=1)
    linear = DIHEDRAL_MATRICES[variants] / axis_scales[:, None, :]
    return torch.cat([linear, shifts[:, :, None]], dim=2)



def random_hsv_shifts(batch, generator, colour=True, probability=1.0):
    """Per-sample (hue, saturation, value) shifts, uniform within the limits above, applied to a sample
    with `probability` (zero shifts otherwise)."""
    limits = torch.tensor([HUE_SHIFT, SATURATION_SHIFT, VALUE_SHIFT])
    shifts = (torch.rand(batch, 3, generator=generator) * 2 - 1) * limits
    if probability < 1:
        shifts[torch.rand(batch, generator=generator) >= probability] = 0.0
    return shifts if colour else torch.zeros_like(shifts)



def draw_augmentation(count, generator, mode="paper"):
    """Random parameters for `count` samples under augmentation `mode` (a key of AUGMENTATIONS), drawn on
    the CPU from `generator`, so a seed gives the same augmentation on every device. The trainer draws a
    whole run's worth at once and uploads it once; a step then only slices device tensors and never waits
    on a host-to-GPU copy."""
    parts = augmentation_parts(mode)
    probability = parts.get("probability", 1.0)
    return (random_affine(count, generator, parts["flips"], parts["scale_shift"], parts.get("aspect", 0.0),
                          probability, parts.get("scale_factor")),
            random_hsv_shifts(count, generator, parts["colour"], probability))



def augmentation_mode(value):
    """AUGMENT as a key of AUGMENTATIONS: settings saved when it was on/off hold True / False (paper / none)."""
    if isinstance(value, bool):
        return "paper" if value else "none"
    return value



def augmentation_parts(mode):
    """Which transforms augmentation `mode` applies; one clear error for an unknown name."""
    if mode not in AUGMENTATIONS:
        raise UserError(f"unknown augmentation {mode!r}; choose one of: {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[mode]



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



def elastic_points(side, spacing=ELASTIC_SPACING):
    """Control points per side of a `side` px output window: evenly spread with the first and last on the
    window's corner pixels, at most `spacing` px apart, so P = ceil((side - 1) / spacing) + 1 (at least 2)."""
    return max(2, math.ceil((side - 1) / spacing) + 1)



def draw_displacements(count, side, generator, alpha=ELASTIC_ALPHA, spacing=ELASTIC_SPACING):
    """(count, 2, P, P) displacements in pixels, (x, y), of the P x P control points of `elastic_points` over a
    `side` px output window: independent draws from N(0, alpha^2), on the CPU from `generator` like the rest of
    the plan. alpha = 0 is the identity."""
    points = elastic_points(side, spacing)
    return torch.randn(count, 2, points, points, generator=generator) * alpha



def displacement_field(displacements, out_size, height, width):
    """The per-pixel offsets (B, out_size, out_size, 2) of control-point displacements (B, 2, P, P) in pixels
    of a height x width input: bicubic interpolation over the output window (the corner points on the corner
    pixels), then pixels to normalised input coordinates, which span 2 units per side: dx * 2 / width,
    dy * 2 / height."""
    field = F.interpolate(displacements, size=(out_size, out_size), mode="bicubic", align_corners=True)
    per_pixel = torch.tensor([2 / width, 2 / height], dtype=field.dtype, device=field.device)
    return field.permute(0, 2, 3, 1) * per_pixel



def apply_augmentation(images, labels, theta, hsv_shifts, out_size=None, colour_first=False, displacements=None):
    """Resample image and label through the same affine grid, and jitter the image's colour: after the
    resampling, or before it with `colour_first` (as the authors' code does: the border stays black).

    images: (B, 3, H, W) float in [0, 1]; labels: (B, H, W) integer class map; theta (B, 2, 3) and
    hsv_shifts (B, 3) on the images' device. The output is out_size x out_size (default: the input's
    size, which must then be square). Labels stay integer class maps (nearest-neighbour sampling);
    pixels moved in from outside the frame are black with background label. Labels of shape (B, M, H, W)
    are M maps moved through the same grid (a class map with its instance ids), returned in that shape.
    `displacements` (B, 2, P, P) pixels (draw_displacements) bend the grid elastically: each output pixel u
    samples the input at theta(u) + d(u), d the bicubic field of `displacement_field`, images and labels alike.
    """
    if out_size is None:
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"augmentation needs square images, got {tuple(images.shape[-2:])}")
        out_size = images.shape[-1]
    shape = [images.shape[0], images.shape[1], out_size, out_size]
    if colour_first:
        images = jitter_hsv(images, hsv_shifts)
    grid = F.affine_grid(theta.to(images.dtype), shape, align_corners=False)
    if displacements is not None:
        grid = grid + displacement_field(displacements.to(images.dtype), out_size, *images.shape[-2:])
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    maps = labels[:, None] if labels.ndim == 3 else labels
    moved = F.grid_sample(maps.to(images.dtype), grid, mode="nearest", padding_mode="zeros",
                          align_corners=False).round().to(labels.dtype)
    if not colour_first:
        images = jitter_hsv(images, hsv_shifts)
    return images, moved[:, 0] if labels.ndim == 3 else moved



def draw_photometric(count, generator):
    """(count, 3) per-sample (gamma, contrast, blur sigma in px) for `jitter_photometric`, within GAMMA_FACTOR,
    CONTRAST_RANGE and BLUR_SIGMA_MAX."""
    log_gamma = math.log(GAMMA_FACTOR)
    gammas = torch.empty(count).uniform_(-log_gamma, log_gamma, generator=generator).exp()
    contrasts = torch.empty(count).uniform_(*CONTRAST_RANGE, generator=generator)
    sigmas = torch.empty(count).uniform_(0.0, BLUR_SIGMA_MAX, generator=generator)
    return torch.stack([gammas, contrasts, sigmas], dim=1)



def gaussian_blur(images, sigmas, max_sigma=BLUR_SIGMA_MAX):
    """Each image of (B, C, H, W) blurred by a separable Gaussian of its own `sigmas` (B,) px, edges reflected;
    sigma 0 returns the image unchanged. The kernel reaches 3 `max_sigma` (at most to the image's edge, as
    reflection needs), fixed rather than read from `sigmas`: reading a device tensor would stall the host at every
    training step."""
    batch, channels, height, width = images.shape
    radius = max(1, min(math.ceil(3 * max_sigma), height - 1, width - 1))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    spread = sigmas.to(images.dtype).clamp_min(1e-3)[:, None]
    kernels = torch.exp(-offsets[None] ** 2 / (2 * spread ** 2))
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    kernels = kernels.repeat_interleave(channels, dim=0)[:, None]  # one kernel per (image, channel) group
    flat = F.pad(images.reshape(1, batch * channels, height, width), (radius, radius, radius, radius),
                 mode="reflect")
    flat = F.conv2d(flat, kernels[:, :, None, :], groups=batch * channels)
    flat = F.conv2d(flat, kernels[:, :, :, None], groups=batch * channels)
    return flat.view(batch, channels, height, width)



def jitter_photometric(images, parameters):
    """Images (B, 3, H, W) in [0, 1] through a camera's softness, contrast and tone curve, in that order (the
    optics before the electronics): blur by sigma, x -> m + c (x - m) with m the image's mean grey, then
    x -> x ** gamma; `parameters` (B, 3) rows (gamma, contrast, sigma) of `draw_photometric`."""
    parameters = parameters.to(images.dtype)
    gammas, contrasts = parameters[:, 0].view(-1, 1, 1, 1), parameters[:, 1].view(-1, 1, 1, 1)
    images = gaussian_blur(images, parameters[:, 2])
    means = images.mean(dim=(1, 2, 3), keepdim=True)
    images = (means + contrasts * (images - means)).clamp(0, 1)
    return images ** gammas



def augment(images, labels, generator, mode="paper"):
    """Augmentation `mode` on a batch (any device), parameters drawn from `generator` (elastic: at
    ELASTIC_ALPHA and ELASTIC_SPACING)."""
    theta, shifts = draw_augmentation(images.shape[0], generator, mode)
    parts = augmentation_parts(mode)
    displacements = draw_displacements(images.shape[0], images.shape[-1], generator).to(images.device) \
        if parts.get("elastic") else None
    images, labels = apply_augmentation(images, labels, theta.to(images.device), shifts.to(images.device),
                                        colour_first=parts.get("colour_first", False), displacements=displacements)
    if parts.get("photometric"):
        images = jitter_photometric(images, draw_photometric(images.shape[0], generator).to(images.device))
    return images, labels



# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------

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

