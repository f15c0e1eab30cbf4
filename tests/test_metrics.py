"""Metrics against values worked out by hand (CPU, small arrays)."""
import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from metrics import (binary_metrics, boundary_mae, boundary_positions, f1_by_threshold, overlap_error,
                     rand_info_scores, roc_auc, roc_curve, summarize, threshold_metrics)


def picture(text):
    """Bool array from rows of '#' (True) and '.' (False)."""
    return np.array([[ch == "#" for ch in line] for line in text.split()], dtype=bool)


# --- ROC ---------------------------------------------------------------------------------

def test_roc_auc_hand_case():
    # positives 0.35, 0.8; negatives 0.1, 0.4. Pairs (pos > neg):
    # 0.35 > 0.1 yes, 0.35 > 0.4 no, 0.8 > both yes -> 3 of 4 = 0.75
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    labels = torch.tensor([False, False, True, True])
    assert roc_auc(scores, labels) == pytest.approx(0.75, abs=1e-12)


def test_roc_ties_get_half_credit():
    # positives 0.5, 0.9; negatives 0.1, 0.5.
    # 0.5 vs 0.1: 1; 0.5 vs 0.5 (tie): 1/2; 0.9 vs both: 2 -> 3.5 / 4 = 0.875
    scores = torch.tensor([0.1, 0.5, 0.5, 0.9])
    labels = torch.tensor([False, False, True, True])
    assert roc_auc(scores, labels) == pytest.approx(0.875, abs=1e-12)
    # one point per distinct threshold: start (0,0); t=0.9 admits 1 pos -> (0, 1/2);
    # t=0.5 admits the tie group (1 pos, 1 neg) -> (1/2, 1); t=0.1 -> (1, 1)
    fpr, tpr = roc_curve(scores, labels)
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 1.0, 1.0]


def test_roc_auc_perfect_inverted_and_one_class():
    scores = torch.tensor([0.1, 0.2, 0.8, 0.9])
    labels = torch.tensor([False, False, True, True])
    assert roc_auc(scores, labels) == 1.0
    assert roc_auc(scores, ~labels) == 0.0
    assert math.isnan(roc_auc(scores, torch.ones(4, dtype=torch.bool)))
    assert math.isnan(roc_auc(scores, torch.zeros(4, dtype=torch.bool)))


def test_roc_curve_endpoints_and_monotonicity():
    generator = torch.Generator().manual_seed(1)
    scores = torch.rand(500, generator=generator).mul(20).round()  # 21 distinct values, many ties
    labels = torch.rand(500, generator=generator) < 0.3
    fpr, tpr = roc_curve(scores, labels)
    assert (fpr[0].item(), tpr[0].item()) == (0.0, 0.0)
    assert (fpr[-1].item(), tpr[-1].item()) == (1.0, 1.0)
    assert len(fpr) == scores.unique().numel() + 1
    assert (fpr.diff() >= 0).all() and (tpr.diff() >= 0).all()
    assert fpr.dtype == torch.float64


def test_roc_auc_matches_scikit_learn():
    rng = np.random.default_rng(0)
    labels = rng.random(10_000) < 0.2
    scores = np.round(rng.random(10_000) * 0.5 + labels * 0.3, 3)  # overlapping classes with ties
    expected = roc_auc_score(labels, scores)
    assert roc_auc(torch.from_numpy(scores), torch.from_numpy(labels)) == pytest.approx(expected, abs=1e-9)
    assert roc_auc(scores.astype(np.float32), labels) == pytest.approx(
        roc_auc_score(labels, scores.astype(np.float32)), abs=1e-9)


def test_roc_curve_rejects_bad_shapes():
    with pytest.raises(ValueError, match="1-D"):
        roc_curve(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="1-D"):
        roc_curve(torch.zeros(3), torch.zeros(4, dtype=torch.bool))


# --- thresholded metrics -------------------------------------------------------------------

PROB = torch.tensor([[0.9, 0.2, 0.6],
                     [0.4, 0.7, 0.1],
                     [0.8, 0.3, 0.5]])
LABEL = torch.tensor([[1, 0, 0],
                      [1, 1, 0],
                      [1, 0, 1]], dtype=torch.bool)


def test_binary_metrics_hand_case():
    # prediction (> 0.5; 0.5 itself is negative):
    #   [[1, 0, 1], [0, 1, 0], [1, 0, 0]]
    # TP: (0,0) (1,1) (2,0) = 3    FP: (0,2) = 1
    # FN: (1,0) (2,2) = 2          TN: (0,1) (1,2) (2,1) = 3
    # Sen = 3/5, Spe = 3/4, Acc = 6/9, F1 = 6 / (6 + 1 + 2) = 2/3
    # AUC: positives {0.9, 0.4, 0.7, 0.8, 0.5}, negatives {0.2, 0.6, 0.1, 0.3}
    #   0.9, 0.7, 0.8 beat all 4 (12); 0.4 and 0.5 beat 0.2, 0.1, 0.3 (3 + 3) -> 18/20
    result = binary_metrics(PROB, LABEL)
    assert set(result) == {"AUC", "Acc", "Sen", "Spe", "F1"}
    assert result["Sen"] == pytest.approx(3 / 5)
    assert result["Spe"] == pytest.approx(3 / 4)
    assert result["Acc"] == pytest.approx(6 / 9)
    assert result["F1"] == pytest.approx(2 / 3)
    assert result["AUC"] == pytest.approx(0.9)
    assert all(isinstance(value, float) for value in result.values())


def test_binary_metrics_with_mask():
    # mask drops column 0: remaining prob [[0.2, 0.6], [0.7, 0.1], [0.3, 0.5]]
    #                          label [[0, 0], [1, 0], [0, 1]]
    # TP: 0.7 = 1; FP: 0.6 = 1; FN: 0.5 = 1; TN: 0.2, 0.1, 0.3 = 3
    # Sen = 1/2, Spe = 3/4, Acc = 4/6, F1 = 2 / (2 + 1 + 1) = 1/2
    # AUC: positives {0.7, 0.5} vs negatives {0.2, 0.6, 0.1, 0.3}: 4 + 3 = 7 of 8
    mask = torch.tensor([[0, 1, 1]] * 3, dtype=torch.bool)
    result = binary_metrics(PROB, LABEL, mask=mask)
    assert result["Sen"] == pytest.approx(1 / 2)
    assert result["Spe"] == pytest.approx(3 / 4)
    assert result["Acc"] == pytest.approx(4 / 6)
    assert result["F1"] == pytest.approx(1 / 2)
    assert result["AUC"] == pytest.approx(7 / 8)


def test_binary_metrics_threshold_and_undefined_ratios():
    # threshold 0.75: predicted {0.9, 0.8}, both positive -> TP 2, FP 0, FN 3, TN 4
    result = binary_metrics(PROB, LABEL, threshold=0.75)
    assert result["Sen"] == pytest.approx(2 / 5)
    assert result["Spe"] == pytest.approx(1.0)
    # no positive pixel: Sen and AUC undefined; the 4 pixels above 0.5 (0.9, 0.6, 0.7, 0.8)
    # are all FP, TN = 5: Spe = 5/9, F1 = 0 / (0 + 4 + 0) = 0
    empty = binary_metrics(PROB, torch.zeros(3, 3, dtype=torch.bool))
    assert math.isnan(empty["Sen"]) and math.isnan(empty["AUC"])
    assert empty["F1"] == 0.0 and empty["Spe"] == pytest.approx(5 / 9)


def test_f1_by_threshold_hand_case():
    # PROB / LABEL above: positives 0.9, 0.8, 0.7, 0.5, 0.4; negatives 0.6, 0.3, 0.2, 0.1.
    # t = 0.5: TP 3 (0.9, 0.8, 0.7; 0.5 is not above 0.5), FP 1 (0.6), FN 2 -> F1 = 6 / 9.
    # t = 0.6: the FP 0.6 is not above it -> 6 / 8.  t = 0.75: TP 2, FP 0, FN 3 -> 4 / 7.  t = 0.95: 0.
    scores = f1_by_threshold(PROB, LABEL, thresholds=[0.5, 0.6, 0.75, 0.95])
    assert scores.tolist() == pytest.approx([6 / 9, 6 / 8, 4 / 7, 0.0])


def test_f1_by_threshold_matches_threshold_metrics_at_every_threshold():
    generator = torch.Generator().manual_seed(3)
    prob = torch.rand(40, 50, generator=generator).round(decimals=2)  # many pixels exactly on a threshold
    label = torch.rand(40, 50, generator=generator) < 0.3
    mask = torch.rand(40, 50, generator=generator) < 0.7
    scores = f1_by_threshold(prob, label, mask)
    assert scores.shape == (99,)
    for index, threshold in enumerate(step / 100 for step in range(1, 100)):
        assert scores[index].item() == pytest.approx(threshold_metrics(prob, label, mask, threshold)["F1"]), threshold


def test_f1_by_threshold_without_foreground_and_bad_grids():
    nothing = torch.zeros(3, 3, dtype=torch.bool)
    scores = f1_by_threshold(PROB, nothing, thresholds=[0.5, 0.95])
    assert scores[0].item() == 0.0 and math.isnan(scores[1].item())  # FP only; then nothing at all
    with pytest.raises(ValueError, match="increasing"):
        f1_by_threshold(PROB, LABEL, thresholds=[0.5, 0.4])


def test_binary_metrics_accepts_numpy_and_checks_shapes():
    result = binary_metrics(PROB.numpy(), LABEL.numpy())
    assert result["F1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="shape"):
        binary_metrics(PROB, LABEL[:2])
    with pytest.raises(ValueError, match="mask"):
        binary_metrics(PROB, LABEL, mask=torch.ones(2, 3, dtype=torch.bool))


# --- overlap error -------------------------------------------------------------------------

def test_overlap_error_of_shifted_squares():
    # 4x4 squares at columns 0-3 and 2-5: overlap 4 rows x 2 columns = 8,
    # union 16 + 16 - 8 = 24  ->  E = 1 - 8/24 = 2/3
    pred = np.zeros((8, 8), bool)
    gt = np.zeros((8, 8), bool)
    pred[0:4, 0:4] = True
    gt[0:4, 2:6] = True
    assert overlap_error(pred, gt) == pytest.approx(2 / 3)
    assert overlap_error(torch.from_numpy(pred), torch.from_numpy(pred)) == 0.0
    assert overlap_error(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 0.0
    assert overlap_error(pred, np.zeros((8, 8), bool)) == 1.0
    with pytest.raises(ValueError, match="shape"):
        overlap_error(pred, gt[:4])


# --- V^Rand and V^Info ---------------------------------------------------------------------

# Two 1-pixel membranes in columns 2 and 5 cut a 2x8 image into A (cols 0-1), B (3-4), C (6-7).
THREE_CELLS = picture("""
..#..#..
..#..#..
""")


def test_rand_info_identical_segmentations_score_one():
    for thin in (True, False):
        scores = rand_info_scores(THREE_CELLS, THREE_CELLS, thin=thin)
        assert scores["VRand"] == pytest.approx(1.0, abs=1e-12)
        assert scores["VInfo"] == pytest.approx(1.0, abs=1e-12)


def test_rand_info_merge():
    # Prediction keeps only the membrane at column 5: its segment L covers A, B (and column 2,
    # a ground-truth membrane, hence not scored); R = C. Scored pixels n = 12, counts n_ij:
    #          A  B  C
    #     L    4  4  0      s = (8, 4)
    #     R    0  0  4      t = (4, 4, 4)
    # V^Rand = 2 (16 + 16 + 16) / ((64 + 16) + (16 + 16 + 16)) = 96 / 128 = 0.75
    # Probabilities p_ij = 1/3 each: H(T) = ln 3, H(S,T) = ln 3,
    # H(S) = -(2/3 ln 2/3 + 1/3 ln 1/3) = ln 3 - 2/3 ln 2, I = H(S) + H(T) - H(S,T) = H(S)
    # V^Info = 2 (ln 3 - 2/3 ln 2) / (2 ln 3 - 2/3 ln 2)
    pred = picture("""
    .....#..
    .....#..
    """)
    scores = rand_info_scores(pred, THREE_CELLS, thin=False)
    assert scores["VRand"] == pytest.approx(0.75, abs=1e-12)
    h_pred = math.log(3) - 2 / 3 * math.log(2)
    assert scores["VInfo"] == pytest.approx(2 * h_pred / (h_pred + math.log(3)), abs=1e-12)
    assert scores == pytest.approx(rand_info_scores(pred, THREE_CELLS, thin=True))


def test_rand_info_everything_merged():
    # No predicted membrane: one segment over the 12 scored pixels, t = (4, 4, 4).
    # V^Rand = 2 * 48 / (144 + 48) = 0.5;  H(S) = 0, so I = 0 and V^Info = 0
    scores = rand_info_scores(np.zeros((2, 8), bool), THREE_CELLS, thin=False)
    assert scores["VRand"] == pytest.approx(0.5, abs=1e-12)
    assert scores["VInfo"] == pytest.approx(0.0, abs=1e-12)


def test_rand_info_split_counts_predicted_membrane_as_singletons():
    # Ground truth: membrane at column 5 only -> L (cols 0-4, 10 px) and C (6-7, 4 px); n = 14.
    # Prediction adds a membrane at column 2: segments A (4 px), B (4 px), C (4 px), and the 2
    # membrane pixels of column 2 inside L are singletons (1 px each):
    #            L   C
    #     A      4   0
    #     B      4   0
    #     C      0   4
    #     x1     1   0
    #     x2     1   0       s = (4, 4, 4, 1, 1),  t = (10, 4)
    # V^Rand = 2 (16 + 16 + 16 + 1 + 1) / ((16 * 3 + 1 + 1) + (100 + 16)) = 100 / 166
    # Info (p = count / 14): H(T) = -(10/14 ln 10/14 + 4/14 ln 4/14);
    # every row holds one cell, so H(S,T) = H(S) and I = H(T): V^Info = 2 H(T) / (H(S) + H(T))
    gt = picture("""
    .....#..
    .....#..
    """)
    scores = rand_info_scores(THREE_CELLS, gt, thin=False)
    assert scores["VRand"] == pytest.approx(100 / 166, abs=1e-12)
    h_true = -(10 / 14 * math.log(10 / 14) + 4 / 14 * math.log(4 / 14))
    h_pred = -(3 * 4 / 14 * math.log(4 / 14) + 2 * 1 / 14 * math.log(1 / 14))
    assert scores["VInfo"] == pytest.approx(2 * h_true / (h_pred + h_true), abs=1e-12)


# A 3-pixel-wide membrane ring (4-neighbour dilation of THIN_RING) and the 1-pixel ring that
# scikit-image's thinning reduces it to.
THICK_RING = picture("""
............
............
.....##.....
....####....
...######...
..###..###..
..###..###..
...######...
....####....
.....##.....
............
............
""")
THIN_RING = picture("""
............
............
............
.....##.....
....#..#....
...#....#...
...#....#...
....#..#....
.....##.....
............
............
............
""")


def test_rand_info_thinning_reduces_a_thick_membrane_to_its_centre_line():
    # With thinning, the thick ring scores exactly like its 1-pixel version (here: perfectly).
    assert rand_info_scores(THICK_RING, THIN_RING) == pytest.approx({"VRand": 1.0, "VInfo": 1.0}, abs=1e-12)
    # Without it, the extra membrane pixels are singletons. Ground truth: 144 px - 12 ring =
    # 132 scored: inside 12, outside 120. Thick ring: 36 px, of which 24 are scored
    # singletons; the prediction's inside is 4 px, its outside 144 - 36 - 4 = 104.
    # sum n_ij^2 = sum s_i^2 = 4^2 + 104^2 + 24 = 10856;  sum t_j^2 = 12^2 + 120^2 = 14544
    # V^Rand = 2 * 10856 / (10856 + 14544) = 21712 / 25400
    unthinned = rand_info_scores(THICK_RING, THIN_RING, thin=False)
    assert unthinned["VRand"] == pytest.approx(21712 / 25400, abs=1e-12)


def challenge_style_scores(pred_boundary, gt_boundary):
    """The challenge script's bookkeeping, written independently: a dense table that keeps
    the predicted-membrane column 0 and corrects for it (sum p_i0 / n in the squared sums,
    -sum p_i0 log n in the entropies) instead of expanding it into singletons."""
    from metrics import boundaries_to_segments
    true_ids = boundaries_to_segments(gt_boundary).ravel()
    pred_ids = boundaries_to_segments(pred_boundary).ravel()
    n = np.count_nonzero(true_ids)
    table = np.zeros((true_ids.max() + 1, pred_ids.max() + 1))
    np.add.at(table, (true_ids, pred_ids), 1.0)
    table = table[1:] / n                      # drop ground-truth membrane rows
    on_membrane = table[:, 0].sum()
    a, b, inner = table.sum(axis=1), table[:, 1:].sum(axis=0), table[:, 1:]
    sum_ab = (inner ** 2).sum() + on_membrane / n
    v_rand = 2 * sum_ab / ((a ** 2).sum() + (b ** 2).sum() + on_membrane / n)

    def plogp(p):
        p = p[p > 0]
        return (p * np.log(p)).sum()
    h_true = -plogp(a)
    h_pred = -plogp(b) + on_membrane * np.log(n)
    h_joint = -plogp(inner) + on_membrane * np.log(n)
    return v_rand, 2 * (h_true + h_pred - h_joint) / (h_true + h_pred)


def test_rand_info_agrees_with_the_challenge_bookkeeping_on_random_membranes():
    rng = np.random.default_rng(3)
    for _ in range(3):
        gt = rng.random((40, 48)) < 0.15
        pred = rng.random((40, 48)) < 0.25
        scores = rand_info_scores(pred, gt, thin=False)
        v_rand, v_info = challenge_style_scores(pred, gt)
        assert scores["VRand"] == pytest.approx(v_rand, abs=1e-12)
        assert scores["VInfo"] == pytest.approx(v_info, abs=1e-12)


def test_rand_info_input_checks_and_empty_ground_truth():
    with pytest.raises(ValueError, match="shape"):
        rand_info_scores(np.zeros((4, 4), bool), np.zeros((4, 5), bool))
    everything_membrane = rand_info_scores(np.zeros((3, 3), bool), np.ones((3, 3), bool), thin=False)
    assert math.isnan(everything_membrane["VRand"]) and math.isnan(everything_membrane["VInfo"])


def test_rand_info_single_segment_both_sides_is_one():
    # H(S) + H(T) = 0: defined as V^Info = 1; V^Rand = 2 * 16^2 / (16^2 + 16^2) = 1
    scores = rand_info_scores(np.zeros((4, 4), bool), np.zeros((4, 4), bool))
    assert scores == {"VRand": 1.0, "VInfo": 1.0}


# --- OCT layer boundaries ----------------------------------------------------------------

def layers_from_boundaries(boundary_rows, height):
    """Label map whose class steps up by one at each boundary row (top to bottom)."""
    rows = np.arange(height).reshape(-1, 1)
    return sum((rows >= np.asarray(b).reshape(1, -1)).astype(np.int64) for b in boundary_rows)


def test_boundary_positions_staircase():
    gt = layers_from_boundaries([[2, 3, 4, 5]], height=8)
    assert gt[:, 0].tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    np.testing.assert_array_equal(boundary_positions(gt, 2), [[2, 3, 4, 5]])


def test_boundary_mae_staircase_shifted_in_two_columns():
    # gt rows [2, 3, 4, 5]; prediction [3, 3, 4, 6] (columns 0 and 3 one row lower)
    # |diff| = [1, 0, 0, 1]  ->  MAE = 2 / 4 = 0.5
    gt = layers_from_boundaries([[2, 3, 4, 5]], height=8)
    pred = layers_from_boundaries([[3, 3, 4, 6]], height=8)
    np.testing.assert_allclose(boundary_mae(pred, gt, 2), [0.5])
    assert boundary_mae(torch.from_numpy(gt), torch.from_numpy(gt), 2).tolist() == [0.0]


def test_boundary_mae_skips_columns_without_the_boundary():
    # 3 classes. Boundary 0: gt [1, 1, 1, 1], pred [1, 2, 1, 1] -> |diff| [0, 1, 0, 0] -> 1/4.
    # Boundary 1: gt [4, 5, 6, 7]; the prediction never reaches class 2 in column 3, so that
    # column is NaN and left out: pred [4, 7, 6, -] -> |diff| [0, 2, 0] -> 2/3.
    gt = layers_from_boundaries([[1, 1, 1, 1], [4, 5, 6, 7]], height=8)
    pred = layers_from_boundaries([[1, 2, 1, 1], [4, 7, 6, 99]], height=8)
    positions = boundary_positions(pred, 3)
    assert np.isnan(positions[1, 3]) and positions[1, :3].tolist() == [4.0, 7.0, 6.0]
    np.testing.assert_allclose(boundary_mae(pred, gt, 3), [1 / 4, 2 / 3])


def test_boundary_mae_all_missing_is_nan_without_warning():
    gt = layers_from_boundaries([[2, 3]], height=4)
    pred = np.zeros((4, 2), np.int64)  # boundary never present
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # np.nanmean would warn "Mean of empty slice"
        assert np.isnan(boundary_mae(pred, gt, 2)).all()
    with pytest.raises(ValueError, match="shape"):
        boundary_mae(pred, gt[:3], 2)


# --- summary -------------------------------------------------------------------------------------

def test_summarize_population_std_and_nan():
    # a = 1, 3, 5: mean 3, std sqrt((4 + 0 + 4) / 3) = sqrt(8/3)
    # b = 2, nan, 4: nan skipped -> mean 3, std sqrt((1 + 1) / 2) = 1
    # c only ever NaN -> NaN
    rows = [{"a": 1.0, "b": 2.0, "c": math.nan}, {"a": 3.0, "b": math.nan}, {"a": 5.0, "b": 4.0}]
    summary = summarize(rows)
    assert list(summary) == ["a", "b", "c"]
    assert summary["a"]["mean"] == pytest.approx(3.0)
    assert summary["a"]["std"] == pytest.approx(math.sqrt(8 / 3))
    assert summary["b"] == pytest.approx({"mean": 3.0, "std": 1.0})
    assert math.isnan(summary["c"]["mean"]) and math.isnan(summary["c"]["std"])
    assert summarize([]) == {}


def test_drive_scoring_counts_only_the_field_of_view_for_fov_metrics():
    """A prediction wrong only outside the FOV: perfect inside, imperfect over the whole image. Scoring that
    ignored the mask would report the same numbers for both."""
    from tasks import Sample
    from tasks.drive import score_vessels
    label = np.zeros((4, 4), np.uint8)
    label[1:3, 1:3] = 1
    fov = np.zeros((4, 4), bool)
    fov[1:3, :] = True                             # rows 1 and 2
    prob = torch.tensor(label, dtype=torch.float32)[None] * 0.9 + 0.05
    prob[0, 0, 0] = 0.95                           # a false positive outside the FOV
    row, curve = score_vessels(prob, Sample("x", np.zeros((4, 4, 3), np.uint8), label, fov), 0.5)
    assert row["FOV Acc"] == 1.0 and row["FOV AUC"] == 1.0 and row["FOV Spe"] == 1.0
    assert row["whole Acc"] == pytest.approx(15 / 16) and row["whole Spe"] == pytest.approx(11 / 12)
    assert row["whole AUC"] < 1.0 and curve[2] == row["FOV AUC"]


def test_metrics_json_is_strict_json(tmp_path):
    import json

    import report
    report.write_json(tmp_path / "m.json", {"AUC": math.nan, "rows": [1.0, math.inf], "nested": {"x": math.nan}})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"AUC": None, "rows": [1.0, None], "nested": {"x": None}}
