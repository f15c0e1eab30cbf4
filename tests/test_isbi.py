"""The ISBI 2012 levers: elastic deformation (AUGMENT elastic), U-Net's border weight map and the loss that
uses it (LOSS weighted_bce_dice), membrane post-processing before thinning (POSTPROCESS), the leaderboard's
maximum over thresholds, and the k-fold driver crossval.py. Hand-computed cases where a number can be worked
out, properties elsewhere, and one tiny main.py -> test.py round trip with every lever on."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import comparison
import crossval
import data
import evaluation
import fixtures
import framework
import main
import tasks
import test as test_script
import training
from conftest import TINY
from errors import UserError
from loss import WeightedBCEClDiceLoss, WeightedBCEDiceLoss, border_weight_map, build_loss, cl_dice, soft_skeleton
from metrics import membrane_segments, rand_info_over_thresholds, rand_info_scores
from tasks.em_cells import MERGED_COLOUR, cell_errors_picture, closed_membranes, membrane_map, merges_and_splits, \
    score_cells, watershed_membranes


def tiny_model():
    model = torch.nn.Conv2d(3, 1, 3, padding=1)
    model.num_classes = 1
    return model


def trainer_for(images, labels, model=None, **config):
    settings = {**dict(batch_size=2, epochs=2, amp=False, loss="bce", augment="elastic"), **config}
    return framework.Trainer(model or tiny_model(), images, labels, framework.TrainConfig(**settings),
                             torch.device("cpu"))


def membrane_stack(count=2, size=40):
    """uint8 images (N, 3, S, S) and labels (N, S, S): a membrane grid (class 1) between square cells."""
    label = np.zeros((size, size), np.uint8)
    label[::10] = label[:, ::10] = 1
    labels = torch.from_numpy(np.stack([np.roll(label, index, axis=1) for index in range(count)]))
    images = (labels[:, None].expand(count, 3, size, size) * 150 + 50).to(torch.uint8).contiguous()
    return images, labels


# --- elastic deformation -----------------------------------------------------------------------------

def test_elastic_at_alpha_zero_is_the_flips_augmentation_exactly():
    """The elastic plan draws its displacements after everything else, so at alpha 0 a run sees the very crops
    and flips of AUGMENT flips, and a zero field leaves the resampling unchanged."""
    images, labels = membrane_stack()
    flat = trainer_for(images, labels, augment="flips", patch_size=32)
    still = trainer_for(images, labels, patch_size=32, elastic_alpha=0.0)
    assert "elastic" not in flat.plan and not still.plan["elastic"].any()
    for _ in range(2):
        for first, second in zip(flat.batch(), still.batch()):
            assert torch.equal(first, second)
        flat.step_count += 1
        still.step_count += 1


def test_elastic_moves_image_and_label_through_one_field():
    """Image channels holding each pixel's column and row (linear, so bilinear sampling returns the sampled
    position exactly) and two label maps holding the same as integers (nearest): after one elastic resampling
    the label is the image's position rounded, everywhere inside the frame, so one field moved both."""
    size = 48
    rows, columns = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    image = torch.stack([columns, rows, torch.zeros_like(rows)]).float()[None] / 64
    maps = torch.stack([columns, rows])[None].to(torch.int32)
    identity = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    field = data.draw_displacements(1, size, torch.Generator().manual_seed(3), alpha=4.0, spacing=16)
    moved, moved_maps = data.apply_augmentation(image, maps, identity, torch.zeros(1, 3), displacements=field)
    position = moved[0, :2] * 64
    inside = ((moved_maps[0] >= 2) & (moved_maps[0] <= size - 3)).all(0)
    assert inside.float().mean() > 0.5
    gap = (position - moved_maps[0].float()).abs()[:, inside]
    assert float(gap.max()) <= 0.5 + 1e-3
    assert float((position - torch.stack([columns, rows]).float()).abs()[:, inside].mean()) > 1.0  # it moved


def test_an_elastic_label_stays_a_class_map():
    images, labels = membrane_stack(count=4, size=64)
    trainer = trainer_for(images, labels, batch_size=4, patch_size=32, elastic_alpha=15.0, elastic_spacing=16)
    crops, crop_labels = trainer.batch()
    assert crops.shape == (4, 3, 32, 32) and set(crop_labels.unique().tolist()) == {0, 1}


def test_the_elastic_field_comes_from_the_seed():
    images, labels = membrane_stack()
    first, again = trainer_for(images, labels, seed=5), trainer_for(images, labels, seed=5)
    other = trainer_for(images, labels, seed=6)
    assert torch.equal(first.plan["elastic"], again.plan["elastic"])
    assert not torch.equal(first.plan["elastic"], other.plan["elastic"])
    assert torch.equal(first.batch()[0], again.batch()[0])
    # 40 px whole images at 128 px spacing: the corners alone, 2 x 2 control points, 10 px per axis.
    assert first.plan["elastic"].shape == (first.total_steps, 2, 2, 2, 2)
    assert 5 < float(first.plan["elastic"].std()) < 15


def test_a_resumed_elastic_weighted_run_takes_the_steps_of_an_uninterrupted_one():
    """What --resume restores (weights, optimiser, step) plus the seeded plan and the weight maps, which are
    computed again from the labels, give the same weights bit for bit."""
    images, labels = membrane_stack(count=4, size=48)
    options = dict(batch_size=2, epochs=2, loss="weighted_bce_dice", patch_size=32, optimizer="adamw", lr=1e-2)
    torch.manual_seed(0)
    straight = trainer_for(images, labels, **options)
    start = {key: value.clone() for key, value in straight.model.state_dict().items()}
    for _ in range(4):
        straight.step()
    torch.manual_seed(0)
    cut = trainer_for(images, labels, **options)
    cut.step(), cut.step()
    model = tiny_model()
    model.load_state_dict(start)
    resumed = trainer_for(images, labels, model=model, **options)
    resumed.model.load_state_dict(cut.model.state_dict())
    resumed.optimizer.load_state_dict(cut.optimizer.state_dict())
    resumed.step_count = cut.step_count
    resumed.step(), resumed.step()
    for key, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


# --- U-Net's border weight map ----------------------------------------------------------------------

def test_border_weights_of_two_cells_and_a_one_pixel_membrane_by_hand():
    """3 x 5, column 2 the membrane: its pixels are 1 px from both cells, d1 + d2 = 2; 3 of the 15 pixels are
    membrane, so w_c = 15 / (2 * 3) = 2.5 there and 15 / (2 * 12) = 0.625 in the cells."""
    label = np.zeros((3, 5), np.uint8)
    label[:, 2] = 1
    weights = border_weight_map(label, w0=10, sigma=5)
    expected = np.full((3, 5), 0.625)
    expected[:, 2] = 2.5 + 10 * math.exp(-4 / 50)
    np.testing.assert_allclose(weights, expected, rtol=1e-6)


def test_the_border_term_uses_the_second_nearest_cell():
    """One row, cells A (columns 0-1), B (3) and C (6); column 2 lies 1 px from A and B; columns 4 and 5 lie
    1 px from one of B, C and 2 px from the other. 3 membrane pixels of 7: w_c = 7/6 and 7/8."""
    label = np.array([[0, 0, 1, 0, 1, 1, 0]], np.uint8)
    weights = border_weight_map(label, w0=10, sigma=5)
    gap = 7 / 6 + 10 * math.exp(-4 / 50)
    wide = 7 / 6 + 10 * math.exp(-9 / 50)
    np.testing.assert_allclose(weights[0], [7 / 8, 7 / 8, gap, 7 / 8, wide, wide, 7 / 8], rtol=1e-6)


def test_border_weights_without_a_second_cell_and_with_foreground_cells():
    one_cell = np.zeros((4, 4), np.uint8)
    one_cell[:, 0] = 1                                     # a membrane along the edge: one cell only
    np.testing.assert_allclose(border_weight_map(one_cell), np.where(one_cell, 2.0, 2 / 3), rtol=1e-6)
    label = np.array([[0, 0, 1, 0, 1, 1, 0]], np.uint8)
    np.testing.assert_array_equal(border_weight_map(1 - label, cells="foreground"), border_weight_map(label))
    with pytest.raises(UserError, match="unknown border cells"):
        border_weight_map(label, cells="membrane")


def test_the_trainer_moves_each_weight_map_with_its_label():
    """Whole-image crops with flips: every sample's weights are its label's map, flipped as the label is,
    and reach the loss as `weights`."""
    images, labels = membrane_stack(count=2, size=32)
    labels[1, 3:7, 3:7] = 1                                 # the two maps differ, and have no symmetry
    trainer = trainer_for(images, labels, loss="weighted_bce_dice", augment="flips", patch_size=32)
    maps = [torch.from_numpy(border_weight_map(label)) for label in labels.numpy()]
    _, batch_labels, extras = trainer.batch_with_maps()
    index = trainer.plan["indices"][0]
    for sample, weights in enumerate(extras["weights"]):
        full_label, full_map = labels[index[sample]], maps[index[sample]]
        variants = [k for k in range(8) if torch.equal(data.dihedral(full_label, k).long(), batch_labels[sample])]
        assert any(torch.allclose(data.dihedral(full_map, k), weights, atol=6e-4) for k in variants)
    seen = []
    criterion = trainer.criterion
    trainer.criterion = lambda logits, target, **extra: seen.append(extra) or criterion(logits, target, **extra)
    trainer.step()
    assert set(seen[0]) == {"weights"} and seen[0]["weights"].shape == (2, 32, 32)


# --- the weighted loss ----------------------------------------------------------------------------------

def test_weighted_bce_dice_by_hand_on_two_by_two():
    """p = [[1/2, 3/4], [1/4, 1/2]], g = [[1, 1], [0, 0]], w = [[1, 2], [3, 4]]:
    BCE terms ln 2, ln 4/3, ln 4/3, ln 2, weighted mean (5 ln 2 + 5 ln 4/3) / 10 = ln(8/3) / 2;
    Dice (smooth 1) = 1 - (2 * 5/4 + 1) / (9/8 + 2 + 1) = 1 - 3.5 / 4.125."""
    logits = torch.tensor([[[[0.0, math.log(3)], [-math.log(3), 0.0]]]])
    target = torch.tensor([[[1, 1], [0, 0]]])
    weights = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    loss = WeightedBCEDiceLoss()(logits, target, weights=weights)
    assert loss.item() == pytest.approx(math.log(8 / 3) / 2 + 1 - 3.5 / 4.125, abs=1e-6)


def test_weighted_loss_without_weights_computes_them_from_the_target():
    torch.manual_seed(0)
    _, labels = membrane_stack(count=2, size=24)
    logits = torch.randn(2, 1, 24, 24)
    loss = WeightedBCEDiceLoss(w0=5, sigma=3)
    weights = torch.from_numpy(np.stack([border_weight_map(label, 5, 3) for label in labels.numpy()]))
    assert loss(logits, labels).item() == pytest.approx(loss(logits, labels, weights=weights).item(), abs=1e-6)
    assert loss(logits, labels).item() != pytest.approx(loss(logits, labels, weights=torch.ones(2, 24, 24)).item())


def test_weighted_loss_is_for_binary_models():
    assert isinstance(build_loss("weighted_bce_dice", 1, 5.0, 3.0), WeightedBCEDiceLoss)
    with pytest.raises(UserError, match="binary maps"):
        build_loss("weighted_bce_dice", 3)
    with pytest.raises(UserError, match="--border-sigma 0.0 is out of range"):
        main.parse_settings(["--border-sigma", "0"])


# --- the topology term ----------------------------------------------------------------------------------

def test_soft_skeleton_of_a_band_is_its_middle_line():
    """A 5-px band, 2 erosions: the middle row, short of each end by 2 px; 1 erosion is too few for 5 px."""
    band = torch.zeros(1, 1, 12, 20)
    band[0, 0, 3:8, 2:18] = 1
    expected = torch.zeros(12, 20)
    expected[5, 4:16] = 1
    assert torch.equal(soft_skeleton(band, 2)[0, 0], expected)
    assert torch.equal(soft_skeleton(band, 3)[0, 0], expected)
    assert soft_skeleton(band, 1).sum() == 0


def gapped_band():
    """A 3-px band across a 12 x 20 frame (rows 4-6) and the same band with columns 8-11 cut out."""
    target = torch.zeros(1, 1, 12, 20)
    target[0, 0, 4:7] = 1
    gapped = target.clone()
    gapped[..., 8:12] = 0
    return target, gapped


def test_cl_dice_by_hand_on_a_gap_in_a_band():
    """True centreline: row 5, 20 px (the frame's edge does not erode), 4 of them in the gap, so
    T_sens = (16 + 1) / (20 + 1); each piece's centreline (row 5 less the cut end: 7 px) lies in the
    true band, T_prec = 1; clDice = 2 T_sens / (1 + T_sens) = 34 / 38. Without the gap pixels: 1."""
    target, gapped = gapped_band()
    assert cl_dice(target, target, iterations=1).item() == pytest.approx(1.0)
    assert cl_dice(gapped, target, iterations=1).item() == pytest.approx(34 / 38, abs=1e-6)
    valid = torch.ones_like(target)
    valid[..., 8:12] = 0
    assert cl_dice(gapped, target, iterations=1, valid=valid).item() == pytest.approx(1.0)


def test_weighted_cl_dice_loss_adds_the_topology_term_and_pulls_on_the_gap():
    target, gapped = gapped_band()
    logits = (gapped * 8 - 4).requires_grad_(True)            # confident, and wrong in the gap
    labels = target[:, 0].long()
    weights = torch.ones(1, 12, 20)
    loss = WeightedBCEClDiceLoss(weight=0.5, iterations=1)(logits, labels, weights=weights)
    base = WeightedBCEDiceLoss()(logits, labels, weights=weights)
    topology = cl_dice(torch.sigmoid(logits), target, iterations=1)
    assert loss.item() == pytest.approx(base.item() + 0.5 * (1 - topology.item()), abs=1e-6)
    assert topology.item() < 0.95
    loss.backward()
    assert (logits.grad[0, 0, 5, 8:12] < 0).all()             # raising the gap's logits lowers the loss


def test_weighted_cl_dice_loss_is_built_by_name_for_binary_models():
    loss = build_loss("weighted_bce_cldice", 1, 5.0, 3.0)
    assert isinstance(loss, WeightedBCEClDiceLoss) and loss.uses_weight_map and (loss.w0, loss.sigma) == (5.0, 3.0)
    with pytest.raises(UserError, match="binary maps"):
        build_loss("weighted_bce_cldice", 2)
    with pytest.raises(UserError, match="iterations >= 1"):
        WeightedBCEClDiceLoss(iterations=0)


# --- post-processing and the leaderboard's maximum ------------------------------------------------------

def gapped_membrane(size=16, gap=0.4):
    """Ground truth: one vertical membrane (column 8) between two cells. Prediction: confident cells (0.02), a
    confident membrane (0.95) but for one pixel that only reaches `gap`, below the threshold 0.5."""
    truth = np.zeros((size, size), bool)
    truth[:, 8] = True
    prob = np.where(truth, 0.95, 0.02).astype(np.float32)
    prob[8, 8] = gap
    return torch.from_numpy(prob)[None], tasks.Sample("gap", np.zeros((size, size, 3), np.uint8),
                                                      truth.astype(np.uint8))


def test_closing_and_watershed_close_a_one_pixel_gap_and_vrand_rises():
    """The raw map merges the two cells: V^Rand = 2 (128^2 + 112^2) / (240^2 + 128^2 + 112^2) over the 240
    pixels of the cells; either post-processing restores the membrane and V^Rand = 1."""
    prob, sample = gapped_membrane()
    raw, _ = score_cells(prob, sample, 0.5)
    assert raw["VRand"] == pytest.approx(2 * (128 ** 2 + 112 ** 2) / (240 ** 2 + 128 ** 2 + 112 ** 2))
    for postprocess in ("closing", "watershed"):
        row, _ = score_cells(prob, sample, 0.5, postprocess=postprocess)
        assert row["VRand"] == pytest.approx(1.0) and row["VInfo"] == pytest.approx(1.0), postprocess
        assert row["VRand raw"] == raw["VRand"] and row["VInfo raw"] == raw["VInfo"]
    assert watershed_membranes(prob[0].numpy())[8, 8]


def test_closing_keeps_membranes_that_meet_the_border():
    """A plain binary closing erodes against a black outside and would cut the membrane's end pixel, joining
    the two cells there; edge replication keeps it."""
    mask = np.zeros((10, 10), bool)
    mask[:, 4] = True
    np.testing.assert_array_equal(closed_membranes(mask), mask)


def test_watershed_of_a_map_without_seeds_draws_no_membrane():
    assert not watershed_membranes(np.full((8, 8), 0.9, np.float32)).any()
    with pytest.raises(UserError, match="unknown post-processing"):
        membrane_map(torch.zeros(1, 4, 4), 0.5, "dilation")


def test_the_row_keeps_its_keys_first_and_adds_the_leaderboard_maximum():
    """The max over thresholds includes 0.5, so it is never below the 0.5 value; here a faint membrane (0.3)
    is found at a threshold below 0.3 only."""
    prob, sample = gapped_membrane(gap=0.95)
    prob = torch.where(prob > 0.5, torch.tensor(0.3), prob)
    row, _ = score_cells(prob, sample, 0.5)
    assert list(row)[:2] == ["VRand", "VInfo"]
    assert {"VRand max", "VRand max threshold", "VInfo max", "VInfo max threshold"} <= set(row)
    assert "VRand raw" not in row
    assert row["VRand"] == rand_info_scores(prob[0].numpy() > 0.5, sample.label == 1)["VRand"] < 1
    assert row["VRand max"] == 1.0 and row["VRand max threshold"] == 0.05
    generator = np.random.default_rng(0)
    for _ in range(3):
        noisy = np.clip(np.where(sample.label == 1, 0.7, 0.3) + generator.normal(0, 0.25, (16, 16)), 0, 1)
        best = rand_info_over_thresholds(noisy, sample.label == 1)
        at_half = rand_info_scores(noisy > 0.5, sample.label == 1)
        assert best["VRand max"] >= at_half["VRand"] and best["VInfo max"] >= at_half["VInfo"]


def test_postprocess_is_refused_where_no_scoring_reads_it():
    settings = main.parse_settings(["--postprocess", "watershed"])[0]
    with pytest.raises(UserError, match="applies to the scoring of isbi2012, isbi2012_stack, monuseg, monuseg_contour only"):
        evaluation.score_options(settings, tasks.dataset("drive"))
    assert evaluation.score_options({**settings, "DATASET": "isbi2012"}, tasks.dataset("isbi2012")) == \
        {"postprocess": "watershed", "watershed_seed": 0.2}
    closing = {**settings, "POSTPROCESS": "closing", "DATASET": "monuseg"}
    with pytest.raises(UserError, match="--postprocess closing is not one for 'monuseg'; choose none or watershed"):
        evaluation.score_options(closing, tasks.dataset("monuseg"))
    assert evaluation.score_options({**closing, "DATASET": "isbi2012"}, tasks.dataset("isbi2012"))["postprocess"] \
        == "closing"


def test_thinning_keeps_membranes_reaching_the_border():
    """A 5 px membrane band across the whole image, and a 1 px prediction along its centre: thinned without
    the edge replication, the band would end 2 px short of the top and bottom and join the two cells there."""
    truth = np.zeros((20, 20), bool)
    truth[:, 8:13] = True
    line = np.zeros((20, 20), bool)
    line[:, 10] = True
    assert rand_info_scores(line, truth) == {"VRand": 1.0, "VInfo": 1.0}
    from skimage.morphology import thin
    assert rand_info_scores(thin(line), thin(truth), thin=False)["VRand"] < 0.7  # what the edge padding prevents


ISBI = Path(__file__).resolve().parents[2] / "shared" / "ISBI2012"


@pytest.mark.skipif(not (ISBI / "train-labels.tif").is_file(), reason=f"ISBI 2012 not found at {ISBI}")
def test_thinning_a_real_label_merges_none_of_its_cells():
    """Slice 17 of the training labels: 95 cells between its membranes; each stays its own segment once thinned
    (plain thinning leaves 67, its largest segment 104511 px where the largest cell has 21832)."""
    label = next(sample for sample in tasks.load_split("isbi2012", ISBI, "all", tasks.SplitOptions())
                 if sample.name == "slice17").label == 1
    cells, thinned = membrane_segments(label, thin=False), membrane_segments(label)
    pairs = np.unique(np.stack([thinned[cells > 0], cells[cells > 0]]), axis=1)
    assert cells.max() == 95 and len(pairs[0]) == len(np.unique(pairs[0])) == 95


# --- every lever through main.py -> test.py, and crossval.py --------------------------------------------

LEVERS = ["--augment", "elastic", "--loss", "weighted_bce_dice", "--patch-size", "64", "--epochs", "1"]


def three_true_cells():
    """Label image 20 x 60: cells 1, 2, 3 in columns 0-18, 20-38, 40-59, membranes (0) in columns 19 and 39."""
    truth = np.zeros((20, 60), np.int64)
    truth[:, :19], truth[:, 20:39], truth[:, 40:] = 1, 2, 3
    return truth


def test_merges_and_splits_by_hand():
    """Predicted segment 1 spans cells 1 and 2 (a lost membrane): both merged. Cell 3 is cut by a predicted
    membrane in row 10 into segments 2 and 3 (180 and 200 px, both over 20 % and 50 px): split. Segment 4, a
    5-pixel sliver of cell 3, is too small to count as a part."""
    truth = three_true_cells()
    predicted = np.zeros_like(truth)
    predicted[:, :39] = 1
    predicted[:10, 40:], predicted[11:, 40:] = 2, 3
    predicted[:5, 59] = 4
    assert merges_and_splits(predicted, truth) == ([1, 2], [3])


def test_a_membrane_drawn_a_few_pixels_off_is_neither_merge_nor_split():
    """The membrane between cells 1 and 2 predicted in column 22 instead of 19: segment 1 holds all of cell 1
    and 40 px (11 %) of cell 2, under both the 20 % share and the 50 px floor."""
    truth = three_true_cells()
    predicted = np.zeros_like(truth)
    predicted[:, :22], predicted[:, 23:39], predicted[:, 40:] = 1, 2, 3
    assert merges_and_splits(predicted, truth) == ([], [])


def test_the_cells_picture_tints_the_cells_a_gap_merges_and_draws_the_membranes():
    prob, sample = gapped_membrane()
    picture, merged, split = cell_errors_picture(prob, sample, 0.5)
    assert picture.shape == (16, 16, 3) and picture.dtype == np.uint8
    assert (merged, split) == (2, 0)
    np.testing.assert_array_equal(picture[3, 2], (0.5 * MERGED_COLOUR).round())
    np.testing.assert_array_equal(picture[3, 8], [255, 255, 255])  # the membrane, thinned to its own column
    closed, merged, split = cell_errors_picture(prob, sample, 0.5, postprocess="watershed")
    assert (merged, split) == (0, 0) and not closed[:, :8].any() and (closed[:, 8] == 255).all()


def test_main_then_test_with_every_lever_on_a_synthetic_stack(tmp_path, capsys):
    root = fixtures.write_isbi_volume(tmp_path / "ISBI", pages=10, size=64)
    main.main([str(arg) for arg in ["--dataset", "isbi2012", "--data-root", root, *TINY, *LEVERS,
                                    "--weights-dir", tmp_path / "w", "--run-name", "levers"]])
    checkpoint = tmp_path / "w" / "levers" / "final.pth"
    payload = torch.load(checkpoint, weights_only=True)
    assert payload["settings"]["AUGMENT"] == "elastic" and payload["settings"]["LOSS"] == "weighted_bce_dice"
    test_script.main([str(arg) for arg in ["--checkpoint", checkpoint, "--out", tmp_path / "r", "--device", "cpu",
                                           "--postprocess", "watershed"]])
    report = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert report["protocol"]["postprocess"] == "watershed"
    assert list(report["summary"]) == ["VRand", "VInfo", "VRand raw", "VInfo raw", "VRand max",
                                       "VRand max threshold", "VInfo max", "VInfo max threshold"]
    assert set(report["per_image"]) == {"slice00", "slice01"}  # fold 0 of 5: the first fifth of the stack
    for name, value in report["summary"].items():
        assert 0 <= value["mean"] <= 1, name
    assert "Postprocess: watershed" in (tmp_path / "r" / "metrics.md").read_text()
    assert np.array(Image.open(tmp_path / "r" / "slice00_cells.png")).shape == (64, 64, 3)
    capsys.readouterr()


def test_crossval_runs_each_fold_once_and_scores_trained_folds_again(tmp_path, monkeypatch, capsys):
    root = fixtures.write_isbi_volume(tmp_path / "ISBI", pages=4, size=64)
    flags = ["--name", "cv", "--folds", "2", "--dataset", "isbi2012", "--data-root", root, *TINY, *LEVERS,
             "--weights-dir", tmp_path / "w", "--results-dir", tmp_path / "r"]
    crossval.main(flags)
    table = json.loads((tmp_path / "r" / "cv.json").read_text())
    assert [record["fold"] for record in table["records"]] == [0, 1]
    assert table["aggregate"]["images"] == 4 and set(table["aggregate"]["over_folds"]) >= {"VRand", "VRand max"}
    fold_means = [record["summary"]["VRand"] for record in table["records"]]
    assert table["aggregate"]["over_folds"]["VRand"]["mean"] == pytest.approx(np.mean(fold_means))
    assert "mean ± std over folds (n=2)" in (tmp_path / "r" / "cv.md").read_text()
    as_one_run = comparison.load_crossval_table(tmp_path / "r" / "cv.json")   # what compare.py reads
    assert (as_one_run["patch_size"], as_one_run["batch_size"]) == (64, 2)   # LEVERS, TINY

    def no_training(*args, **kwargs):
        raise AssertionError("a trained fold was trained again")

    monkeypatch.setattr(training, "train", no_training)
    crossval.main(flags)                                   # everything recorded: nothing runs
    assert "fold 0: recorded" in capsys.readouterr().out
    crossval.main([*flags, "--table", "cv_closing", "--postprocess", "closing"])   # scored again, not trained
    assert "fold 1: score" in capsys.readouterr().out
    closing = json.loads((tmp_path / "r" / "cv_closing.json").read_text())
    assert all(record["protocol"]["postprocess"] == "closing" for record in closing["records"])
    crossval.main([*flags, "--table", "cv_one", "--only", "1", "--postprocess", "watershed"])
    assert "fold 0: left out (--only)" in capsys.readouterr().out
    one = json.loads((tmp_path / "r" / "cv_one.json").read_text())
    assert [record["fold"] for record in one["records"]] == [1]
    assert one["command"].startswith("python crossval.py --name cv --folds 2 ") and "--only" not in one["command"]
    assert one["command"].endswith("--table cv_one --postprocess watershed")
    with pytest.raises(UserError, match="--fold does not apply to crossval.py"):
        crossval.main([*flags, "--fold", "1"])
    with pytest.raises(UserError, match="--only '7' must name folds between 0 and 1"):
        crossval.main([*flags, "--only", "7"])
