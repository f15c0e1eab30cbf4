"""Inference: probabilities for whole test images, with the paper's 8-way flip test-time augmentation.

Test-time mirroring belongs here, not to the data code: `predict` sees each image in all 8 dihedral
variants, maps every prediction back and averages them. `predict_samples` brings a test split to the
network the way the checkpoint was trained (resized to IMAGE_SIZE, or whole at native resolution for
PATCH_SIZE training, resized by PATCH_SCALE) and returns probabilities at each image's native size, on the host.
"""
import sys

import torch
import torch.nn.functional as F

import data
import networks
from devices import autocast


# Pixels that go through the network in one forward pass (all views of a few images): about 16 views of
# 608 x 608. Activation memory grows with it, and a full-resolution U-Net needs several GB per 8 such views.
PIXELS_PER_FORWARD = 6_000_000


@torch.no_grad()
def predict(model, images, device, tta=True, amp=True, fmt=torch.contiguous_format, images_per_batch=None):
    """Class probabilities (N, K, H, W) for normalised images (N, 3, H, W).

    With `tta`, every image is seen in all 8 dihedral variants; the variants of `images_per_batch`
    images (default: as many as PIXELS_PER_FORWARD allows, at least one) go through the network in one
    forward pass, each prediction is mapped back and the 8 are averaged (the paper's test-time augmentation).
    """
    model.eval()
    variants = range(8) if tta else range(1)
    if images_per_batch is None:
        images_per_batch = max(1, PIXELS_PER_FORWARD // (len(variants) * images.shape[-2] * images.shape[-1]))
    results = []
    for chunk in images.split(images_per_batch):
        chunk = chunk.to(device, non_blocking=True)
        batch = torch.cat([data.dihedral(chunk, k) for k in variants]).contiguous(memory_format=fmt)
        with autocast(device, amp):
            logits = model(batch)
        probs = networks.probabilities(logits.float()).split(len(chunk))
        restored = torch.stack([data.undo_dihedral(view, k) for view, k in zip(probs, variants)])
        results.append(restored.mean(0))
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


def predict_native(model, samples, device, *, tta, amp, fmt, preprocess="ours", scale=1.0):
    """Whole images at native resolution (or resized by `scale`, the PATCH_SCALE the model was trained at),
    zero-padded at the bottom and right to a square whose side is a multiple of 32 (DRIVE 584 x 565 ->
    608 x 608; square, so the transposed TTA views batch with the others); the padding is cut off the
    probabilities, and a rescaled prediction is resized back to the native image (antialiased bilinear)."""
    images, _ = data.stack_native(samples, 1, scale, preprocess)
    side = data.padded_side(*images.shape[-2:])
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
