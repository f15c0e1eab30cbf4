"""FullNet, the variance-constrained cross-entropy, and the GlaS reader with its object-level scores."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import loss as losses
import metrics
import networks
import tasks
from conftest import TINY, run_script
from networks.fullnet import HYBRID_DILATIONS, FullNet
from tasks.glas import instances_from_probability

FULLNET_PARAMETERS = 1_777_756  # one output channel


# --- FullNet ------------------------------------------------------------------------------------

@pytest.mark.parametrize("height, width", [(32, 48), (33, 47), (1, 1)])
def test_fullnet_keeps_the_input_size(height, width):
    model = networks.build_model("fullnet", num_classes=2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, height, width)).shape == (1, 2, height, width)


def test_fullnet_parameter_count_and_structure():
    model = FullNet(num_classes=1)
    count = sum(parameter.numel() for parameter in model.parameters())
    print(f"FullNet parameters (1 output channel): {count:,}")
    assert count == FULLNET_PARAMETERS
    # The same count from the description: 3x3 conv to 24, 7 blocks of 6 layers (growth 24, conv + BN), 1x1
    # transitions halving the channels, 3x3 conv to 1.
    expected, channels = 3 * 24 * 9 + 24, 24
    for _ in range(7):
        for _ in range(6):
            expected += channels * 24 * 9 + 24 + 2 * 24
            channels += 24
        expected += channels * (channels // 2) + channels // 2
        channels //= 2
    assert count == expected + channels * 9 + 1
    dilations = [layer.conv.dilation[0] for block in model.blocks for layer in block if hasattr(layer, "conv")]
    assert dilations == [d for rate in (1, 2, 4, 8, 16, 4, 1) for d in HYBRID_DILATIONS[rate]]
    assert not [m for m in model.modules() if isinstance(m, (torch.nn.MaxPool2d, torch.nn.AvgPool2d))]
    assert all(m.stride == (1, 1) for m in model.modules() if isinstance(m, torch.nn.Conv2d))


# --- varCE ----------------------------------------------------------------------------------------

def test_varce_equals_ce_when_every_instance_is_uniform():
    target = torch.zeros(2, 6, 6, dtype=torch.long)
    target[0, 1:3, 1:3] = 1
    target[0, 4:6, 3:6] = 1
    target[1, 0:2, 4:6] = 1
    logits = torch.randn(2, 1, 6, 6)
    logits[0, 0, 1:3, 1:3] = 0.7     # constant inside each instance
    logits[0, 0, 4:6, 3:6] = -0.2
    logits[1, 0, 0:2, 4:6] = 1.5
    varce = losses.build_loss("varce", 1)(logits, target)
    torch.testing.assert_close(varce, F.binary_cross_entropy_with_logits(logits[:, 0], target.float()))


def test_varce_by_hand_on_two_instances():
    """Instances {(0,0), (0,1)} with p = 0.2, 0.6 and {(0,3), (1,3)} with p = 0.5, 0.5 (column 2 separates
    them, 8-connected). Var(p) = 0.04 and 0; with the two channels (1 - p, p) the sums are 0.08 and 0; their
    mean is 0.04, so L = BCE + 0.04."""
    target = torch.tensor([[[1, 1, 0, 1], [0, 0, 0, 1]]])
    probs = torch.tensor([[[0.2, 0.6, 0.3, 0.5], [0.1, 0.4, 0.2, 0.5]]])
    logits = torch.logit(probs)[:, None]
    value = losses.build_loss("varce", 1)(logits, target)
    bce = F.binary_cross_entropy(probs, target.float())
    assert float(value) == pytest.approx(float(bce) + 0.04, abs=1e-6)
    # An explicit instance map wins over the connected components: one instance of all four pixels.
    instances = target.clone()
    value = losses.VarianceConstrainedCELoss()(logits, target, instances=instances)
    p = torch.tensor([0.2, 0.6, 0.5, 0.5])
    assert float(value) == pytest.approx(float(bce) + 2 * float(p.var(unbiased=False)), abs=1e-6)


def test_varce_multiclass_sums_the_channel_variances():
    target = torch.tensor([[[1, 1, 2, 2]]])
    logits = torch.randn(1, 3, 1, 4)
    value = losses.build_loss("varce", 3)(logits, target)
    probs = logits.softmax(1)[0, :, 0]
    variance = 0.5 * (probs[:, :2].var(1, unbiased=False).sum() + probs[:, 2:].var(1, unbiased=False).sum())
    ce = F.cross_entropy(logits, target)
    assert float(value) == pytest.approx(float(ce + variance), abs=1e-6)


def test_varce_without_instances_is_ce():
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    logits = torch.randn(1, 1, 4, 4)
    torch.testing.assert_close(losses.build_loss("varce", 1)(logits, target),
                               F.binary_cross_entropy_with_logits(logits[:, 0], target.float()))


# --- GlaS -----------------------------------------------------------------------------------------

def two_glands_case():
    """Ground truth: two 4x4 glands on a 20x20 field; prediction: the first exactly, and a false 4x4 object
    ten columns right of the second."""
    truth = np.zeros((20, 20), np.int64)
    truth[2:6, 2:6] = 1
    truth[12:16, 2:6] = 2
    found = np.zeros((20, 20), np.int64)
    found[2:6, 2:6] = 1
    found[12:16, 12:16] = 2
    return found, truth


def test_object_scores_by_hand():
    found, truth = two_glands_case()
    assert metrics.object_f1(found, truth) == pytest.approx(0.5)        # 1 TP of 2 found and 2 real
    assert metrics.object_dice(found, truth) == pytest.approx(0.5)      # 1/2 (1/2 * 1 + 1/2 * 1)
    # Matched pair: 0. The unmatched gland's nearest prediction is 10 px away (both candidates tie at 10),
    # the false object's nearest gland also 10: 1/2 (1/2 * 10 + 1/2 * 10) = 5.
    assert metrics.object_hausdorff(found, truth) == pytest.approx(5.0)
    assert metrics.object_f1(truth, truth) == 1.0 and metrics.object_dice(truth, truth) == 1.0
    assert metrics.object_hausdorff(truth, truth) == 0.0
    assert metrics.object_f1(np.zeros_like(truth), truth) == 0.0
    assert np.isnan(metrics.object_hausdorff(np.zeros_like(truth), truth))


def test_instances_from_probability_drop_specks():
    prob = torch.zeros(1, 30, 30)
    prob[0, 2:14, 2:14] = 0.9       # 144 px: kept
    prob[0, 20:22, 20:22] = 0.9     # 4 px: a speck
    prob[0, 16:28, 2:14] = 0.8      # 144 px, separated from the first by two rows
    instances = instances_from_probability(prob, 0.5, min_area=100)
    assert sorted(np.unique(instances).tolist()) == [0, 1, 2]
    assert (instances[2:14, 2:14] == instances[2, 2]).all() and instances[21, 21] == 0


def write_glas(root, name, instances):
    image = np.stack([instances * 40 + 30] * 3, axis=-1).astype(np.uint8)
    Image.fromarray(image).save(root / f"{name}.bmp")
    Image.fromarray(instances.astype(np.uint8)).save(root / f"{name}_anno.bmp")


def test_glas_reader_in_the_challenge_layout(tmp_path):
    found, truth = two_glands_case()
    for name in ("train_1", "train_2", "testA_1", "testB_3"):
        write_glas(tmp_path, name, truth)
    (tmp_path / "Grade.csv").write_text("name,grade\n")
    train = tasks.load_split("glas", tmp_path, "train", tasks.SplitOptions())
    test = tasks.load_split("glas", tmp_path, "test", tasks.SplitOptions())
    assert [s.name for s in train] == ["train_1", "train_2"] and [s.name for s in test] == ["testA_1", "testB_3"]
    sample = test[0]
    assert sample.image.shape == (20, 20, 3) and sample.label.dtype == np.uint8
    assert np.array_equal(sample.instances, truth) and np.array_equal(sample.label, (truth > 0).astype(np.uint8))
    # Scoring the sample: a prediction equal to the found map of the hand case gives its figures.
    prob = torch.from_numpy((found > 0).astype(np.float32))[None]
    row, curve = tasks.dataset("glas").score(prob, sample, 0.5)
    assert curve is None
    # min area 100 px removes 4x4 objects, so this prediction has no objects left.
    assert row["object F1"] == 0.0 and np.isnan(row["object Hausdorff"])


def test_glas_reader_errors(tmp_path):
    from errors import UserError
    with pytest.raises(UserError, match="no train_N.bmp"):
        tasks.load_split("glas", tmp_path, "train", tasks.SplitOptions())
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "train_1.bmp")
    with pytest.raises(UserError, match="annotation .*train_1_anno.bmp missing"):
        tasks.load_split("glas", tmp_path, "train", tasks.SplitOptions())


# --- a short run through the real scripts -----------------------------------------------------------

def test_fullnet_with_varce_trains_and_evaluates(small_drive, tmp_path):
    weights, results = tmp_path / "weights", tmp_path / "results"
    trained = run_script("main.py", "--data-root", small_drive, *TINY, "--model", "fullnet", "--loss", "varce",
                         "--weights-dir", weights, "--run-name", "fullnet")
    assert trained.returncode == 0, trained.stderr
    assert "training FullNet on drive" in trained.stderr
    tested = run_script("test.py", "--checkpoint", weights / "fullnet" / "final.pth", "--data-root", small_drive,
                        "--device", "cpu", "--results-dir", results)
    assert tested.returncode == 0, tested.stderr
    assert "FOV AUC" in tested.stdout
