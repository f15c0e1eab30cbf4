"""MoNuSeg: the reader on a synthetic copy in the official layout (tests/fixtures.py), the rasterisation of the
outlines and its overlap rule, bad input, the nuclei post-processing, the field's metrics by hand and against
their definitions, instance maps reaching varCE, and a main.py -> test.py round trip with FullNet and varCE."""
import json
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

import data
import evaluation
import fixtures
import framework
import loss as losses
import main
import metrics
import networks
import tasks
import tasks.glas
import training
from errors import UserError
from tasks.glas import nuclei_from_probability, split_touching_nuclei
from tasks.monuseg import MERGED_COLOUR, MISSED_COLOUR, PREDICTED_OUTLINE, TRUE_OUTLINE, nuclei_errors_picture, \
    contour_labels, nucleus_errors, nucleus_mask, outline_pixels, predicted_nuclei, rasterise, read_outlines
from tasks.sample import Sample

SHAPE = (80, 96)
SCORE_NAMES = ["AJI", "object F1", "object Dice", "object Hausdorff", "pixel Dice"]


def load(root, split):
    return tasks.load_split("monuseg", root, split, tasks.SplitOptions())


def outline(points):
    """(xs, ys) float arrays of [(X, Y), ...]."""
    points = np.array(points, np.float64)
    return points[:, 0], points[:, 1]


def painted(points, shape):
    """The bool mask of one outline's pixels."""
    mask = np.zeros(shape, bool)
    mask[outline_pixels(*outline(points), shape)] = True
    return mask


def rectangle(left, top, right, bottom):
    return [(left, top), (right, top), (right, bottom), (left, bottom)]


# --- the reader ---------------------------------------------------------------------------------------

def test_reader_in_the_official_layout(tmp_path, capsys):
    root = fixtures.write_monuseg(tmp_path / "MoNuSeg")
    train, test = load(root, "train"), load(root, "test")
    assert [s.name for s in train] == list(fixtures.MONUSEG_TRAIN)
    assert [s.name for s in test] == list(fixtures.MONUSEG_TEST)
    assert "warning: 1 of 3 MoNuSeg training tiles have no annotation" in capsys.readouterr().err
    # Tile k of the fixture (the unannotated training tile is number 2) has its outlines shifted by 2k.
    for sample, shift in zip(train + test, (0, 2, 6, 8)):
        assert sample.image.shape == (*SHAPE, 3) and sample.image.dtype == np.uint8
        assert np.array_equal(sample.instances, fixtures.monuseg_truth(SHAPE, shift))
        assert sample.label.dtype == np.uint8 and np.array_equal(sample.label, (sample.instances > 0).astype(np.uint8))
    assert np.bincount(train[0].instances.ravel())[1:].tolist() == [284, 192, 210]
    assert len(load(root, "all")) == 4


# --- rasterisation ------------------------------------------------------------------------------------

def test_pixel_count_follows_the_polygon_area():
    """Pixel centres inside, top and left edges in, bottom and right out:
    * the rectangle X 2..7, Y 3..6 (area 5 x 3) covers rows 3-5 and columns 2-6: 15 pixels;
    * the square X 1.5..4.5, Y 2.5..5.5 (area 9) covers rows 3-5 and columns 2-4: 9 pixels;
    * the diamond |x - 10| + |y - 10| <= 5 (area 50) covers 2w columns in row r, w = 5 - |r - 10|:
      0 + 2 + 4 + 6 + 8 + 10 + 8 + 6 + 4 + 2 = 50 pixels;
    * the right triangle (60, 40), (80, 40), (60, 60) (area 200) covers in row r the columns 60 <= c < 120 - r:
      20 + 19 + ... + 1 = 210 pixels."""
    mask = painted(rectangle(2, 3, 7, 6), (10, 10))
    expected = np.zeros((10, 10), bool)
    expected[3:6, 2:7] = True
    assert np.array_equal(mask, expected)
    square = painted(rectangle(1.5, 2.5, 4.5, 5.5), (10, 10))
    assert np.array_equal(np.argwhere(square), np.argwhere(np.pad(np.ones((3, 3), bool), ((3, 4), (2, 5)))))
    assert painted([(10, 5), (15, 10), (10, 15), (5, 10)], (20, 20)).sum() == 50
    assert painted([(60, 40), (80, 40), (60, 60)], SHAPE).sum() == 210
    # Cut off at the grid's edge: X, Y -5..5 keeps rows and columns 0..4.
    assert painted(rectangle(-5, -5, 5, 5), (10, 10)).sum() == 25


def test_outlines_sharing_an_edge_never_share_a_pixel():
    left, right = painted(rectangle(2, 2, 6, 8), (10, 12)), painted(rectangle(6, 2, 10, 8), (10, 12))
    assert not (left & right).any() and left.sum() + right.sum() == (left | right).sum() == 48
    top, bottom = painted(rectangle(2, 1, 8, 4), (10, 12)), painted(rectangle(2, 4, 8, 9), (10, 12))
    assert not (top & bottom).any() and top.sum() + bottom.sum() == 6 * 8


def test_the_smaller_outline_wins_an_overlap_whatever_the_file_order():
    big, small = rectangle(0, 0, 10, 10), rectangle(8, 8, 12, 12)  # 100 and 16 pixels, overlapping 2 x 2
    for outlines, small_id in (([big, small], 2), ([small, big], 1)):
        instances = rasterise([outline(points) for points in outlines], (14, 14))
        assert (instances[8:10, 8:10] == small_id).all()
        assert np.bincount(instances.ravel())[small_id] == 16
        assert np.bincount(instances.ravel())[3 - small_id] == 100 - 4


def test_equal_outlines_the_later_wins_and_empty_ones_drop_out():
    first, second = rectangle(0, 0, 4, 4), rectangle(2, 2, 6, 6)  # equal areas, overlapping 2 x 2
    instances = rasterise([outline(first), outline(second)], (8, 8))
    assert (instances[2:4, 2:4] == 2).all() and np.bincount(instances.ravel()).tolist()[1:] == [12, 16]
    # A duplicate covers its twin entirely, and a sliver between pixel centres encloses none: both drop out,
    # and the ids stay 1..n without gaps.
    sliver = [(5.1, 0.1), (5.4, 0.1), (5.1, 0.4)]
    instances = rasterise([outline(first), outline(first), outline(sliver), outline(rectangle(5, 5, 8, 8))], (8, 8))
    assert np.unique(instances).tolist() == [0, 1, 2]
    assert (instances[:4, :4] == 1).all() and (instances[5:, 5:] == 2).all()


# --- bad input ----------------------------------------------------------------------------------------

def write_xml(path, text):
    path.write_text(text)
    return path


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="MoNuSeg training tiles folder .*Tissue Images not found"):
        load(tmp_path, "train")
    root = fixtures.write_monuseg(tmp_path / "MoNuSeg")
    test_folder = root / "MoNuSegTestData"
    name = fixtures.MONUSEG_TEST[0]
    (test_folder / f"{name}.xml").unlink()
    with pytest.raises(UserError, match=f"test tile .*{name}.tif has no outlines: expected .*{name}.xml"):
        load(root, "test")

    xml = test_folder / f"{name}.xml"
    write_xml(xml, fixtures.aperio_xml([]).replace("<Regions>", "<Regions><Region Id=\"1\"><Vertices/></Region>"))
    with pytest.raises(UserError, match=f"annotation .*{name}.xml has no nucleus outline"):
        load(root, "test")
    write_xml(xml, fixtures.aperio_xml(fixtures.monuseg_outlines())[:200])
    with pytest.raises(UserError, match=f"annotation .*{name}.xml is not well-formed XML"):
        load(root, "test")
    write_xml(xml, fixtures.aperio_xml(fixtures.monuseg_outlines()).replace('X="10"', 'X="ten"', 1))
    with pytest.raises(UserError, match="region 1 has a <Vertex> without numeric X and Y"):
        load(root, "test")

    for path in (root / "MoNuSeg 2018 Training Data" / "Annotations").glob("*.xml"):
        path.unlink()
    with pytest.raises(UserError, match="none of the 3 training tiles .* has its outlines in"):
        load(root, "train")


def test_a_region_of_two_vertices_is_skipped_with_a_notice(tmp_path, capsys):
    outlines = [[(3, 3), (4, 3)], *fixtures.monuseg_outlines()]
    path = write_xml(tmp_path / "tile.xml", fixtures.aperio_xml(outlines))
    assert len(read_outlines(path)) == 3
    assert "tile.xml: 1 region(s) of fewer than 3 vertices" in capsys.readouterr().err


# --- instance maps from predictions -----------------------------------------------------------------------

def test_nuclei_post_processing_fills_holes_drops_specks_and_keeps_touching_nuclei_together():
    prob = torch.zeros(1, 40, 60)
    prob[0, 2:12, 2:12] = 0.9
    prob[0, 6:8, 6:8] = 0.2      # a pale centre: a hole, filled
    prob[0, 30:34, 2:6] = 0.9    # 16 px, under MIN_NUCLEUS_AREA (20): a speck
    prob[0, 20:28, 30:38] = 0.9  # two 8 x 8 nuclei side by side, touching: one object without the watershed
    prob[0, 20:28, 38:46] = 0.8
    instances = nuclei_from_probability(prob, 0.5)
    assert np.unique(instances).tolist() == [0, 1, 2]
    assert (instances[2:12, 2:12] == 1).all() and (instances[30:34, 2:6] == 0).all()
    assert (instances[20:28, 30:46] == 2).all()


def two_discs(shape=(40, 56), centres=((20, 20), (20, 34)), radius=8):
    rows, columns = np.mgrid[:shape[0], :shape[1]]
    return np.any([(rows - r) ** 2 + (columns - c) ** 2 <= radius ** 2 for r, c in centres], axis=0)


def test_the_watershed_cuts_two_touching_nuclei_at_their_neck(monkeypatch):
    foreground = two_discs()
    split = split_touching_nuclei(foreground)
    assert np.unique(split).tolist() == [0, 1, 2] and split[20, 20] != split[20, 34]
    assert np.array_equal(split > 0, foreground)
    prob = torch.from_numpy(foreground.astype(np.float32))[None]
    assert np.unique(nuclei_from_probability(prob, 0.5)).tolist() == [0, 1]
    assert np.unique(nuclei_from_probability(prob, 0.5, split_touching=True)).tolist() == [0, 1, 2]
    # A bar two pixels wide has no maximum SEED_DEPTH = 3 above anything: without a seed it stays whole.
    monkeypatch.setattr(tasks.glas, "SEED_DEPTH", 3.0)
    bar = np.zeros((10, 30), bool)
    bar[4:6, 3:27] = True
    assert np.array_equal(split_touching_nuclei(bar), bar.astype(np.int64))


# --- metrics by hand ------------------------------------------------------------------------------------

def test_two_touching_nuclei_merged_into_one_prediction():
    """Ground truth: nuclei A (columns 0-3) and B (columns 4-7), 4 x 4 = 16 px each, touching; prediction: one
    4 x 8 object P of 32 px covering both.

    AJI: A's partner is P (IoU 16 / 32), so is B's (16 / 32); P's area enters both unions:
        AJI = (16 + 16) / (32 + 32) = 0.5.
    F1: P overlaps A and B by 16 each; its ground truth is A (the first of equals), which it covers wholly:
        TP = 1, precision = 1 / 1, recall = 1 / 2, F1 = 2 * 1 * 0.5 / 1.5 = 2 / 3.
    Object Dice: Dice(A, P) = Dice(B, P) = 2 * 16 / (16 + 32) = 2 / 3 on both sides: 2 / 3.
    Object Hausdorff: P's farthest pixel from A is 4 columns away, from B also 4: 4.
    Pixel Dice: the same foreground: 1."""
    truth = np.zeros((6, 10), np.int64)
    truth[1:5, 0:4], truth[1:5, 4:8] = 1, 2
    found = (truth > 0).astype(np.int64)
    scores = metrics.object_scores(found, truth)
    assert scores["AJI"] == pytest.approx(0.5) and metrics.aggregated_jaccard_index(found, truth) == pytest.approx(0.5)
    assert scores["object F1"] == pytest.approx(2 / 3) and metrics.object_f1(found, truth) == pytest.approx(2 / 3)
    assert scores["object Dice"] == pytest.approx(2 / 3)
    assert scores["object Hausdorff"] == pytest.approx(4.0)
    assert metrics.dice_coefficient(found > 0, truth > 0) == 1.0
    # Kept apart, the two are found exactly.
    assert metrics.object_scores(truth, truth) == {"AJI": 1.0, "object F1": 1.0, "object Dice": 1.0,
                                                   "object Hausdorff": 0.0}


def test_aji_adds_unmatched_objects_to_the_union():
    """A (16 px) found exactly; C (3 x 3 = 9 px) missed; a false 2 x 2 = 4 px object elsewhere:
    AJI = 16 / (16 + 9 + 4) = 16 / 29. F1: 1 TP of 2 found and 2 real: 0.5."""
    truth = np.zeros((12, 12), np.int64)
    truth[0:4, 0:4], truth[8:11, 8:11] = 1, 2
    found = np.zeros_like(truth)
    found[0:4, 0:4], found[0:2, 8:10] = 1, 2
    assert metrics.aggregated_jaccard_index(found, truth) == pytest.approx(16 / 29)
    assert metrics.object_f1(found, truth) == pytest.approx(0.5)


def test_aji_pairs_by_iou_not_by_overlap():
    """G: rows 0-3, columns 0-3 (16 px). P2: column 0 of G (4 px), IoU 4 / 16 = 0.25. P1: columns 1-15 (60 px),
    overlapping G by 12 px but IoU 12 / (16 + 60 - 12) = 0.1875. G's partner is P2 although P1 overlaps it more;
    P1 is nobody's partner and adds its 60 px: AJI = 4 / (16 + 60) = 1 / 19."""
    truth = np.zeros((6, 20), np.int64)
    truth[0:4, 0:4] = 1
    found = np.zeros_like(truth)
    found[0:4, 1:16] = 1
    found[0:4, 0:1] = 2
    assert metrics.aggregated_jaccard_index(found, truth) == pytest.approx(1 / 19)


def test_empty_maps():
    empty, truth = np.zeros((8, 8), np.int64), np.zeros((8, 8), np.int64)
    assert all(math.isnan(value) for value in metrics.object_scores(empty, truth).values())
    truth[2:5, 2:5] = 1
    scores = metrics.object_scores(empty, truth)
    assert scores["AJI"] == 0.0 and scores["object F1"] == 0.0 and scores["object Dice"] == 0.0
    assert math.isnan(scores["object Hausdorff"])
    assert metrics.aggregated_jaccard_index(truth, empty) == 0.0


def test_the_glas_hand_case_still_holds():
    """tests/test_fullnet.py's case on the faster code: two 4 x 4 glands, the first found exactly, a false
    object 10 columns right of the second: F1 1/2, Dice 1/2, Hausdorff 1/2 (1/2 * 10 + 1/2 * 10) = 5, the
    unmatched objects' nearest partners tying at 10."""
    truth = np.zeros((20, 20), np.int64)
    truth[2:6, 2:6], truth[12:16, 2:6] = 1, 2
    found = np.zeros_like(truth)
    found[2:6, 2:6], found[12:16, 12:16] = 1, 2
    assert metrics.object_f1(found, truth) == pytest.approx(0.5)
    assert metrics.object_dice(found, truth) == pytest.approx(0.5)
    assert metrics.object_hausdorff(found, truth) == pytest.approx(5.0)


# The definitions, written object by object over whole masks (slow, and so only for small maps here).

def objects_of(instances):
    return [instances == value for value in np.unique(instances) if value != 0]


def reference_f1(found, real):
    hits = 0
    for mask in found:
        overlaps = [(mask & other).sum() for other in real]
        best = int(np.argmax(overlaps))
        hits += overlaps[best] > 0 and overlaps[best] >= 0.5 * real[best].sum()
    precision, recall = hits / len(found), hits / len(real)
    return 2 * precision * recall / (precision + recall) if hits else 0.0


def reference_side(objects, others, score, nearest):
    total = sum(mask.sum() for mask in objects)
    value = 0.0
    for mask in objects:
        overlaps = [(mask & other).sum() for other in others]
        if max(overlaps) > 0:
            partner = others[int(np.argmax(overlaps))]
        elif nearest:
            partner = min(others, key=lambda other: metrics.hausdorff(mask, other))
        else:
            continue
        value += mask.sum() / total * score(mask, partner)
    return value


def reference_aji(found, real):
    intersection = union = 0
    used = set()
    for mask in real:
        iou = [(mask & other).sum() / (mask | other).sum() for other in found]
        best = int(np.argmax(iou))
        if iou[best] > 0:
            intersection += (mask & found[best]).sum()
            union += (mask | found[best]).sum()
            used.add(best)
        else:
            union += mask.sum()
    return intersection / (union + sum(found[k].sum() for k in range(len(found)) if k not in used))


def random_instances(generator, shape=(32, 40), count=7):
    """Rectangles of random size and place painted one over another, ids in random order."""
    instances = np.zeros(shape, np.int64)
    for value in generator.permutation(np.arange(1, count + 1)) * 3:
        top, left = generator.integers(0, shape[0] - 3), generator.integers(0, shape[1] - 3)
        instances[top:top + generator.integers(2, 10), left:left + generator.integers(2, 12)] = value
    return instances


def test_fast_object_metrics_match_their_definitions():
    generator = np.random.default_rng(7)
    for _ in range(12):
        found_map, real_map = random_instances(generator), random_instances(generator)
        found, real = objects_of(found_map), objects_of(real_map)
        dice = lambda a, b: 2 * (a & b).sum() / (a.sum() + b.sum())  # noqa: E731
        scores = metrics.object_scores(found_map, real_map)
        assert scores["object F1"] == pytest.approx(reference_f1(found, real))
        assert scores["object Dice"] == pytest.approx(0.5 * (reference_side(real, found, dice, False)
                                                             + reference_side(found, real, dice, False)))
        assert scores["object Hausdorff"] == pytest.approx(0.5 * (
            reference_side(real, found, metrics.hausdorff, True) + reference_side(found, real, metrics.hausdorff, True)))
        assert scores["AJI"] == pytest.approx(reference_aji(found, real))


def test_score_of_a_read_tile_with_a_perfect_foreground(tmp_path):
    """The fixture's rectangles 1 (284 px) and 2 (192 px) touch, so the components of a perfect foreground
    merge them into one object M of 476 px; the triangle T (210 px) is found exactly.
    AJI = (284 + 192 + 210) / (476 + 476 + 210) = 686 / 1162; F1: M's ground truth is rectangle 1 (284 > 192),
    covered wholly: TP = 2 of 2 found, 3 real: F1 = 2 * 1 * (2/3) / (5/3) = 0.8; pixel Dice 1."""
    sample = load(fixtures.write_monuseg(tmp_path / "MoNuSeg"), "test")[0]
    prob = torch.from_numpy(sample.label.astype(np.float32))[None]
    row, curve = tasks.dataset("monuseg").score(prob, sample, 0.5)
    assert curve is None and list(row) == SCORE_NAMES
    assert row["AJI"] == pytest.approx(686 / 1162) and row["object F1"] == pytest.approx(0.8)
    dice_m = 2 * 284 / (284 + 476)
    expected_dice = 0.5 * (284 / 686 * dice_m + 192 / 686 * 2 * 192 / (192 + 476) + 210 / 686
                           + 476 / 686 * dice_m + 210 / 686)
    assert row["object Dice"] == pytest.approx(expected_dice) and row["pixel Dice"] == 1.0


def test_nucleus_errors_name_merges_and_misses():
    """Annotated: A (rows 0-3, cols 0-3) touches B (rows 0-3, cols 4-7); C (rows 8-11) and D (rows 14-15) stand
    alone. Predicted: one object over A and B (a merge), one covering 6 of C's 16 px (under half: C missed),
    nothing on D (missed)."""
    truth = np.zeros((16, 16), np.int64)
    truth[0:4, 0:4], truth[0:4, 4:8], truth[8:12, 8:12], truth[14:16, 0:2] = 1, 2, 3, 4
    predicted = np.zeros_like(truth)
    predicted[0:4, 0:8] = 5
    predicted[8:10, 8:11] = 9
    _, merging, missed = nucleus_errors(predicted, truth)
    assert merging.tolist() == [1] and missed.tolist() == [3, 4]
    predicted[8:10, 8:12] = 9  # now exactly half of C: a hit
    assert nucleus_errors(predicted, truth)[2].tolist() == [4]


def test_nuclei_picture_tints_errors_and_draws_both_outlines():
    truth = np.zeros((20, 20), np.int64)
    truth[2:8, 2:8], truth[2:8, 8:14], truth[12:18, 12:18] = 1, 2, 3
    sample = Sample("t", np.full((20, 20, 3), 100, np.uint8), (truth > 0).astype(np.int64), instances=truth)
    prob = torch.zeros(1, 20, 20)
    prob[0, 2:8, 2:14] = 0.9  # A and B as one nucleus; C not found
    picture = nuclei_errors_picture(prob, sample, 0.5)
    assert picture.shape == (20, 20, 3) and picture.dtype == np.uint8
    dimmed = 100 * 0.7
    assert picture[0, 0].tolist() == [70, 70, 70]
    assert picture[4, 4].tolist() == np.round(0.5 * dimmed + 0.5 * MERGED_COLOUR).astype(int).tolist()
    assert picture[14, 14].tolist() == np.round(0.5 * dimmed + 0.5 * MISSED_COLOUR).astype(int).tolist()
    assert picture[12, 15].tolist() == TRUE_OUTLINE.astype(int).tolist()       # C's top row: annotated outline
    assert picture[2, 5].tolist() == PREDICTED_OUTLINE.astype(int).tolist()    # drawn over the annotated one
    assert picture[4, 7].tolist() == TRUE_OUTLINE.astype(int).tolist()         # A's side where it meets B


def test_postprocess_watershed_cuts_touching_nuclei_in_scores_and_masks():
    """Two 9x9 discs joined by a 1-px neck: one nucleus without post-processing, two with the watershed, and
    the mask predict.py writes keeps them apart by a line."""
    yy, xx = np.mgrid[:20, :40]
    foreground = ((yy - 10) ** 2 + (xx - 10) ** 2 <= 36) | ((yy - 10) ** 2 + (xx - 24) ** 2 <= 36)
    foreground[10, 10:25] = True
    prob = torch.from_numpy(foreground.astype(np.float32))[None]
    assert predicted_nuclei(prob, 0.5).max() == 1 and predicted_nuclei(prob, 0.5, "watershed").max() == 2
    mask = nucleus_mask(prob, 0.5, "watershed")
    assert mask.sum() < foreground.sum() and ndimage.label(mask)[1] == 2
    assert np.array_equal(nucleus_mask(prob, 0.5), foreground)
    with pytest.raises(UserError, match="--postprocess closing is for isbi2012's membranes; nuclei take none or "
                                        "watershed"):
        predicted_nuclei(prob, 0.5, "closing")


# --- instances reach varCE ------------------------------------------------------------------------------

class Tile:
    def __init__(self, instances):
        self.instances = instances


def test_stack_instances_pads_and_resizes_nearest():
    first = np.arange(24).reshape(4, 6) % 5
    second = np.full((6, 4), 7)
    stacked = data.stack_instances([Tile(first), Tile(second)])
    assert stacked.shape == (2, 6, 6) and stacked.dtype == torch.int32
    assert torch.equal(stacked[0, :4], torch.from_numpy(first).int()) and not stacked[0, 4:].any()
    assert (stacked[1, :, :4] == 7).all() and not stacked[1, :, 4:].any()
    resized = data.stack_instances([Tile(first)], size=12)
    assert resized.shape == (1, 12, 12) and set(resized.unique().tolist()) == set(np.unique(first).tolist())
    # Nearest: output row 3r + 1 and column 2c sample input pixel (r, c) (rows scaled by 3, columns by 2).
    assert torch.equal(resized[0, 1::3, 0::2], torch.from_numpy(first).int())


def touching_pair(batch=2, shape=(40, 50)):
    instances = torch.zeros(batch, *shape, dtype=torch.int32)
    instances[:, 10:24, 8:20] = 1
    instances[:, 10:24, 20:34] = 2  # touching nucleus 1 along a column
    return instances


def test_the_trainer_moves_instances_with_the_labels_and_gives_them_to_varce():
    torch.manual_seed(0)
    instances = touching_pair()
    images = torch.randint(30, 220, (2, 3, 40, 50), dtype=torch.uint8)
    labels = (instances > 0).to(torch.uint8)
    model = torch.nn.Conv2d(3, 1, 1)
    model.num_classes = 1
    config = framework.TrainConfig(batch_size=2, epochs=1, patch_size=32, amp=False, loss="varce")
    trainer = framework.Trainer(model, images, labels, config, torch.device("cpu"), instances=instances)
    crops, crop_labels, extras = trainer.batch_with_maps()
    crop_instances = extras["instances"]
    assert crop_instances.shape == crop_labels.shape == (2, 32, 32)
    assert torch.equal(crop_labels, (crop_instances > 0).long()) and set(crop_instances.unique().tolist()) <= {0, 1, 2}
    plain_images, plain_labels = trainer.batch()
    assert torch.equal(plain_labels, crop_labels) and torch.equal(plain_images, crops)

    seen = []
    criterion = trainer.criterion
    trainer.criterion = lambda logits, target, **extra: seen.append(extra) or criterion(logits, target, **extra)
    trainer.step()
    assert seen and seen[0]["instances"].shape == (2, 32, 32)
    # A loss without instances does not keep them.
    bce_config = framework.TrainConfig(batch_size=2, epochs=1, patch_size=32, amp=False, loss="bce")
    bce = framework.Trainer(model, images, labels, bce_config, torch.device("cpu"), instances=instances)
    assert bce.instances is None and "instances" not in bce.batch_with_maps()[2]
    # Same seed, same plan: carrying the instances through the resampling leaves images and labels as they were.
    bce_images, bce_labels = bce.batch()
    assert torch.equal(bce_labels, crop_labels) and torch.equal(bce_images, crops)


def test_varce_on_fullnet_keeps_touching_nuclei_apart():
    """Two touching nuclei are one connected component of the label, two instances of the map: varCE with the
    map is BCE + mean over the two of 2 Var(p) (two channels 1 - p and p), which is not the merged value."""
    torch.manual_seed(1)
    instances = touching_pair(batch=1, shape=(24, 40))
    target = (instances > 0).long()
    model = networks.build_model("fullnet", num_classes=1).eval()
    with torch.no_grad():  # a fresh FullNet predicts nearly 1/2 everywhere; a ramp across makes the two differ
        logits = model(torch.randn(1, 3, 24, 40)) + torch.linspace(-2, 2, 40)
    with_map = losses.build_loss("varce", 1)(logits, target, instances=instances)
    merged = losses.build_loss("varce", 1)(logits, target)
    p = torch.sigmoid(logits[0, 0])
    variance = sum(2 * p[instances[0] == k].var(unbiased=False) for k in (1, 2)) / 2
    expected = F.binary_cross_entropy_with_logits(logits[:, 0], target.float()) + variance
    assert float(with_map) == pytest.approx(float(expected), abs=1e-6)
    assert abs(float(with_map) - float(merged)) > 1e-6


# --- background / inside / contour (monuseg_contour) ---------------------------------------------------

def two_touching_squares():
    """10x10 squares 1 (rows 2-11, cols 2-11) and 2 (rows 2-11, cols 12-21) sharing an edge, in 16 x 26."""
    instances = np.zeros((16, 26), np.int32)
    instances[2:12, 2:12], instances[2:12, 12:22] = 1, 2
    return instances


def test_contour_labels_band_each_nucleus_inside_its_outline():
    labels = contour_labels(two_touching_squares())
    expected = np.zeros((16, 26), np.uint8)
    expected[2:12, 2:22] = 2
    expected[4:10, 4:10] = expected[4:10, 14:20] = 1  # each square less a 2-px band, also where they touch
    assert np.array_equal(labels, expected)
    at_edge = np.zeros((8, 8), np.int32)
    at_edge[0:6, 0:6] = 1  # cut by the image's top and left edges: no contour there
    edge_labels = contour_labels(at_edge)
    assert edge_labels[0, 0] == 1 and edge_labels[0:4, 0:4].tolist() == [[1] * 4] * 4 and edge_labels[5, 5] == 2


def test_a_perfect_three_class_prediction_gives_back_the_nuclei_less_their_corners():
    """Insides 6x6 grown by 2 px (a disc): each 10x10 square less 3 pixels at each corner (at sqrt(5) and
    sqrt(8) > 2 from its inside), 88 px, and the two stay apart. AJI = (88 + 88) / (100 + 100) = 0.88; object
    F1 1; pixel Dice 2 * 176 / (176 + 200)."""
    truth = two_touching_squares()
    prob = F.one_hot(torch.from_numpy(contour_labels(truth)).long(), 3).permute(2, 0, 1).float()
    found = predicted_nuclei(prob, 0.5)
    assert np.unique(found).tolist() == [0, 1, 2] and (found > 0).sum() == 176
    assert set(np.unique(truth[found == 1])) == {1} and set(np.unique(truth[found == 2])) == {2}
    sample = Sample("t", np.zeros((16, 26, 3), np.uint8), contour_labels(truth), instances=truth)
    row, _ = tasks.dataset("monuseg_contour").score(prob, sample, 0.5)
    assert row["AJI"] == pytest.approx(0.88) and row["object F1"] == 1.0
    assert row["pixel Dice"] == pytest.approx(2 * 176 / 376)


def test_varce_asks_each_part_of_a_nucleus_to_agree_with_itself():
    """A nucleus whose inside is predicted one constant and its contour band another: no variance within each
    part, so varCE = CE; the same probabilities over the nucleus as one group would add their variance."""
    truth = two_touching_squares()[None]
    target = torch.from_numpy(contour_labels(truth[0])).long()[None]
    logits = torch.zeros(1, 3, 16, 26)
    logits[0, 1][target[0] == 1] = 3.0
    logits[0, 2][target[0] == 2] = 1.0
    instances = torch.from_numpy(truth).long()
    varce = losses.build_loss("varce", 3)(logits, target, instances=instances)
    assert float(varce) == pytest.approx(float(losses.build_loss("ce", 3)(logits, target)), abs=1e-6)
    probs = torch.softmax(logits, 1)[0]
    whole = sum(probs[:, truth[0] == k].var(dim=1, unbiased=False).sum() for k in (1, 2)) / 2
    assert float(whole) > 0.01


# --- main.py -> test.py ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["monuseg", "monuseg_contour"])
def test_monuseg_round_trip_with_fullnet_and_varce(tmp_path, monkeypatch, dataset):
    root = fixtures.write_monuseg(tmp_path / "MoNuSeg")
    carried = []

    class RecordingTrainer(framework.Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            carried.append(self.instances)

    monkeypatch.setattr(framework, "Trainer", RecordingTrainer)
    start = time.perf_counter()
    # fp32: on CPUs with native bf16, AMP trains channels-last, where FullNet's backward now and then segfaults
    # (torch 2.14, whatever the loss); bf16 in NCHW and fp32 do not.
    run_dir = training.train(*main.parse_settings([
        "--dataset", dataset, "--data-root", str(root), "--model", "fullnet", "--loss", "varce",
        "--patch-size", "64", "--epochs", "1", "--batch-size", "2", "--device", "cpu", "--pretrained", "none",
        "--visdom", "false", "--amp", "false", "--weights-dir", str(tmp_path / "weights"), "--run-name", "monuseg"]))
    assert carried and carried[0] is not None and carried[0].shape == (2, *SHAPE)
    out = tmp_path / "results"
    settings, given = main.parse_settings(["--device", "cpu", "--tta", "false"])
    evaluation.evaluate(run_dir / "final.pth", settings, given, out_dir=out)
    print(f"MoNuSeg FullNet round trip: {time.perf_counter() - start:.1f}s")
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["per_image"]) == set(fixtures.MONUSEG_TEST)
    assert list(report["summary"]) == SCORE_NAMES
    assert report["protocol"]["evaluation"] == tasks.DATASETS[dataset].notes
    for name in ("AJI", "object F1", "object Dice", "pixel Dice"):
        mean = report["summary"][name]["mean"]
        assert mean is None or 0.0 <= mean <= 1.0, (name, mean)
