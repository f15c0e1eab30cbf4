"""--adapt-bn: BatchNorm statistics measured again on another dataset's images before prediction (AdaBN).
The statistics against hand-computed ones, what must stay untouched (weights, dropout, momentum), and
test.py's use of it on a DRIVE model scored on a synthetic CHASE_DB1."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import evaluation
import fixtures
import inference
import main
import prediction
from conftest import REPO
from data import IMAGENET_MEAN, IMAGENET_STD
from errors import UserError
from tasks import chase
from tasks.sample import Sample

RELEASED = REPO / "weights" / "released" / "cenet_drive_cpu_clahe.pth"


class Probe(nn.Module):
    """The normalised input, through a dropout, into one BatchNorm: its statistics are the input's own."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.norm = nn.BatchNorm2d(3, momentum=0.1)

    def forward(self, images):
        return self.norm(self.drop(images))


def image_sample(image):
    return Sample("x", image, np.zeros(image.shape[:2], np.uint8))


def normalised(image):
    return (image / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)


def adapt(model, samples, **options):
    return inference.adapt_batchnorm(model, samples, torch.device("cpu"), amp=False, fmt=torch.contiguous_format,
                                     **options)


def test_statistics_are_the_average_of_each_images_own():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), rng.integers(40, 120, (32, 32, 3), dtype=np.uint8)]
    model = Probe(dropout=0.9)  # were the dropout on, the measured variance would be about ten times larger
    weight_before = model.norm.weight.detach().clone()
    assert adapt(model, [image_sample(image) for image in images]) == 1
    pixels = [normalised(image).reshape(-1, 3) for image in images]
    expected_mean = np.mean([values.mean(0) for values in pixels], axis=0)
    expected_var = np.mean([values.var(0, ddof=1) for values in pixels], axis=0)  # BatchNorm keeps the unbiased one
    np.testing.assert_allclose(model.norm.running_mean.numpy(), expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.norm.running_var.numpy(), expected_var, rtol=1e-5)
    assert model.norm.num_batches_tracked.item() == 2
    assert not model.training and not model.norm.training and not model.drop.training
    assert model.norm.momentum == 0.1
    assert torch.equal(model.norm.weight, weight_before)


def test_resized_models_measure_at_their_input_size():
    """PATCH_SIZE 0 models see every image resized to IMAGE_SIZE: two uniform images of different sizes have
    their own colour as the mean and no variance."""
    colours = [np.array([200, 30, 90], np.uint8), np.array([10, 240, 128], np.uint8)]
    samples = [image_sample(np.broadcast_to(colours[0], (40, 56, 3)).copy()),
               image_sample(np.broadcast_to(colours[1], (24, 24, 3)).copy())]
    model = Probe()
    adapt(model, samples, image_size=32)
    expected = np.mean([normalised(colour.astype(float)) for colour in colours], axis=0)
    np.testing.assert_allclose(model.norm.running_mean.numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.norm.running_var.numpy(), 0, atol=1e-6)


def test_a_model_without_batchnorm_is_left_alone():
    model = nn.Conv2d(3, 1, 1)
    before = model.weight.detach().clone()
    assert adapt(model, [image_sample(np.zeros((32, 32, 3), np.uint8))]) == 0
    assert torch.equal(model.weight, before)


def test_flag_values_are_checked():
    assert main.parse_settings(["--adapt-bn", "train"])[0]["ADAPT_BN"] == "train"
    with pytest.raises(UserError, match="--adapt-bn later is out of range: it must be none or train or scored"):
        main.parse_settings(["--adapt-bn", "later"])


def evaluate_on_chase(root, out, *flags):
    chosen, given = main.parse_settings(["--dataset", "chase", "--data-root", str(root), "--device", "cpu",
                                         "--tta", "false", *flags])
    _, folder, _ = evaluation.evaluate(RELEASED, chosen, given, out_dir=out)
    return json.loads((folder / "metrics.json").read_text()), (folder / "metrics.md").read_text()


def test_drive_model_adapted_to_chase_training_images(tmp_path, capsys):
    root = fixtures.write_chase(tmp_path / "CHASEDB1")
    plain, _ = evaluate_on_chase(root, tmp_path / "plain")
    adapted, text = evaluate_on_chase(root, tmp_path / "train", "--adapt-bn", "train")
    assert "re-estimated on 20 chase training images (labels unused)" in capsys.readouterr().err
    assert plain["protocol"]["adapt_bn"] == "none" and plain["protocol"]["adapt_bn_images"] is None
    assert adapted["protocol"]["adapt_bn"] == "train"
    assert adapted["protocol"]["adapt_bn_images"] == list(chase.TRAIN_IMAGES)
    assert "--adapt-bn train) on 20 images" in text
    assert set(adapted["per_image"]) == set(chase.TEST_IMAGES)
    changed = [name for name in chase.TEST_IMAGES
               if adapted["per_image"][name]["FOV AUC"] != plain["per_image"][name]["FOV AUC"]]
    assert changed, "new statistics must change the predictions"
    # The checkpoint on disk is what it was: a second plain run scores exactly as the first.
    again, _ = evaluate_on_chase(root, tmp_path / "plain_again")
    assert again["per_image"] == plain["per_image"]
    scored, _ = evaluate_on_chase(root, tmp_path / "scored", "--adapt-bn", "scored")
    assert scored["protocol"]["adapt_bn_images"] == list(chase.TEST_IMAGES)


def test_predict_refuses_adapt_bn(tmp_path):
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    chosen, given = main.parse_settings(["--adapt-bn", "scored", "--device", "cpu"])
    with pytest.raises(UserError, match="--adapt-bn is for test.py"):
        prediction.predict_files([str(image)], str(tmp_path / "out"), str(RELEASED), chosen, given)
    assert not (tmp_path / "out").exists()
