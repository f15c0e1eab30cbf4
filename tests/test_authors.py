"""The authors' artefacts: a state dict saved their way loads, predicts what their network computes, and is
evaluated with their preprocessing.

The authors' network is rebuilt here from its published description (names and shapes of CE_Net_ in their
networks/cenet.py, its forward pass written with torch.nn.functional), independently of networks/cenet.py.
"""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import cli
import data
import evaluation
import framework
import inference
import networks
import tasks
from conftest import DRIVE, run_script
from errors import UserError
from tasks.files import read_image

DECODERS = {4: (516, 256), 3: (256, 128), 2: (128, 64), 1: (64, 64)}  # in, out channels (theirs)


def batchnorm(prefix, channels, generator):
    return {f"{prefix}.weight": 1 + 0.1 * torch.randn(channels, generator=generator),
            f"{prefix}.bias": 0.1 * torch.randn(channels, generator=generator),
            f"{prefix}.running_mean": 0.1 * torch.randn(channels, generator=generator),
            f"{prefix}.running_var": 1 + 0.1 * torch.rand(channels, generator=generator),
            f"{prefix}.num_batches_tracked": torch.tensor(7)}


def conv(prefix, out_channels, in_channels, kernel, generator, bias=True, transposed=False):
    shape = (in_channels, out_channels, kernel, kernel) if transposed else (out_channels, in_channels, kernel, kernel)
    fan_in = in_channels * kernel * kernel
    tensors = {f"{prefix}.weight": torch.randn(*shape, generator=generator) / fan_in ** 0.5}
    if bias:
        tensors[f"{prefix}.bias"] = 0.1 * torch.randn(out_channels, generator=generator)
    return tensors


def authors_state_dict(seed=0):
    """A random state dict with the names and shapes of the authors' CE_Net_, saved under DataParallel."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    resnet = torchvision.models.resnet34(weights=None).state_dict()
    renames = {"conv1.": "firstconv.", "bn1.": "firstbn.", **{f"layer{n}.": f"encoder{n}." for n in (1, 2, 3, 4)}}
    for key, value in resnet.items():
        prefix = next((p for p in renames if key.startswith(p)), None)
        if prefix is None:
            continue  # fc.*: not part of CE-Net
        if key.endswith("running_var"):
            state[renames[prefix] + key[len(prefix):]] = 1 + 0.1 * torch.rand(value.shape, generator=generator)
        elif value.dtype == torch.long:
            state[renames[prefix] + key[len(prefix):]] = torch.tensor(7)
        elif value.ndim == 4:  # convolutions, scaled to keep activations of order one through 16 blocks
            fan_in = value[0].numel()
            state[renames[prefix] + key[len(prefix):]] = 0.7 * torch.randn(value.shape, generator=generator) / fan_in ** 0.5
        else:  # BatchNorm weight (about 1), bias and running mean (about 0)
            base = 1.0 if key.endswith("weight") else 0.0
            state[renames[prefix] + key[len(prefix):]] = base + 0.1 * torch.randn(value.shape, generator=generator)
    for name in ("dilate1", "dilate2", "dilate3"):
        state.update(conv(f"dblock.{name}", 512, 512, 3, generator))
    state.update(conv("dblock.conv1x1", 512, 512, 1, generator))
    state.update(conv("spp.conv", 1, 512, 1, generator))
    for n, (channels_in, channels_out) in DECODERS.items():
        middle = channels_in // 4
        state.update(conv(f"decoder{n}.conv1", middle, channels_in, 1, generator))
        state.update(batchnorm(f"decoder{n}.norm1", middle, generator))
        state.update(conv(f"decoder{n}.deconv2", middle, middle, 3, generator, transposed=True))
        state.update(batchnorm(f"decoder{n}.norm2", middle, generator))
        state.update(conv(f"decoder{n}.conv3", channels_out, middle, 1, generator))
        state.update(batchnorm(f"decoder{n}.norm3", channels_out, generator))
    state.update(conv("finaldeconv1", 32, 64, 4, generator, transposed=True))
    state.update(conv("finalconv2", 32, 32, 3, generator))
    state.update(conv("finalconv3", 1, 32, 3, generator))
    return {f"module.{key}": value for key, value in state.items()}


def authors_forward(state, x):
    """Their CE_Net_ forward pass, eval mode, on a state dict with their names (no 'module.')."""
    def bn(h, prefix):
        return F.batch_norm(h, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                            state[f"{prefix}.weight"], state[f"{prefix}.bias"], training=False, eps=1e-5)

    def conv2d(h, prefix, **options):
        return F.conv2d(h, state[f"{prefix}.weight"], state.get(f"{prefix}.bias"), **options)

    def basic_block(h, prefix, stride):
        out = F.relu(bn(conv2d(h, f"{prefix}.conv1", stride=stride, padding=1), f"{prefix}.bn1"))
        out = bn(conv2d(out, f"{prefix}.conv2", padding=1), f"{prefix}.bn2")
        shortcut = bn(conv2d(h, f"{prefix}.downsample.0", stride=stride), f"{prefix}.downsample.1") \
            if f"{prefix}.downsample.0.weight" in state else h
        return F.relu(out + shortcut)

    h = F.relu(bn(conv2d(x, "firstconv", stride=2, padding=3), "firstbn"))
    h = F.max_pool2d(h, 3, stride=2, padding=1)
    skips = []
    for n, blocks in zip((1, 2, 3, 4), (3, 4, 6, 3)):
        for index in range(blocks):
            h = basic_block(h, f"encoder{n}.{index}", 2 if index == 0 and n > 1 else 1)
        skips.append(h)
    e1, e2, e3, e4 = skips
    # DAC: four cascaded branches, the shared 1x1 conv on three of them, summed with the input.
    d1 = conv2d(e4, "dblock.dilate1", padding=1)
    d2 = conv2d(e4, "dblock.dilate2", padding=3, dilation=3)
    d12 = conv2d(d1, "dblock.dilate2", padding=3, dilation=3)
    d123 = conv2d(d12, "dblock.dilate3", padding=5, dilation=5)
    e4 = e4 + F.relu(d1) + F.relu(conv2d(d2, "dblock.conv1x1")) + F.relu(conv2d(d12, "dblock.conv1x1")) \
        + F.relu(conv2d(d123, "dblock.conv1x1"))
    # SPP (RMP): the four pooled maps first, then the input.
    size = e4.shape[-2:]
    pooled = [F.interpolate(conv2d(F.max_pool2d(e4, k, stride=k), "spp.conv"), size=size, mode="bilinear",
                            align_corners=False) for k in (2, 3, 5, 6)]
    h = torch.cat(pooled + [e4], 1)

    def decoder(h, n):
        h = F.relu(bn(conv2d(h, f"decoder{n}.conv1"), f"decoder{n}.norm1"))
        h = F.conv_transpose2d(h, state[f"decoder{n}.deconv2.weight"], state[f"decoder{n}.deconv2.bias"], stride=2,
                               padding=1, output_padding=1)
        h = F.relu(bn(h, f"decoder{n}.norm2"))
        return F.relu(bn(conv2d(h, f"decoder{n}.conv3"), f"decoder{n}.norm3"))

    h = decoder(h, 4) + e3
    h = decoder(h, 3) + e2
    h = decoder(h, 2) + e1
    h = decoder(h, 1)
    h = F.relu(F.conv_transpose2d(h, state["finaldeconv1.weight"], state["finaldeconv1.bias"], stride=2, padding=1))
    h = F.relu(conv2d(h, "finalconv2", padding=1))
    return torch.sigmoid(conv2d(h, "finalconv3", padding=1))


def plain(state):
    return {key[len("module."):]: value for key, value in state.items()}


def test_every_authors_tensor_has_a_home():
    state = framework.clean_state_dict(authors_state_dict())
    assert len(state) == 316 and networks.is_authors_state_dict(state)
    renamed = networks.from_authors_names(state)
    ours = networks.build_model("cenet").state_dict()
    assert set(renamed) == set(ours)
    assert all(renamed[key].shape == ours[key].shape for key in ours)
    assert not networks.is_authors_state_dict(ours)


@torch.no_grad()
def test_mapped_weights_compute_the_authors_forward():
    state = authors_state_dict()
    model = framework.model_from_state_dict("cenet", 1, networks.from_authors_names(framework.clean_state_dict(state)),
                                            "authors.th").eval()
    x = torch.randn(2, 3, 192, 192, generator=torch.Generator().manual_seed(3))
    expected = authors_forward(plain(state), x)
    ours = networks.probabilities(model(x))
    assert expected.std() > 0.01  # not a saturated output that any network would match
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_authors_preprocessing_by_hand():
    pixel = torch.tensor([255, 128, 0], dtype=torch.uint8).view(1, 3, 1, 1)  # RGB
    theirs = data.normalize(pixel, "authors").view(3)
    torch.testing.assert_close(theirs, torch.tensor([-1.6, 128 / 255 * 3.2 - 1.6, 1.6]))  # B, G, R
    ours = data.normalize(pixel, "ours").view(3)
    expected = (torch.tensor([1.0, 128 / 255, 0.0]) - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD)
    torch.testing.assert_close(ours, expected)
    # Resizing: half-pixel centres without antialiasing (as OpenCV's INTER_LINEAR) for the authors' way.
    row = np.array([[0, 100]], np.uint8).repeat(2, 0)[:, :, None].repeat(3, 2)
    up = data.resize_image(row, 4, "authors")[0]
    assert up[0].tolist() == [0, 25, 75, 100]
    steps = np.array([[0, 0, 100, 100]], np.uint8).repeat(4, 0)[:, :, None].repeat(3, 2)
    assert data.resize_image(steps, 2, "authors")[0, 0].tolist() == [0, 100]
    assert data.resize_image(steps, 2, "ours")[0, 0].tolist() != [0, 100]  # antialiased: edges blend


def authors_input_image():
    """(path or None, RGB uint8 image) of DRIVE's test image 01 where DRIVE is here, else a random image of its
    565 x 584 size (the resize's rounding is only exercised on many different grey levels)."""
    path = DRIVE / "test" / "images" / "01_test.tif"
    if path.is_file():
        return path, read_image(path)
    return None, np.random.default_rng(1).integers(0, 256, (584, 565, 3), dtype=np.uint8)


def test_authors_input_is_opencv_bit_for_bit():
    """What test_cenet.py feeds their network: cv2.imread (BGR uint8), cv2.resize(img, (448, 448)) with its
    default INTER_LINEAR, then float32 / 255 * 3.2 - 1.6. The "authors" preprocessing must give the same bits."""
    import cv2
    path, image = authors_input_image()
    bgr = cv2.imread(str(path)) if path is not None else np.ascontiguousarray(image[..., ::-1])
    assert np.array_equal(bgr[..., ::-1], image)  # PIL and OpenCV decode the same pixels
    theirs = cv2.resize(bgr, (448, 448))
    ours = data.resize_image(image, 448, "authors")
    assert ours.dtype == torch.uint8 and ours.shape == (3, 448, 448)
    assert np.array_equal(ours.permute(1, 2, 0).numpy(), theirs[..., ::-1])
    their_input = torch.from_numpy(np.array(theirs, np.float32).transpose(2, 0, 1) / 255.0 * 3.2 - 1.6)
    assert torch.equal(data.normalize(ours[None], "authors")[0], their_input)
    # A non-square size is (height, width) here and (width, height) to OpenCV.
    assert np.array_equal(data.resize_image(image, (320, 256), "authors").permute(1, 2, 0).numpy(),
                          cv2.resize(np.ascontiguousarray(image), (256, 320)))


def test_ours_and_clahe_never_touch_opencv(monkeypatch):
    """The committed tables' preprocessings keep their own resize: OpenCV is the authors' way only."""
    def refuse(*args):
        raise AssertionError("ours/clahe must not resize with OpenCV")
    monkeypatch.setattr(data, "opencv_resize", refuse)
    image = np.random.default_rng(2).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    for preprocess in ("ours", "clahe"):
        enhanced = torch.from_numpy(data.enhance(image, preprocess)).permute(2, 0, 1)[None].float()
        expected = F.interpolate(enhanced, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        assert torch.equal(data.resize_image(image, 64, preprocess), expected[0].round().clamp(0, 255).byte())


def test_authors_protocol_resizes_with_opencv_in_float():
    """test_cenet.py resizes two float32 maps with cv2.resize: the 0/255 mask thresholded at the network's size
    (three channels, kept above 20) and the sum of the 8 TTA views (divided by 8 for the AUC). Float32 in, float32
    out: OpenCV rounds nothing, so neither do we."""
    import cv2
    from tasks.drive import authors_native_probabilities, authors_vessel_mask
    prob = torch.rand(1, 448, 448, generator=torch.Generator().manual_seed(4))
    total = prob[0].numpy() * 8  # their sum of 8 views; times 8 is exact in floating point
    mask = np.where(total > 4, 255, 0).astype(np.float32)
    theirs = cv2.resize(np.repeat(mask[:, :, None], 3, axis=2), dsize=(565, 584))
    assert theirs.dtype == np.float32
    assert torch.equal(authors_vessel_mask(prob, (584, 565)), torch.from_numpy(theirs[:, :, 0] > 20))
    native = authors_native_probabilities(prob, (584, 565))
    assert native.shape == (1, 584, 565)
    assert torch.equal(native[0], torch.from_numpy(cv2.resize(total, dsize=(565, 584)) / 8.0))


def settings_with(**overrides):
    settings = cli.default_settings()
    settings.update(DEVICE="cpu", VISDOM=False, TTA=False, **overrides)
    return settings


def test_test_py_evaluates_an_authors_checkpoint_with_their_preprocessing(small_drive, tmp_path):
    checkpoint = tmp_path / "CE-Net_DRIVE.th"
    torch.save(authors_state_dict(), checkpoint)
    result = run_script("test.py", "--checkpoint", checkpoint, "--data-root", small_drive, "--device", "cpu",
                        "--tta", "false", "--out", tmp_path / "results")
    assert result.returncode == 0, result.stderr
    assert "authors' format" in result.stderr and "(authors) at 448 px" in result.stderr
    report = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert report["protocol"]["preprocess"] == "authors" and 0 <= report["summary"]["FOV AUC"]["mean"] <= 1
    settings = settings_with(DATA_ROOT=str(small_drive))

    # The probabilities test.py scores are the authors' forward on their preprocessed image.
    model, merged, _ = evaluation.load_model(checkpoint, settings, frozenset({"DATA_ROOT"}))
    assert (merged["PREPROCESS"], merged["IMAGE_SIZE"], merged["PATCH_SIZE"]) == ("authors", 448, 0)
    sample = tasks.load_split("drive", small_drive, "test", tasks.SplitOptions.from_settings(merged))[0]
    (probability,) = inference.predict_samples(model, [sample], torch.device("cpu"), image_size=448, patch_size=0,
                                               tta=False, amp=False, fmt=torch.contiguous_format,
                                               preprocess="authors")
    image = data.normalize(data.resize_image(sample.image, 448, "authors")[None], "authors")
    with torch.no_grad():
        expected = authors_forward(plain(authors_state_dict()), image)
    expected = F.interpolate(expected, size=sample.label.shape, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(probability, expected, atol=1e-4, rtol=0)


def test_an_authors_checkpoint_is_cenet_only(tmp_path):
    checkpoint = tmp_path / "authors.th"
    torch.save(authors_state_dict(), checkpoint)
    with pytest.raises(UserError, match="trained as model 'cenet'"):
        evaluation.load_model(checkpoint, settings_with(MODEL="unet"), frozenset({"MODEL"}))


def test_our_checkpoints_carry_their_preprocessing():
    trained = {"MODEL": "cenet", "DATASET": "drive", "IMAGE_SIZE": 448, "PATCH_SIZE": 0, "PREPROCESS": "authors"}
    merged = evaluation.settings_for(trained, settings_with(), frozenset(), "run/final.pth")
    assert merged["PREPROCESS"] == "authors"
    older = {key: value for key, value in trained.items() if key != "PREPROCESS"}  # saved before the setting
    assert evaluation.settings_for(older, settings_with(), frozenset(), "old.pth")["PREPROCESS"] == "ours"


# --- the authors' evaluation protocol -----------------------------------------------------------

def test_authors_mask_by_hand():
    """2x2 -> 4x4: one pixel above the threshold becomes 255, bilinear upsampling spreads it (half-pixel
    centres, edges clamped), and everything above 20/255 counts: 8 of 16 pixels, where thresholding the
    resized probabilities at one half would keep 4."""
    from tasks.drive import authors_vessel_mask
    prob = torch.tensor([[[0.9, 0.1], [0.1, 0.1]]])
    # Rows/columns of the upsampled 255-mask: weights (1, 0.75, 0.25, 0) of the foreground pixel per axis.
    expected = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(authors_vessel_mask(prob, (4, 4)), expected)
    resized = F.interpolate(prob[None], size=(4, 4), mode="bilinear", align_corners=False)[0, 0]
    assert int((resized > 0.5).sum()) == 4


def test_authors_scores_by_hand():
    from tasks.drive import score_vessels_as_authors
    from tasks.sample import Sample
    prob = torch.tensor([[[0.9, 0.1], [0.1, 0.1]]])
    label = np.zeros((4, 4), np.uint8)
    label[:2, :2] = 1  # 4 vessel pixels, all inside the thickened 8-pixel mask
    sample = Sample("x", np.zeros((4, 4, 3), np.uint8), label, np.ones((4, 4), bool))
    row, native = score_vessels_as_authors(prob, sample, 0.5)
    assert set(row) == {"whole AUC", "whole Acc", "whole Sen"} and native.shape == (1, 4, 4)
    assert row["whole Sen"] == 1.0 and row["whole Acc"] == 12 / 16  # 4 TP, 4 FP, 8 TN
    # AUC: the resized probabilities rank the 4 vessel pixels above every background pixel but ties.
    resized = F.interpolate(prob[None], size=(4, 4), mode="bilinear", align_corners=False)[0, 0].flatten()
    positives, negatives = resized[torch.from_numpy(label).flatten() > 0], resized[torch.from_numpy(label).flatten() == 0]
    pairs = (positives[:, None] > negatives[None]).float() + 0.5 * (positives[:, None] == negatives[None]).float()
    assert row["whole AUC"] == pytest.approx(float(pairs.mean()))


def test_authors_protocol_refuses_what_it_cannot_score():
    with pytest.raises(UserError, match="DRIVE only"):
        evaluation.check_protocol(settings_with(PROTOCOL="authors", DATASET="origa"), tasks.dataset("origa"))
    with pytest.raises(UserError, match="trained on crops"):
        evaluation.check_protocol(settings_with(PROTOCOL="authors", PATCH_SIZE=256), tasks.dataset("drive"))


def test_authors_protocol_end_to_end(small_drive, tmp_path):
    checkpoint = tmp_path / "authors.th"
    torch.save(authors_state_dict(), checkpoint)
    settings = settings_with(DATA_ROOT=str(small_drive), RESULTS_DIR=str(tmp_path / "results"), PROTOCOL="authors")
    summary, out, _ = evaluation.evaluate(checkpoint, settings, given=frozenset({"DATA_ROOT", "TTA", "PROTOCOL"}))
    assert set(summary) == {"whole AUC", "whole Acc", "whole Sen"}
    metrics_json = (out / "metrics.json").read_text()
    assert '"scoring": "authors"' in metrics_json and "test_cenet.py" in metrics_json


def test_faithful_code_recipe_is_the_authors_training():
    import argparse
    args = cli.add_constant_flags(argparse.ArgumentParser()).parse_args(["--recipe", "faithful_code"])
    settings, _ = cli.settings_from(args)
    assert (settings["PREPROCESS"], settings["AUGMENT"], settings["LOSS"]) == ("authors", "authors_code", "bce")
    assert (settings["OPTIMIZER"], settings["LR"], settings["WEIGHT_DECAY"]) == ("adamw", 2e-4, 0.0)
    assert settings["IMAGE_SIZE"] == 448 and settings["BATCH_SIZE"] == 8 and settings["EPOCHS"] == 300
    # A poly power of 0 keeps the learning rate constant, as their Adam (before any plateau halving).
    assert {framework.poly_lr(2e-4, step, 900, settings["POLY_POWER"]) for step in (0, 450, 899)} == {2e-4}
