"""CHASE_DB1 (retinal vessels, beside DRIVE) and Drishti-GS1 (optic disc and cup): both readers on synthetic
copies in the official layouts (tests/fixtures.py), their errors, splits and scoring; the cross-dataset
evaluation of a DRIVE model on CHASE_DB1 (which pairs of datasets are allowed) and the --eval-scale rule."""
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluation
import fixtures
import fov
import main
import tasks
import training
from conftest import REPO, TINY
from errors import UserError
from tasks import chase, drishti
from tasks.optic_disc import crop_around_brightest
from tasks.splits import SplitOptions

RELEASED = REPO / "weights" / "released" / "cenet_drive_cpu_clahe.pth"   # trained on DRIVE crops, PATCH_SIZE 256


def load(dataset, root, split, crop_size=64):
    return tasks.load_split(dataset, root, split, SplitOptions(crop_size=crop_size))


def settings(*argv):
    return main.parse_settings([str(arg) for arg in argv])


# --- CHASE_DB1 -----------------------------------------------------------------------------------------

def test_chase_split_is_the_first_20_and_the_last_8():
    assert len(chase.TRAIN_IMAGES) == 20 and len(chase.TEST_IMAGES) == 8
    assert chase.TRAIN_IMAGES[:2] == ("01L", "01R") and chase.TRAIN_IMAGES[-1] == "10R"
    assert chase.TEST_IMAGES == ("11L", "11R", "12L", "12R", "13L", "13R", "14L", "14R")
    assert set(chase.TRAIN_IMAGES) | set(chase.TEST_IMAGES) == set(fixtures.CHASE_NAMES)
    children = lambda names: {name[:2] for name in names}       # both eyes of a child on one side
    assert not children(chase.TRAIN_IMAGES) & children(chase.TEST_IMAGES)


def test_chase_reader_on_the_distributed_layout(tmp_path):
    root = fixtures.write_chase(tmp_path / "CHASEDB1")
    assert Image.open(root / "Image_01L_1stHO.png").mode == "1"   # 1-bit masks, as distributed
    train, test = load("chase", root, "train"), load("chase", root, "test")
    assert [sample.name for sample in train] == list(chase.TRAIN_IMAGES)
    assert [sample.name for sample in test] == list(chase.TEST_IMAGES)
    sample = test[0]
    _, field, first, second = fixtures.vessel_fundus(48, 50, seed=fixtures.CHASE_NAMES.index("11L"))
    assert sample.image.shape == (48, 50, 3) and sample.image.dtype == np.uint8
    assert sample.label.dtype == np.uint8 and np.array_equal(sample.label, first.astype(np.uint8))
    assert sample.experts.shape == (2, 48, 50) and np.array_equal(sample.experts[1], second)
    # No FOV masks ship with CHASE_DB1: the reader estimates one, about the lit disc.
    assert sample.fov.dtype == bool and np.array_equal(sample.fov, fov.estimate_fov(sample.image))
    assert (sample.fov & field).sum() / (sample.fov | field).sum() > 0.9
    assert "ESTIMATED" in tasks.DATASETS["chase"].notes


def test_split_all_is_train_then_test(tmp_path):
    root = fixtures.write_chase(tmp_path / "CHASEDB1")
    assert [sample.name for sample in load("chase", root, "all")] == list(chase.TRAIN_IMAGES + chase.TEST_IMAGES)
    with pytest.raises(UserError, match="unknown split 'val'"):
        load("chase", root, "val")
    with pytest.raises(UserError, match="--split val is out of range"):
        settings("--split", "val")


@pytest.mark.parametrize("missing, message", [
    ("Image_12L.jpg", r"CHASE_DB1 image .*Image_12L.jpg missing: expected Image_12L.jpg"),
    ("Image_12L_1stHO.png", r"annotation .*Image_12L_1stHO.png missing for image .*Image_12L.jpg: CHASE_DB1 "
                            r"names it Image_12L_1stHO.png"),
    ("Image_12L_2ndHO.png", r"annotation .*Image_12L_2ndHO.png missing for image .*Image_12L.jpg"),
])
def test_chase_missing_file_is_named(tmp_path, missing, message):
    root = fixtures.write_chase(tmp_path / "CHASEDB1")
    (root / missing).unlink()
    with pytest.raises(UserError, match=message):
        load("chase", root, "test")


def test_chase_without_any_second_annotator_still_reads(tmp_path):
    root = fixtures.write_chase(tmp_path / "CHASEDB1")
    for path in root.glob("*_2ndHO.png"):
        path.unlink()
    sample = load("chase", root, "test")[0]
    assert sample.experts.shape == (1, 48, 50)
    row, _ = chase.score_chase(torch.from_numpy(sample.label.astype(np.float32))[None], sample, 0.5)
    assert not any(key.startswith("2nd annotator") for key in row)


def test_chase_scoring_is_drives_plus_the_second_annotator(tmp_path):
    sample = load("chase", fixtures.write_chase(tmp_path / "CHASEDB1"), "test")[0]
    # A "model" that predicts exactly the second annotator scores what the human baseline scores.
    prob = torch.from_numpy(sample.experts[1].astype(np.float32))[None]
    row, curve = chase.score_chase(prob, sample, 0.5)
    assert curve is not None and row["FOV F1"] < 1
    for key in ("Acc", "Sen", "Spe", "F1"):
        assert row[f"2nd annotator FOV {key}"] == pytest.approx(row[f"FOV {key}"])
    perfect, _ = chase.score_chase(torch.from_numpy(sample.label.astype(np.float32))[None], sample, 0.5)
    assert perfect["FOV F1"] == 1 and perfect["2nd annotator FOV F1"] == row["FOV F1"]


# --- Drishti-GS1 -----------------------------------------------------------------------------------------

def test_drishti_official_split_counts():
    assert drishti.OFFICIAL_COUNTS == {"train": 50, "test": 51}
    assert drishti.FOLDERS == {"train": ("Training", "GT"), "test": ("Test", "Test_GT")}


def test_drishti_reader_on_the_official_layout(tmp_path, capsys):
    root = fixtures.write_drishti(tmp_path / "Drishti-GS1_files")
    soft = Image.open(root / "Test" / "Test_GT" / "drishtiGS_001" / "SoftMap" / "drishtiGS_001_ODsegSoftmap.png")
    assert soft.mode == "L" and set(np.unique(np.array(soft))) == {0, 64, 128, 191, 255}  # 0 ... 4 of 4 experts
    train, test = load("drishti", root, "train"), load("drishti", root, "test")
    assert [sample.name for sample in train] == list(fixtures.DRISHTI_TRAIN)
    assert [sample.name for sample in test] == list(fixtures.DRISHTI_TEST)
    assert "the official Drishti-GS1 Test set has 51" in capsys.readouterr().err   # a 2-image copy is not it
    sample = test[0]
    assert sample.image.shape == (64, 64, 3) and set(np.unique(sample.label)) == {0, 1}
    # Soft map >= 0.5 is 2 of the 4 experts: the third expert's disc, radius 15, whole inside the crop.
    assert sample.label.sum() == fixtures.disc_mask(40, 40, (20, 20), 15).sum()
    rows, columns = np.nonzero(sample.label)  # the smoothed peak may sit anywhere on the disc's flat top
    assert abs(rows.mean() - 32) <= 8 and abs(columns.mean() - 32) <= 8
    assert load("drishti", root, "test", crop_size=800)[0].image.shape == (800, 800, 3)  # padded: the default


def test_drishti_cup_option_has_three_classes(tmp_path):
    root = fixtures.write_drishti(tmp_path / "Drishti-GS1_files")
    sample = load("drishti_cup", root, "test")[0]
    assert tasks.DATASETS["drishti_cup"].num_classes == 3 and tasks.DATASETS["drishti"].num_classes == 1
    assert set(np.unique(sample.label)) == {0, drishti.RIM, drishti.CUP}
    assert (sample.label == drishti.CUP).sum() == fixtures.disc_mask(40, 40, (20, 20), 7).sum()  # third expert's
    disc = load("drishti", root, "test")[0].label
    assert np.array_equal(sample.label > 0, disc > 0)   # rim + cup is the binary option's disc


def test_drishti_archive_folder_may_be_nested(tmp_path):
    fixtures.write_drishti(tmp_path / "Drishti-GS1_files" / "Drishti-GS1_files")
    assert [sample.name for sample in load("drishti", tmp_path, "test")] == list(fixtures.DRISHTI_TEST)


@pytest.mark.parametrize("dataset, remove, message", [
    ("drishti", "Test/Images", r"Drishti-GS1 Test/Images folder .*Test/Images not found"),
    ("drishti", "Test/Test_GT", r"Drishti-GS1 Test/Test_GT folder .*Test_GT not found"),
    ("drishti", "Test/Test_GT/drishtiGS_003/SoftMap/drishtiGS_003_ODsegSoftmap.png",
     r"soft map .*drishtiGS_003_ODsegSoftmap.png missing for image drishtiGS_003: Drishti-GS1 names it "
     r"Test_GT/drishtiGS_003/SoftMap/drishtiGS_003_ODsegSoftmap.png"),
    ("drishti_cup", "Test/Test_GT/drishtiGS_003/SoftMap/drishtiGS_003_cupsegSoftmap.png",
     r"soft map .*drishtiGS_003_cupsegSoftmap.png missing for image drishtiGS_003"),
])
def test_drishti_missing_piece_is_named(tmp_path, dataset, remove, message):
    root = fixtures.write_drishti(tmp_path / "Drishti-GS1_files")
    path = root / remove
    if path.is_dir():
        for item in sorted(path.rglob("*"), reverse=True):
            item.unlink() if item.is_file() else item.rmdir()
        path.rmdir()
    else:
        path.unlink()
    with pytest.raises(UserError, match=message):
        load(dataset, root, "test")


def test_drishti_binary_target_needs_no_cup_map(tmp_path):
    root = fixtures.write_drishti(tmp_path / "Drishti-GS1_files")
    (root / "Test/Test_GT/drishtiGS_003/SoftMap/drishtiGS_003_cupsegSoftmap.png").unlink()
    assert len(load("drishti", root, "test")) == 2


def test_disc_location_prior_ignores_a_bright_artefact_at_the_border():
    height, width = 200, 240
    centre = (round(drishti.DISC_PRIOR[0] * height) + 10, round(drishti.DISC_PRIOR[1] * width) - 12)
    image, disc = fixtures.fundus(height, width, centre, 12, seed=3)
    image[0:30, 200:240] = 255                   # a bright reflex in a corner, larger than the disc
    label = disc.astype(np.uint8)
    _, plain = crop_around_brightest(image, label, size=96)
    assert plain.sum() < label.sum()            # the brightest-point rule alone crops the artefact
    crop, cropped = drishti.crop_disc(image, label, 96)
    assert crop.shape == (96, 96, 3) and cropped.sum() == label.sum()
    rows, columns = np.nonzero(cropped)
    assert abs(rows.mean() - 48) <= 3 and abs(columns.mean() - 48) <= 3


def test_disc_and_cup_scoring_by_hand():
    label = np.zeros((20, 20), np.uint8)
    label[4:16, 4:16] = drishti.RIM             # disc rows 4..15: height 12
    label[7:13, 7:13] = drishti.CUP             # cup rows 7..12: height 6, vCDR 0.5
    predicted = label.copy()
    predicted[6:14, 7:13] = drishti.CUP         # cup height 8: vCDR 8/12, cup E = 1 - 36/48
    prob = F.one_hot(torch.from_numpy(predicted).long(), 3).permute(2, 0, 1).float()
    sample = tasks.Sample("d", np.zeros((20, 20, 3), np.uint8), label)
    row, curve = drishti.score_disc_and_cup(prob, sample, 0.5)
    assert curve is None and list(row) == ["E disc", "Dice disc", "E cup", "Dice cup", "CDR error"]
    assert row["E disc"] == 0 and row["Dice disc"] == 1
    assert row["E cup"] == pytest.approx(1 - 36 / 48) and row["Dice cup"] == pytest.approx(72 / 84)
    assert row["CDR error"] == pytest.approx(8 / 12 - 0.5)
    assert np.isnan(drishti.vertical_cdr(np.zeros((3, 3), bool), np.zeros((3, 3), bool)))


# --- cross-dataset evaluation and the scale rule -------------------------------------------------------------

def test_which_datasets_a_model_may_be_scored_on():
    assert evaluation.compatible_datasets("drive", "chase") and evaluation.compatible_datasets("chase", "drive")
    assert not evaluation.compatible_datasets("drive", "origa")          # other task
    assert not evaluation.compatible_datasets("drishti", "drishti_cup")  # other classes
    assert not evaluation.compatible_datasets("origa", "messidor")       # no family declared


def test_dataset_flag_on_a_checkpoint_of_another_dataset(capsys):
    trained = {"MODEL": "cenet", "DATASET": "drive", "DATA_ROOT": str(REPO)}
    chosen, given = settings("--dataset", "chase", "--data-root", "/data/CHASEDB1")
    merged = evaluation.settings_for(trained, chosen, given, "drive.pth")
    assert merged["DATASET"] == "chase" and merged["DATA_ROOT"] == "/data/CHASEDB1"
    assert "cross-dataset evaluation: a model trained on drive scored on chase" in capsys.readouterr().err
    # Without --data-root the DRIVE folder of the checkpoint is no default for CHASE_DB1.
    chosen, given = settings("--dataset", "chase")
    assert evaluation.settings_for(trained, chosen, given, "drive.pth")["DATA_ROOT"] != str(REPO)
    for other in ("origa", "drishti", "oct"):
        chosen, given = settings("--dataset", other)
        with pytest.raises(UserError, match=f"trained as dataset 'drive', but --dataset {other} was given; a model is "
                                            f"scored on another dataset only when"):
            evaluation.settings_for(trained, chosen, given, "drive.pth")


def scale_settings(**overrides):
    chosen, _ = settings("--patch-size", "256")
    chosen.update(overrides)
    return chosen


def sample_with_fov(diameter, size=1200):
    field = np.zeros((size, size), bool)
    field[10:10 + diameter, 20:20 + diameter] = fixtures.disc_mask(diameter, diameter,
                                                                   (diameter / 2, diameter / 2), diameter / 2 + 1)
    return tasks.Sample("s", np.zeros((4, 4, 3), np.uint8), np.zeros((size, size), np.uint8), field)


def test_eval_scale_auto_matches_the_fov_to_drives(capsys):
    samples = [sample_with_fov(2 * fov.DRIVE_FOV_DIAMETER), sample_with_fov(fov.DRIVE_FOV_DIAMETER // 2)]
    assert evaluation.evaluation_scales(samples, scale_settings(EVAL_SCALE="auto"), "drive") == [0.5, 2.0]
    assert evaluation.evaluation_scales(samples, scale_settings(EVAL_SCALE="auto", PATCH_SCALE=1.5),
                                        "drive") == [0.75, 3.0]     # relative to the scale it was trained at
    assert evaluation.evaluation_scales(samples, scale_settings(), "drive") == [1.0, 1.0]   # the default: native
    assert evaluation.evaluation_scales(samples, scale_settings(EVAL_SCALE="0.8"), "drive") == [0.8, 0.8]
    # A model trained on CHASE_DB1 brings images to CHASE_DB1's FOV instead.
    assert evaluation.evaluation_scales(samples[:1], scale_settings(EVAL_SCALE="auto"), "chase") == \
        [round(chase.CHASE_FOV_DIAMETER / (2 * fov.DRIVE_FOV_DIAMETER), 4)]
    with pytest.raises(UserError, match="known for drive, chase only, not 'oct'"):
        evaluation.evaluation_scales(samples, scale_settings(EVAL_SCALE="auto"), "oct")
    with pytest.raises(UserError, match="would resize image s by 6"):
        evaluation.evaluation_scales(samples, scale_settings(EVAL_SCALE="3", PATCH_SCALE=2.0), "drive")
    # A model that resizes every image to IMAGE_SIZE has no use for a scale.
    assert evaluation.evaluation_scales(samples, scale_settings(EVAL_SCALE="auto", PATCH_SIZE=0), "drive") is None
    assert "--eval-scale auto ignored" in capsys.readouterr().err
    with pytest.raises(UserError, match="--eval-scale big is out of range"):
        settings("--eval-scale", "big")


def test_eval_scale_field_also_matches_the_cameras_field_angles():
    samples = [sample_with_fov(2 * fov.DRIVE_FOV_DIAMETER)]
    # CHASE_DB1's camera spans 30 degrees, DRIVE's 45: at equal FOV diameters a CHASE_DB1 vessel is 1.5x wider.
    on_chase = scale_settings(EVAL_SCALE="field", DATASET="chase")
    assert evaluation.evaluation_scales(samples, on_chase, "drive") == [round(0.5 * 30 / 45, 4)]
    assert evaluation.evaluation_scales(samples, {**on_chase, "DATASET": "drive"}, "drive") == [0.5]
    assert evaluation.evaluation_scales(samples, {**on_chase, "DATASET": "drive"}, "chase") == \
        [round(chase.CHASE_FOV_DIAMETER / (2 * fov.DRIVE_FOV_DIAMETER) * 45 / 30, 4)]
    with pytest.raises(UserError, match="field angle, which is recorded for drive, chase only, not 'origa'"):
        evaluation.evaluation_scales(samples, {**on_chase, "DATASET": "origa"}, "drive")
    assert settings("--eval-scale", "field")[0]["EVAL_SCALE"] == "field"


def test_eval_scale_auto_estimates_a_missing_fov():
    image, field, _, _ = fixtures.vessel_fundus(240, 240, seed=0)
    sample = tasks.Sample("e", image, np.zeros((240, 240), np.uint8))
    diameter = fov.fov_diameter(fov.estimate_fov(image))
    assert abs(diameter - fov.fov_diameter(field)) <= 3
    scale = evaluation.evaluation_scales([sample], scale_settings(EVAL_SCALE="auto"), "drive")[0]
    assert scale == pytest.approx(fov.DRIVE_FOV_DIAMETER / diameter, abs=1e-4)


def test_drive_model_scored_on_chase_without_retraining(tmp_path, monkeypatch):
    root = fixtures.write_chase(tmp_path / "CHASEDB1")
    chosen, given = settings("--dataset", "chase", "--data-root", root, "--device", "cpu", "--tta", "false")
    summary, out, _ = evaluation.evaluate(RELEASED, chosen, given, out_dir=tmp_path / "native")
    report = json.loads((out / "metrics.json").read_text())
    assert report["protocol"]["trained_on"] == "drive" and report["protocol"]["dataset"] == "chase"
    assert set(report["per_image"]) == set(chase.TEST_IMAGES) and report["protocol"]["scales"]["11L"] == 1.0
    assert 0 <= summary["FOV F1"]["mean"] <= 1 and "2nd annotator FOV F1" in summary
    assert report["protocol"]["evaluation"] == chase.NOTES
    scan = report["threshold_scan"]  # the best threshold for these images, and F1 at the one in use
    assert scan["metric"] == "FOV F1" and scan["threshold"] == 0.5
    assert scan["at_threshold"] == pytest.approx(summary["FOV F1"]["mean"])
    assert scan["best"] >= scan["at_threshold"] and 0 < scan["best_threshold"] < 1
    # --eval-scale auto, with DRIVE's FOV diameter set to about twice the fixture's: probabilities come back
    # at the native 48 x 50.
    monkeypatch.setitem(tasks.DATASETS, "drive", dataclasses.replace(tasks.DATASETS["drive"], fov_diameter=90))
    chosen, given = settings("--dataset", "chase", "--data-root", root, "--device", "cpu", "--tta", "false",
                             "--eval-scale", "auto", "--split", "all")
    _, out, _ = evaluation.evaluate(RELEASED, chosen, given, out_dir=tmp_path / "auto")
    report = json.loads((out / "metrics.json").read_text())
    assert len(report["per_image"]) == 28 and report["protocol"]["split"] == "all"
    assert all(1.5 < scale < 2.5 for scale in report["protocol"]["scales"].values())
    assert Image.open(out / "11L_prob.png").size == (50, 48)


@pytest.mark.parametrize("dataset, writer", [("chase", fixtures.write_chase), ("drishti_cup", fixtures.write_drishti)])
def test_train_and_evaluate_round_trip(dataset, writer, tmp_path):
    root = writer(tmp_path / dataset)
    run_dir = training.train(*main.parse_settings([str(arg) for arg in (
        "--dataset", dataset, "--data-root", root, "--run-name", dataset, "--weights-dir", tmp_path / "weights",
        "--crop-size", 64, *TINY, "--epochs", "1")]))
    chosen, given = settings("--device", "cpu", "--tta", "false")
    summary, _, _ = evaluation.evaluate(run_dir / "final.pth", chosen, given, out_dir=tmp_path / "results")
    expected = {"chase": "FOV AUC", "drishti_cup": "CDR error"}[dataset]
    assert expected in summary


def test_the_fundus_datasets_carry_their_fov_diameter():
    """One place (the registry) holds each fundus dataset's FOV diameter, for test.py and predict.py alike."""
    assert set(tasks.fundus_datasets()) == {"drive", "chase"}
    assert tasks.dataset("drive").fov_diameter == fov.DRIVE_FOV_DIAMETER
    assert tasks.dataset("chase").fov_diameter == chase.CHASE_FOV_DIAMETER
