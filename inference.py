"""Inference: probabilities for whole test images, with the paper's 8-way flip test-time augmentation.

Test-time mirroring belongs here, not to the data code: `predict` sees each image in all 8 dihedral
variants, maps every prediction back and averages them. `predict_samples` brings a test split to the
network the way the checkpoint was trained (resized to IMAGE_SIZE, or whole at native resolution for
PATCH_SIZE training, resized by PATCH_SCALE) and returns probabilities at each image's native size, on the host.
"""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import networks
from devices import autocast


# Pixels that go through the network in one forward pass (all views of a few images): about 16 views of
# 608 x 608. Activation memory grows with it, and a full-resolution U-Net needs several GB per 8 such views.
PIXELS_PER_FORWARD = 6_000_000

# A native-resolution image larger than this (padded to a square side that is a multiple of 32) is predicted in
# overlapping TILE_SIDE windows instead of whole: one view of 4096 x 4096 already holds several GB of
# activations (CE-Net, bf16 on a CPU: about 0.35 GB a million pixels), and a 10000-px scan would not fit.
WHOLE_IMAGE_PIXELS = 4096 * 4096
TILE_SIDE = 3072               # a multiple of 32, as the encoder needs
TILE_OVERLAP = 256             # the width over which neighbouring windows are blended


@torch.no_grad()
def predict(model, images, device, tta=True, amp=True, fmt=torch.contiguous_format, images_per_batch=None):
    """Class probabilities (N, K, H, W) for normalised images (N, 3, H, W).

    With `tta`, every image is seen in all 8 dihedral variants; the variants of `images_per_batch`
    images (default: as many as PIXELS_PER_FORWARD allows, at least one) go through the network in one
    forward pass, each prediction is mapped back and the 8 are averaged (the paper's test-time augmentation).
    An image too large for all its views in one pass (a 4000 x 3000 photograph at native size) sends them a few
    at a time, so memory follows PIXELS_PER_FORWARD rather than 8 x the image.
    """
    model.eval()
    variants = list(range(8) if tta else range(1))
    pixels = images.shape[-2] * images.shape[-1]
    if images_per_batch is None:
        images_per_batch = max(1, PIXELS_PER_FORWARD // (len(variants) * pixels))
    results = []
    for chunk in images.split(images_per_batch):
        chunk = chunk.to(device, non_blocking=True)
        views_per_pass = max(1, min(len(variants), PIXELS_PER_FORWARD // (len(chunk) * pixels)))
        restored = []
        for start in range(0, len(variants), views_per_pass):
            group = variants[start:start + views_per_pass]
            batch = torch.cat([data.dihedral(chunk, k) for k in group]).contiguous(memory_format=fmt)
            with autocast(device, amp):
                logits = model(batch)
            probs = networks.probabilities(logits.float()).split(len(chunk))
            restored.extend(data.undo_dihedral(view, k) for view, k in zip(probs, group))
        results.append(torch.stack(restored).mean(0))
    return torch.cat(results)


def predict_samples(model, samples, device, *, image_size, patch_size, tta, amp, fmt, preprocess="ours",
                    patch_scale=1.0, restore_size=True, images_per_chunk=4, progress=False):
    """(K, H, W) float probabilities on the CPU, one per sample, at the sample's native resolution (with
    `restore_size` False and resized prediction: at the network's size, image_size x image_size).

    The test set goes through the device a few images at a time and every result comes back to the
    host at once, so device memory holds one chunk, whatever the size of the test set. `progress` shows a
    progress bar (on stderr) over the images."""
    from tqdm import tqdm
    bar = tqdm(total=len(samples), desc="predict", unit="image", disable=not progress, dynamic_ncols=True,
               file=sys.stderr)
    restored = []
    for start in range(0, len(samples), images_per_chunk):
        chunk = samples[start:start + images_per_chunk]
        if patch_size:
            probs = predict_native(model, chunk, device, tta=tta, amp=amp, fmt=fmt, preprocess=preprocess,
                                   scale=patch_scale)
        else:
            probs = predict_resized(model, chunk, device, image_size, tta=tta, amp=amp, fmt=fmt,
                                    preprocess=preprocess, restore_size=restore_size)
        restored.extend(prob.float().cpu() for prob in probs)
        bar.update(len(chunk))
    bar.close()
    return restored


def predict_resized(model, samples, device, size, *, tta, amp, fmt, preprocess="ours", restore_size=True):
    """Each image resized to size x size (as in training), its probabilities resized back (bilinear)."""
    images = torch.stack([data.resize_image(sample.image, size, preprocess) for sample in samples])
    probs = predict(model, data.normalize(images.to(device), preprocess), device, tta=tta, amp=amp, fmt=fmt)
    if not restore_size:
        return list(probs)
    return [F.interpolate(prob[None], size=sample.label.shape, mode="bilinear", align_corners=False)[0]
            for sample, prob in zip(samples, probs)]


def native_inputs(samples, scale, preprocess):
    """uint8 images (N, 3, side, side) as `predict_native` gives them to the network: resized by `scale`,
    zero-padded at the bottom and right to a square whose side is a multiple of 32."""
    images, _ = data.stack_native(samples, 1, scale, preprocess)
    return data.pad_to_square(images, data.padded_side(*images.shape[-2:]))


@torch.no_grad()
def adapt_batchnorm(model, samples, device, *, amp, fmt, preprocess="ours", scales=None, image_size=None):
    """Re-estimate every BatchNorm's running mean and variance on `samples` (AdaBN, Li et al., "Revisiting
    batch normalization for practical domain adaptation", 2016): images of another camera or stain shift each
    layer's feature statistics away from those stored in training, and the labels are not needed to measure
    them again. Each image goes through once, as prediction will see it (whole, resized by its entry of
    `scales`, or to `image_size` for a model trained on resized images), and each layer's new statistics are
    the plain average of the per-image batch statistics (momentum None); learned weights stay as they were.
    Returns the number of BatchNorm layers changed (0: the model has none, and nothing happens)."""
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [norm.momentum for norm in norms]
    model.eval()  # dropout stays off; only the BatchNorm layers measure
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    try:
        for index, sample in enumerate(samples):
            if image_size:
                image = data.resize_image(sample.image, image_size, preprocess)[None]
            else:
                image = native_inputs([sample], scales[index] if scales else 1.0, preprocess)
            side = image.shape[-1]
            if side * side > WHOLE_IMAGE_PIXELS:  # as prediction would: one window, here the central one
                top, left = ((length - TILE_SIDE) // 2 for length in image.shape[-2:])
                image = image[..., top:top + TILE_SIDE, left:left + TILE_SIDE]
            image = data.normalize(image.to(device), preprocess).contiguous(memory_format=fmt)
            with autocast(device, amp):
                model(image)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.eval()
    return len(norms)


def predict_native(model, samples, device, *, tta, amp, fmt, preprocess="ours", scale=1.0):
    """Whole images at native resolution (or resized by `scale`, the PATCH_SCALE the model was trained at),
    zero-padded at the bottom and right to a square whose side is a multiple of 32 (DRIVE 584 x 565 ->
    608 x 608; square, so the transposed TTA views batch with the others); the padding is cut off the
    probabilities, and a rescaled prediction is resized back to the native image (antialiased bilinear)."""
    images, _ = data.stack_native(samples, 1, scale, preprocess)
    side = data.padded_side(*images.shape[-2:])
    if side * side > WHOLE_IMAGE_PIXELS:
        probs = [predict_tiled(model, image, device, tta=tta, amp=amp, fmt=fmt, preprocess=preprocess)
                 for image in images]
    else:
        images = data.normalize(data.pad_to_square(images, side).to(device), preprocess)
        probs = predict(model, images, device, tta=tta, amp=amp, fmt=fmt)
    restored = []
    for sample, prob in zip(samples, probs):
        rows, cols = data.scaled_shape(sample.label.shape, scale)
        prob = prob[:, :rows, :cols]
        if (rows, cols) != sample.label.shape:
            prob = F.interpolate(prob[None], size=sample.label.shape, mode="bilinear", antialias=True,
                                 align_corners=False)[0]
        restored.append(prob)
    return restored


def tile_starts(length, tile, overlap):
    """Offsets of `tile`-long windows covering 0..length (length >= tile), neighbours sharing at least
    `overlap` pixels; the last window ends at the edge."""
    starts = list(range(0, length - tile + 1, tile - overlap))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def edge_ramp(tile, overlap, taper_start, taper_end):
    """1-D blending weights of a window: 1 inside, falling linearly to 0 over `overlap` pixels at each end
    that meets a neighbouring window (the pixels a window's own border distorts most count least); an end at
    the image's border keeps weight 1, as no other window covers it."""
    position = torch.arange(tile, dtype=torch.float32)
    ramp = torch.ones(tile)
    if taper_start:
        ramp = torch.minimum(ramp, position / overlap)
    if taper_end:
        ramp = torch.minimum(ramp, (tile - 1 - position) / overlap)
    return ramp


def predict_tiled(model, image, device, *, tta, amp, fmt, preprocess="ours", tile=None, overlap=None):
    """(K, H, W) probabilities on the CPU of one uint8 image (3, H, W) too large to predict whole: overlapping
    tile x tile windows (zero-padded up to one window where the image is smaller), each predicted as a whole
    image is (TTA included), blended with `edge_ramp` weights."""
    tile, overlap = tile or TILE_SIDE, overlap or TILE_OVERLAP
    height, width = image.shape[-2:]
    image = F.pad(image, (0, max(0, tile - width), 0, max(0, tile - height)))
    rows, cols = (tile_starts(length, tile, overlap) for length in image.shape[-2:])
    total, weight_sum = None, torch.zeros(image.shape[-2:])
    for top in rows:
        for left in cols:
            window = data.normalize(image[None, :, top:top + tile, left:left + tile], preprocess)
            prob = predict(model, window, device, tta=tta, amp=amp, fmt=fmt)[0].float().cpu()
            weight = torch.outer(edge_ramp(tile, overlap, top > 0, top + tile < image.shape[-2]),
                                 edge_ramp(tile, overlap, left > 0, left + tile < image.shape[-1]))
            if total is None:
                total = torch.zeros(prob.shape[0], *image.shape[-2:])
            total[:, top:top + tile, left:left + tile] += prob * weight
            weight_sum[top:top + tile, left:left + tile] += weight
    return (total / weight_sum)[:, :height, :width]
