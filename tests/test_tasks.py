"""The paper's other tasks: optic disc (ORIGA, Messidor, RIM-ONE r1), lung CT, ISBI 2012 EM cell
contours and retinal OCT layers. Each reader runs on a synthetic copy in its dataset's real layout
(tests/fixtures.py), each task's evaluator on hand-computed cases, and every dataset goes through
the real main.py -> test.py round trip picked by --dataset alone."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import evaluation
import fixtures
import main
import tasks
import training
from conftest import TINY
from errors import UserError
from tasks.em_cells import score_cells
from tasks.files import read_binary_label, read_class_map
from tasks.lung import score_lung
from tasks.oct import score_layers
from tasks.optic_disc import crop_around_brightest, score_disc
from tasks.splits import SplitOptions, fold_names, natural_key


def load(dataset, root, split, **settings):
    """A split read with the given settings (FOLD=..., CROP_SIZE=...) and the defaults for the rest."""
    return tasks.load_split(dataset, root, split, SplitOptions(**{key.lower(): value for key, value in settings.items()}))


def train(*argv):
    """main.py's training, in this process (tests/test_scripts.py runs the scripts themselves)."""
    return training.train(*main.parse_settings([str(arg) for arg in argv]))


def evaluate(checkpoint, out, *argv):
    """test.py's evaluation, in this process."""
    settings, given = main.parse_settings([str(arg) for arg in argv])
    return evaluation.evaluate(checkpoint, settings, given, out_dir=out)


# --- end to end: one flag switches reader, class count and metrics -----------------------------------

UNIT_RANGE = (0.0, 1.0)
END_TO_END = {
    # dataset: (fixture writer, {metric: allowed range}). An OCT boundary that an untrained model does
    # not draw at all is NaN by definition, so NaN passes for the OCT keys only.
    "origa": (fixtures.write_origa, {"E": UNIT_RANGE, "Dice": UNIT_RANGE}),
    "messidor": (fixtures.write_messidor, {"E": UNIT_RANGE, "Dice": UNIT_RANGE}),
    "rimone": (fixtures.write_rimone, {"E": UNIT_RANGE, "Dice": UNIT_RANGE,
                                       **{f"E expert{n}": UNIT_RANGE for n in range(1, 6)}}),
    "lung": (fixtures.write_lung, {"E": UNIT_RANGE, "Acc": UNIT_RANGE, "Sen": UNIT_RANGE}),
    "isbi2012": (lambda root: fixtures.write_isbi_volume(root, pages=5),
                 {"VRand": UNIT_RANGE, "VInfo": UNIT_RANGE, "VRand max": UNIT_RANGE, "VRand max threshold": UNIT_RANGE,
                  "VInfo max": UNIT_RANGE, "VInfo max threshold": UNIT_RANGE}),
    "oct": (fixtures.write_oct, {**{f"MAE b{n}": (0.0, 64.0) for n in range(1, 11)}, "MAE mean": (0.0, 64.0)}),
}


@pytest.mark.parametrize("dataset", list(END_TO_END))
def test_train_and_evaluate_each_dataset(dataset, tmp_path):
    writer, ranges = END_TO_END[dataset]
    root = writer(tmp_path / dataset)
    run_dir = train("--dataset", dataset, "--data-root", root, "--run-name", dataset,
                    "--weights-dir", tmp_path / "weights", *TINY, "--epochs", "1")
    checkpoint = run_dir / "final.pth"
    payload = torch.load(checkpoint, weights_only=True)
    assert payload["dataset"] == dataset and payload["num_classes"] == tasks.DATASETS[dataset].num_classes

    # No --dataset or --data-root here: test.py takes both from the checkpoint.
    out = tmp_path / "results"
    evaluate(checkpoint, out, "--device", "cpu")
    report = json.loads((out / "metrics.json").read_text())
    expected_names = {sample.name for sample in load(dataset, root, "test")}
    assert set(report["per_image"]) == expected_names
    assert list(report["summary"]) == list(ranges)
    assert report["protocol"]["evaluation"] == tasks.DATASETS[dataset].notes
    for key, (low, high) in ranges.items():
        mean = report["summary"][key]["mean"]
        if dataset == "oct" and mean is None:  # NaN, written as JSON null
            continue
        assert low <= mean <= high, (key, mean)
    for name in expected_names:
        assert (out / f"{name}_overlay.png").stat().st_size > 0
    assert not (out / "roc.png").exists()  # these tasks report no ROC curve


# --- bad input: one clear error (printed by every script as one line, exit code 2) ---------------------

def test_split_list_naming_a_missing_image(tmp_path):
    root = fixtures.write_origa(tmp_path / "ORIGA")
    with open(root / "Set_A.txt", "a") as handle:
        handle.write("099.jpg\n")
    with pytest.raises(UserError, match="Set_A.txt names '099'"):
        train("--dataset", "origa", "--data-root", root, *TINY, "--weights-dir", tmp_path / "w")


def test_class_index_beyond_the_class_count(tmp_path):
    root = fixtures.write_oct(tmp_path / "OCT")
    label = np.zeros((64, 96), np.uint8)
    label[40:] = 12
    fixtures.save(label, root / "labels" / "vol01_b128.png")
    with pytest.raises(UserError, match="vol01_b128.png has value 12 but dataset oct has 11 classes"):
        train("--dataset", "oct", "--data-root", root, *TINY, "--weights-dir", tmp_path / "w")


def test_volume_and_labels_with_different_page_counts(tmp_path):
    root = fixtures.write_isbi_volume(tmp_path / "ISBI", pages=6, label_pages=5)
    with pytest.raises(UserError, match="has 6 pages but"):
        train("--dataset", "isbi2012", "--data-root", root, *TINY, "--weights-dir", tmp_path / "w")


# --- optic disc crop -----------------------------------------------------------------------------

def test_crop_centres_on_the_bright_blob_not_a_hot_pixel():
    image = np.full((200, 300, 3), 20, np.uint8)
    image[fixtures.disc_mask(200, 300, (120, 90), 12)] = 200
    image[30, 250] = 255                       # one hot pixel, brighter than the blob
    label = fixtures.disc_mask(200, 300, (120, 90), 12).astype(np.uint8)
    crop, crop_label = crop_around_brightest(image, label, size=64)
    assert crop.shape == (64, 64, 3) and crop_label.shape == (64, 64)
    rows, columns = np.nonzero(crop_label)
    assert abs(rows.mean() - 32) <= 1 and abs(columns.mean() - 32) <= 1
    assert crop_label.sum() == label.sum()     # the whole disc is inside the window


def test_crop_window_stays_inside_the_image():
    image = np.zeros((200, 300, 3), np.uint8)
    image[fixtures.disc_mask(200, 300, (195, 295), 8)] = 250
    label = np.zeros((200, 300), np.uint8)
    label[136:, 236:] = 1                      # exactly the bottom-right 64 x 64 window
    crop, crop_label = crop_around_brightest(image, label, size=64)
    assert crop_label.all()
    assert np.array_equal(crop, image[136:, 236:])


def test_crop_pads_a_small_image_with_black():
    image = np.full((40, 50, 3), 90, np.uint8)
    label = np.ones((40, 50), np.uint8)
    crop, crop_label = crop_around_brightest(image, label, size=64)
    assert crop.shape == (64, 64, 3)
    assert (crop[:40, :50] == 90).all() and crop[40:].max() == 0 and crop[:, 50:].max() == 0
    assert crop_label.sum() == 40 * 50


def test_disc_datasets_crop_to_the_crop_size(tmp_path):
    root = fixtures.write_origa(tmp_path / "ORIGA")
    sample = load("origa", root, "train", CROP_SIZE=64)[0]
    assert sample.image.shape == (64, 64, 3)
    rows, columns = np.nonzero(sample.label)
    assert abs(rows.mean() - 32) <= 2 and abs(columns.mean() - 32) <= 2
    assert load("origa", root, "train")[0].image.shape == (800, 800, 3)  # the paper's default


# --- readers ---------------------------------------------------------------------------------------

def test_origa_split_lists_with_and_without_suffix(tmp_path):
    root = fixtures.write_origa(tmp_path / "ORIGA")
    (root / "Set_B.txt").write_text("# test set\nimages/003.jpg\n\n004   glaucoma\n")
    assert [sample.name for sample in load("origa", root, "train")] == ["001", "002"]
    assert [sample.name for sample in load("origa", root, "test")] == ["003", "004"]


def test_origa_cup_value_counts_as_disc(tmp_path):
    root = fixtures.write_origa(tmp_path / "ORIGA")
    raw = read_class_map(root / "masks" / "001.png")
    assert set(np.unique(raw)) == {0, 1, 2}
    label = read_binary_label(root / "masks" / "001.png")
    assert set(np.unique(label)) == {0, 1} and label.sum() == (raw > 0).sum()


def test_origa_without_split_list(tmp_path):
    root = fixtures.write_origa(tmp_path / "ORIGA")
    (root / "Set_B.txt").unlink()
    with pytest.raises(UserError, match="Set_B.txt not found"):
        load("origa", root, "test")


def test_binary_masks_stored_as_255_or_1_read_the_same(tmp_path):
    disc = fixtures.disc_mask(20, 30, (10, 12), 6)
    ones = read_binary_label(fixtures.save(disc.astype(np.uint8), tmp_path / "ones.png"))
    full = read_binary_label(fixtures.save(disc.astype(np.uint8) * 255, tmp_path / "full.bmp"))
    assert np.array_equal(ones, full) and np.array_equal(ones, disc.astype(np.uint8))


def test_messidor_kfold_covers_every_image_once(tmp_path):
    root = fixtures.write_messidor(tmp_path / "Messidor")
    seen = []
    for fold in range(5):
        train = {sample.name for sample in load("messidor", root, "train", FOLD=fold, CROP_SIZE=64)}
        test = {sample.name for sample in load("messidor", root, "test", FOLD=fold, CROP_SIZE=64)}
        assert len(test) == 1 and not train & test and train | test == set(fixtures.MESSIDOR_NAMES)
        seen.extend(test)
    assert sorted(seen) == sorted(fixtures.MESSIDOR_NAMES)


def test_messidor_split_lists_win_over_kfold(tmp_path):
    names = fixtures.MESSIDOR_NAMES
    root = fixtures.write_messidor(tmp_path / "Messidor", lists=(names[:3], [f"{names[4]}.tif"]))
    assert [sample.name for sample in load("messidor", root, "test", CROP_SIZE=64)] == [names[4]]
    (root / "test.txt").unlink()
    with pytest.raises(UserError, match="give both split lists, or neither"):
        load("messidor", root, "train", CROP_SIZE=64)


def test_messidor_missing_mask_names_the_file(tmp_path):
    root = fixtures.write_messidor(tmp_path / "Messidor")
    next((root / "masks").glob(f"{fixtures.MESSIDOR_NAMES[0]}.*")).unlink()
    with pytest.raises(UserError, match=f"annotation for image .*{fixtures.MESSIDOR_NAMES[0]}.tif missing"):
        [load("messidor", root, split, CROP_SIZE=64) for split in ("train", "test")]


def test_kfold_split_is_fixed_by_its_own_seed_and_stratified():
    names = [f"n{index}" for index in range(10)] + [f"d{index}" for index in range(5)]
    groups = {name: name[0] for name in names}
    options = SplitOptions(fold=2, num_folds=5)
    test = fold_names(names, "test", options, groups=groups)
    assert test == fold_names(names, "test", options, groups=groups)  # no training seed involved
    assert sorted(name[0] for name in test) == ["d", "n", "n"]   # 1 of 5 "d" and 2 of 10 "n"
    train = fold_names(names, "train", options, groups=groups)
    assert sorted(train + test, key=natural_key) == sorted(names, key=natural_key)


@pytest.mark.parametrize("fold, folds, message", [(5, 5, "outside 0..4"), (0, 1, "at least 2"),
                                                  (0, 20, "cannot be split into 20 folds")])
def test_bad_fold_settings(fold, folds, message):
    with pytest.raises(UserError, match=message):
        fold_names(["a", "b", "c"], "test", SplitOptions(fold=fold, num_folds=folds))


def test_rimone_majority_vote_and_expert_masks(tmp_path):
    root = fixtures.write_rimone(tmp_path / "RIM-ONE")
    samples = load("rimone", root, "train") + load("rimone", root, "test")
    assert sorted(sample.name for sample in samples) == ["Deep_Im001", "Deep_Im002", "Normal_Im001",
                                                         "Normal_Im002", "Normal_Im003"]
    sample = samples[0]
    assert sample.experts.shape == (5, 72, 64) and sample.experts.dtype == bool
    # Expert radii are 12..16 around one centre, so 3 of 5 agree exactly on expert 3's disc.
    assert np.array_equal(sample.label, sample.experts[2].astype(np.uint8))


def test_rimone_missing_expert_mask(tmp_path):
    root = fixtures.write_rimone(tmp_path / "RIM-ONE")
    (root / "Deep" / "Expert4_masks" / "Im002-exp4.bmp").unlink()
    with pytest.raises(UserError, match="Im002-exp4.bmp missing for image"):
        load("rimone", root, "train")


def test_lung_16_bit_slices_are_windowed_to_8_bit(tmp_path):
    root = fixtures.write_lung(tmp_path / "lung")
    sample = load("lung", root, "test")[0]
    grey, lungs = sample.image[..., 0], sample.label.astype(bool)
    assert sample.image.dtype == np.uint8 and (sample.image[..., 1] == grey).all()
    assert grey.min() == 0 and grey.max() == 255
    # -1000 HU air -> 0, +40 HU body -> 255, so -850 HU lungs land near 150/1040 of the range.
    assert abs(grey[lungs].mean() - 255 * 150 / 1040) < 2
    assert set(np.unique(sample.label)) == {0, 1}       # 0/255 mask -> classes 0/1


def test_isbi_slice_files_read_like_the_volume(tmp_path):
    volume = load("isbi2012", fixtures.write_isbi_volume(tmp_path / "v", pages=10), "test", FOLD=4)
    slices = load("isbi2012", fixtures.write_isbi_slices(tmp_path / "s", count=10), "test", FOLD=4)
    # Contiguous folds in natural order: fold 4 of 5 is slices 8 and 9 (slice8, slice9 - not slice1).
    assert [sample.name for sample in volume] == ["slice08", "slice09"]
    assert [sample.name for sample in slices] == ["slice8", "slice9"]
    for a, b in zip(volume, slices):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert set(np.unique(volume[0].label)) == {0, 1} and volume[0].label.mean() < 0.5  # membrane = 1


def test_isbi_stack_puts_each_slice_between_its_neighbours_in_natural_order(tmp_path):
    """isbi2012_stack: red = the slice before, green = the slice, blue = the slice after, by natural order
    (12 files: slice10 follows slice9, not slice1); a held-out slice's neighbour may be a training slice, and
    the ends of the stack stand in for their missing neighbour. Labels as isbi2012 reads them."""
    root = fixtures.write_isbi_slices(tmp_path / "s", count=12)
    grey = {sample.name: sample.image[..., 0] for sample in load("isbi2012", root, "all")}
    for fold, names in ((0, ["slice0", "slice1", "slice2"]), (4, ["slice10", "slice11"])):
        plain = load("isbi2012", root, "test", FOLD=fold)
        stacked = load("isbi2012_stack", root, "test", FOLD=fold)
        assert [sample.name for sample in stacked] == [sample.name for sample in plain] == names
        for a, b in zip(stacked, plain):
            index = int(a.name[5:])
            before, after = f"slice{max(index - 1, 0)}", f"slice{min(index + 1, 11)}"
            np.testing.assert_array_equal(a.image, np.stack([grey[before], grey[a.name], grey[after]], axis=-1))
            np.testing.assert_array_equal(a.label, b.label)
    assert not np.array_equal(grey["slice9"], grey["slice1"])


def test_isbi_stack_reads_the_volume_as_the_slice_files(tmp_path):
    volume = load("isbi2012_stack", fixtures.write_isbi_volume(tmp_path / "v", pages=10), "train", FOLD=2)
    slices = load("isbi2012_stack", fixtures.write_isbi_slices(tmp_path / "s", count=10), "train", FOLD=2)
    assert [sample.name for sample in volume] == [f"slice{index:02d}" for index in (0, 1, 2, 3, 6, 7, 8, 9)]
    for a, b in zip(volume, slices):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert not np.array_equal(volume[3].image[..., 2], volume[3].image[..., 1])  # slice03's blue is slice04


def test_isbi_stack_refuses_a_colour_slice_by_name(tmp_path):
    root = fixtures.write_isbi_slices(tmp_path / "s", count=5)
    colour = np.zeros((64, 64, 3), np.uint8)
    colour[..., 0] = 200
    Image.fromarray(colour).save(root / "images" / "slice3.png")
    with pytest.raises(UserError, match=r"slice3.png is a colour image; stacking neighbouring slices needs grey"):
        load("isbi2012_stack", root, "train")


@pytest.mark.parametrize("name", ["isbi2012", "isbi2012_stack"])
def test_isbi_without_either_layout(tmp_path, name):
    with pytest.raises(UserError, match="neither .*train-volume.tif nor"):
        load(name, tmp_path, "train")


def test_oct_kfold_without_lists(tmp_path):
    root = fixtures.write_oct(tmp_path / "OCT", lists=False)
    test = load("oct", root, "test")
    assert len(test) == 1 and test[0].label.max() == 10 and test[0].image.shape == (64, 96, 3)


# --- task evaluators -----------------------------------------------------------------------------

def probability_of(mask):
    return torch.from_numpy(np.where(mask, 0.9, 0.1).astype(np.float32))[None]


def two_rectangles():
    pred = np.zeros((8, 8), bool)
    pred[0:4, 0:4] = True                       # 16 pixels
    gt = np.zeros((8, 8), bool)
    gt[2:6, 0:4] = True                         # 16 pixels, 8 shared, union 24
    return pred, gt


def test_disc_evaluator_on_two_rectangles():
    pred, gt = two_rectangles()
    experts = np.stack([gt, pred])
    sample = tasks.Sample("r", np.zeros((8, 8, 3), np.uint8), gt.astype(np.uint8), experts=experts)
    row, curve = score_disc(probability_of(pred), sample, 0.5)
    assert curve is None and list(row) == ["E", "Dice", "E expert1", "E expert2"]
    assert row["E"] == pytest.approx(1 - 8 / 24) and row["Dice"] == pytest.approx(16 / 32)
    assert row["E expert1"] == pytest.approx(1 - 8 / 24) and row["E expert2"] == 0.0


def test_lung_evaluator_hand_case():
    pred, gt = two_rectangles()
    sample = tasks.Sample("r", np.zeros((8, 8, 3), np.uint8), gt.astype(np.uint8))
    row, curve = score_lung(probability_of(pred), sample, 0.5)
    assert curve is None and list(row) == ["E", "Acc", "Sen"]
    # TP 8, FP 8, FN 8, TN 40 of 64 pixels.
    assert row["E"] == pytest.approx(2 / 3) and row["Acc"] == pytest.approx(48 / 64) and row["Sen"] == 0.5


def test_cell_evaluator_uses_membrane_class_and_threshold():
    membrane = np.zeros((9, 9), bool)
    membrane[4, :] = membrane[:, 4] = True      # a cross: four cells
    sample = tasks.Sample("c", np.zeros((9, 9, 3), np.uint8), membrane.astype(np.uint8))
    row, _ = score_cells(probability_of(membrane), sample, 0.5)
    assert {key: row[key] for key in ("VRand", "VInfo")} == {"VRand": 1.0, "VInfo": 1.0}
    merged, _ = score_cells(probability_of(membrane), sample, 0.95)  # nothing above 0.95
    assert merged["VRand"] < 1.0 and merged["VInfo"] == 0.0
    assert merged["VRand max"] == 1.0  # the leaderboard's maximum over thresholds (tests/test_isbi.py)


def test_oct_evaluator_staircase():
    label = np.zeros((6, 4), np.uint8)
    label[2:] = 1
    label[4:] = 2                               # boundary 1 at row 2, boundary 2 at row 4
    predicted = label.copy()
    predicted[2, :2] = 0                        # boundary 1 one row lower in two columns
    prob = torch.nn.functional.one_hot(torch.from_numpy(predicted).long(), 3).permute(2, 0, 1).float()
    sample = tasks.Sample("o", np.zeros((6, 4, 3), np.uint8), label)
    row, curve = score_layers(prob, sample, 0.5)
    assert curve is None and list(row) == ["MAE b1", "MAE b2", "MAE mean"]
    assert row["MAE b1"] == pytest.approx(0.5) and row["MAE b2"] == 0.0 and row["MAE mean"] == pytest.approx(0.25)


def test_every_dataset_has_a_reader_a_scorer_a_note_and_a_source():
    for name, spec in tasks.DATASETS.items():
        assert callable(spec.reader) and callable(spec.score), name
        assert spec.notes and spec.source, name
        assert spec.num_classes >= 1 or (spec.num_classes == 0 and callable(spec.label_values)), name
    with pytest.raises(UserError, match="unknown dataset 'glas2015'; choose one of"):
        tasks.dataset("glas2015")
