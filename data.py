"""Dataset readers, in-memory tensors and the paper's augmentation.

Every reader returns a list of `Sample`s at native resolution: an RGB uint8 image, an integer class
map (0 = background; 1 = foreground for binary tasks; 0..K-1 for multi-class) and, where the dataset
ships one, a field-of-view mask. `DATASETS` is the one table mapping a dataset name to its reader,
class count and evaluation task; adding a dataset means one reader and one entry there.

Augmentation runs on whole batches of tensors on the training device (GPU when there is one), so it
never starves the model: one affine resampling per batch covers the 8 dihedral variants, 90-110 %
scaling and the random shift; HSV jitter follows on the image alone.
"""
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

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


DATASETS = {
    "drive": DatasetSpec(read_drive, num_classes=1, task="vessel",
                         source="DRIVE, https://drive.grand-challenge.org (registration required)"),
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
        raise UserError(f"dataset root {root} does not exist. Get {settings['DATASET']} from {spec.source}, "
                        f"unpack it there, or pass --data-root PATH")
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


def normalize(images):
    """uint8 or [0, 1] float batch -> ImageNet-normalised float (the encoder's pretraining statistics)."""
    if images.dtype == torch.uint8:
        images = images.float() / 255
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


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
    offsets = hsv.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
    k = (offsets + hue[:, None] * 6) % 6
    ramp = torch.minimum(k, 4 - k).clamp(0, 1)
    return value[:, None] - value[:, None] * saturation[:, None] * ramp


# --------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------

def random_affine(batch, generator, geometric=True):
    """Per-sample 2x3 matrices (output -> input, normalised coordinates): dihedral variant, scale in
    SCALE_RANGE, shift up to SHIFT_FRACTION of the side. Drawn on the CPU from `generator`, so a seed
    gives the same augmentation on every device."""
    variants = torch.randint(0, 8, (batch,), generator=generator)
    scales = torch.empty(batch).uniform_(*SCALE_RANGE, generator=generator)
    # Normalised coordinates span 2 units per side, so a shift of f of the side is 2f units.
    shifts = torch.empty(batch, 2).uniform_(-2 * SHIFT_FRACTION, 2 * SHIFT_FRACTION, generator=generator)
    if not geometric:
        scales.fill_(1.0)
        shifts.zero_()
    linear = DIHEDRAL_MATRICES[variants] / scales.view(-1, 1, 1)
    return torch.cat([linear, shifts[:, :, None]], dim=2), variants


def jitter_hsv(images, generator):
    """Shift hue (circularly), saturation and value of each image by a random amount."""
    batch = images.shape[0]
    limits = torch.tensor([HUE_SHIFT, SATURATION_SHIFT, VALUE_SHIFT])
    shifts = (torch.rand(batch, 3, generator=generator) * 2 - 1) * limits
    hsv = rgb_to_hsv(images)
    shifts = shifts.to(images.device, images.dtype).view(batch, 3, 1, 1)
    hue = (hsv[:, :1] + shifts[:, :1]) % 1.0
    rest = (hsv[:, 1:] + shifts[:, 1:]).clamp(0, 1)
    return hsv_to_rgb(torch.cat([hue, rest], 1)).clamp(0, 1)


def augment(images, labels, generator, geometric=True, colour=True):
    """The paper's augmentation on a batch, image and label moved together.

    images: (B, 3, H, W) float in [0, 1], on any device; labels: (B, H, W) integer class map.
    Returns the augmented pair; labels stay integer class maps (nearest-neighbour sampling), pixels
    moved in from outside the frame are black with background label.
    """
    if images.shape[-1] != images.shape[-2]:
        raise ValueError(f"augmentation needs square images, got {tuple(images.shape[-2:])}")
    theta, _ = random_affine(images.shape[0], generator, geometric)
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    moved = F.grid_sample(labels[:, None].to(images.dtype), grid, mode="nearest", padding_mode="zeros",
                          align_corners=False)
    labels = moved[:, 0].round().to(labels.dtype)
    if colour:
        images = jitter_hsv(images, generator)
    return images, labels


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
