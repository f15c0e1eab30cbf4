"""The published CPU results: the paired comparison's arithmetic, release copies, and the released
checkpoints reproducing the committed numbers through test.py on DRIVE test images."""
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch

import comparison
import crossval
import devices
import evaluation
import framework
import main
import networks
from conftest import REPO, run_script
from errors import UserError
from tasks import chase

RELEASED = REPO / "weights" / "released" / "cenet_drive_cpu_clahe.pth"
EARLIER_RELEASE = REPO / "weights" / "released" / "cenet_drive_cpu.pth"  # kept: its rows stay reproducible
COMMITTED = REPO / "results" / "drive_cpu.json"
COMMITTED_CHASE = REPO / "results" / "chase_cpu.json"
CHASE = Path(os.environ.get("CHASE_ROOT", REPO.parent / "shared" / "CHASEDB1"))


def fake_run(values, name="a"):
    return {"eval_dir": name, "per_image": {f"{index:02d}": {"FOV AUC": value, "FOV F1": 0.5}
                                            for index, value in enumerate(values, 1)}}


def test_paired_comparison_by_hand():
    first = fake_run([0.90, 0.92, 0.94, 0.96, 0.98])
    other = fake_run([0.89, 0.90, 0.91, 0.92, 0.93], "b")
    result = comparison.paired(first, other, ["FOV AUC", "FOV F1"])
    auc = result["FOV AUC"]
    # differences 0.01, 0.02, 0.03, 0.04, 0.05: mean 0.03, all five positive; the exact two-sided signed-rank
    # p-value of 5 positive ranks out of 5 is 2 / 2^5 = 0.0625.
    assert auc["mean_difference"] == pytest.approx(0.03)
    assert (auc["first_higher"], auc["other_higher"], auc["images"]) == (5, 0, 5)
    assert auc["wilcoxon_p"] == pytest.approx(0.0625)
    assert result["FOV F1"]["wilcoxon_p"] is None and result["FOV F1"]["mean_difference"] == 0.0
    assert result["FOV F1"]["identical"] and not auc["identical"]
    runs = [full_fake_run("cenet", [0.90, 0.92, 0.94, 0.96, 0.98], 750), full_fake_run("unet", [0.89] * 5, 130)]
    page = comparison.render_markdown("t", runs, [(runs[0], runs[1], result)], ["FOV AUC", "FOV F1"], [])
    assert "| FOV AUC | +0.0300 | 5 of 5 | 0.062 |" in page and "| FOV F1 | +" not in page
    assert "Equal on every image for both, so not compared: FOV F1." in page
    with pytest.raises(UserError, match="share no test image"):
        comparison.paired(first, {"eval_dir": "c", "per_image": {"99": {"FOV AUC": 1.0}}}, ["FOV AUC"])


def test_training_command_names_what_differs_from_the_recipe():
    import cli
    settings = cli.default_settings()  # as a checkpoint records them
    settings.update(RECIPE="cpu", PATCH_SIZE=256, BATCH_SIZE=4, AUGMENT="flips", OPTIMIZER="adamw", LR=2e-3,
                    WARMUP_STEPS=30, LOSS="dice_bce", EPOCHS=19, PRETRAINED="none", PREPROCESS="clahe", MODEL="unet",
                    VISDOM=False)
    assert comparison.training_command(settings) == "python main.py --recipe cpu --model unet --epochs 19 --visdom false"
    settings["PREPROCESS"] = "ours"  # a run made before the recipe equalised its images
    assert comparison.training_command(settings) == \
        "python main.py --recipe cpu --preprocess ours --model unet --epochs 19 --visdom false"


def test_runs_of_one_model_are_told_apart_by_loss_or_steps():
    runs = [{"model": "cenet", "loss": "dice_bce", "steps": 750}, {"model": "fullnet", "loss": "bce", "steps": 20},
            {"model": "fullnet", "loss": "varce", "steps": 20}, {"model": "unet", "loss": None, "steps": 130},
            {"model": "cenet", "loss": "dice_bce", "steps": 1500, "title": "CE-Net, 1500 steps"},
            {"model": "cenet", "loss": "dice_bce", "steps": 750, "protocol": {"tta": False}}]
    titles = [run["title"] for run in comparison.distinct_titles(runs)]
    assert titles == ["CE-Net, 750 steps", "FullNet, BCE", "FullNet, varCE", "U-Net", "CE-Net, 1500 steps",
                      "CE-Net, 750 steps, no TTA"]
    same_but_tta = comparison.distinct_titles([runs[0], runs[-1]])
    assert [run["title"] for run in same_but_tta] == ["CE-Net", "CE-Net, no TTA"]
    clahe = [{"model": "cenet", "loss": "dice_bce", "steps": 1400, "protocol": {"preprocess": "clahe"}},
             runs[0], runs[4]]
    assert [run["title"] for run in comparison.distinct_titles(clahe)] == [
        "CE-Net, CLAHE, 1400 steps", "CE-Net, 750 steps", "CE-Net, 1500 steps"]
    same_steps = comparison.distinct_titles([{**clahe[0], "steps": 750}, runs[0], {**runs[0], "patch_scale": 1.5}])
    assert [run["title"] for run in same_steps] == ["CE-Net, CLAHE", "CE-Net", "CE-Net, 1.5x scale"]
    other_lr = [{"model": "cenet", "loss": "bce", "steps": 5, "checkpoint": f"weights/{name}/final.pth"}
                for name in ("lr_2e-3", "lr_3e-3")]
    assert [run["title"] for run in comparison.distinct_titles(other_lr)] == [
        "CE-Net, 5 steps (lr_2e-3)", "CE-Net, 5 steps (lr_3e-3)"]


def test_averaged_and_fine_tuned_weights_are_named_in_titles_and_commands():
    final = {"model": "fullnet", "loss": "varce", "steps": 1760, "checkpoint": "weights/run/final.pth"}
    averaged_from = [{"checkpoint": f"weights/run/step_{step}.pth", "step": step} for step in (880, 1320)] + \
        [{"checkpoint": "weights/run/final.pth", "step": 1760}]
    averaged = {**final, "checkpoint": "weights/run/mean.pth",
                "weights_from": comparison.weights_origin({"averaged_from": averaged_from}, {})}
    tuned = {**final, "steps": 220, "checkpoint": "weights/tuned/final.pth",
             "weights_from": comparison.weights_origin({}, {"INIT_WEIGHTS": "weights/run/final.pth"})}
    titles = [run["title"] for run in comparison.distinct_titles([final, averaged, tuned])]
    assert titles == ["FullNet, 1760 steps",
                      "FullNet, mean of 3 checkpoints' weights (steps 880, 1320, 1760), 1760 steps",
                      "FullNet, fine-tuned from run/final.pth, 220 steps"]
    assert comparison.weights_origin({"step": 1760}, {"INIT_WEIGHTS": ""}) is None
    assert comparison.averaging_command({"averaged_from": averaged_from}, "weights/run/mean.pth") == (
        " && python average.py weights/run/step_880.pth weights/run/step_1320.pth weights/run/final.pth "
        "--out weights/run/mean.pth")
    assert comparison.averaging_command({}, "weights/run/final.pth") == ""


def full_fake_run(model, values, steps):
    run = fake_run(values, f"gone/{model}")
    run.update(model=model, title=model, checkpoint=f"gone/{model}.pth", steps=steps, train_seconds=60.0,
               eval_seconds=6.0, pretrained="none", train_machine="CPU", train_commit="abc",
               train_command="python main.py", eval_command="python test.py",
               summary={"FOV AUC": {"mean": sum(values) / len(values), "std": 0.0}},
               protocol={"evaluation": "scored as stated", "tta": True, "threshold": 0.5, "device": "cpu"})
    return run


def test_new_runs_join_a_carried_table_whose_folders_are_gone(tmp_path):
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "old_roc.png").write_bytes(b"png")
    table = {"runs": [full_fake_run("cenet", [0.90, 0.92, 0.94, 0.96, 0.98], 750),
                      full_fake_run("unet", [0.89, 0.90, 0.91, 0.92, 0.93], 130)],
             "figures": ["figures/old_roc.png", "figures/deleted.png"], "notes": ["How the old runs were timed."]}
    (tmp_path / "old.json").write_text(json.dumps(table))
    json_path, md_path = comparison.write("new", "t", [], tmp_path, notes=["A new note."],
                                          carry=tmp_path / "old.json")
    written = json.loads(json_path.read_text())
    assert [run["title"] for run in written["runs"]] == ["CE-Net", "U-Net"]
    assert written["notes"] == ["How the old runs were timed.", "A new note."]   # the carried notes stay
    assert "- How the old runs were timed.\n- A new note." in md_path.read_text()
    assert written["paired"][0]["metrics"]["FOV AUC"]["mean_difference"] == pytest.approx(0.03)
    assert written["figures"] == ["figures/old_roc.png"]  # the carried figure that still exists
    assert "figures/old_roc.png" in md_path.read_text()
    elsewhere = tmp_path / "elsewhere"
    comparison.write("new", "t", [], elsewhere, carry=tmp_path / "old.json")
    assert (elsewhere / "figures" / "old_roc.png").read_bytes() == b"png"
    # a copy of the table kept away from its figures still finds them in the output folder
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "old.json").write_text(json.dumps(table))
    json_path, _ = comparison.write("new", "t", [], tmp_path, carry=tmp_path / "kept" / "old.json")
    assert json.loads(json_path.read_text())["figures"] == ["figures/old_roc.png"]
    # a new output folder with nothing to copy into it is made, not a traceback
    table["figures"] = []
    (tmp_path / "old.json").write_text(json.dumps(table))
    json_path, _ = comparison.write("new", "t", [], tmp_path / "new" / "folder", carry=tmp_path / "old.json")
    assert json_path.is_file()
    # with carry_after a new run leads: it is the reference of every pair and its figures are the table's
    new_run = tmp_path / "new_run"
    new_run.mkdir()
    torch.save({"step": 5, "settings": {"LOSS": "dice_bce"}}, tmp_path / "new.pth")
    (new_run / "metrics.json").write_text(json.dumps({
        "summary": {"FOV AUC": {"mean": 0.95, "std": 0.0}}, "seconds": {"total_after_load": 1.0},
        "per_image": {f"{index:02d}": {"FOV AUC": value} for index, value in enumerate([0.95] * 5, 1)},
        "protocol": {"checkpoint": str(tmp_path / "new.pth"), "model": "backbone", "tta": True,
                     "threshold": 0.5, "device": "cpu", "evaluation": "scored as stated"}}))
    json_path, _ = comparison.write("lead", "t", [new_run], tmp_path, carry=tmp_path / "old.json", carry_after=True)
    written = json.loads(json_path.read_text())
    assert [run["model"] for run in written["runs"]] == ["backbone", "cenet", "unet"]
    assert [(pair["first"], pair["other"]) for pair in written["paired"]] == [("backbone", "cenet"),
                                                                            ("backbone", "unet")]
    assert written["paired"][0]["metrics"]["FOV AUC"]["mean_difference"] == pytest.approx(0.95 - 0.94)
    # the carried table's heading stays unless a new one is named; without either, the default heading
    table["title"] = "Old runs on DRIVE"
    (tmp_path / "old.json").write_text(json.dumps(table))
    json_path, md_path = comparison.write("kept", None, [], tmp_path, carry=tmp_path / "old.json")
    assert json.loads(json_path.read_text())["title"] == "Old runs on DRIVE"
    assert md_path.read_text().startswith("# Old runs on DRIVE\n")
    json_path, _ = comparison.write("renamed", "New heading", [], tmp_path, carry=tmp_path / "old.json")
    assert json.loads(json_path.read_text())["title"] == "New heading"
    json_path, _ = comparison.write("plain", None, [new_run], tmp_path)
    assert json.loads(json_path.read_text())["title"] == "Evaluated runs side by side"
    with pytest.raises(UserError, match="--carry takes"):
        comparison.write("new", "t", [], tmp_path, carry=tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{ not json")
    with pytest.raises(UserError, match="is not JSON"):
        comparison.write("new", "t", [], tmp_path, carry=tmp_path / "broken.json")


def crossval_table(folder, name, model, slices_by_fold, postprocess="none"):
    """A <name>.json as crossval.py writes it, each fold testing the slices given with their VRand values."""
    records = []
    for fold, values in slices_by_fold.items():
        per_image = {f"slice{index:02d}": {"VRand": value, "VInfo": 0.9}
                     for index, value in zip(range(2 * fold, 2 * fold + len(values)), values)}
        protocol = {"model": model, "dataset": "isbi2012", "trained_on": "isbi2012", "tta": True,
                    "threshold": 0.5, "device": "cpu", "evaluation": "V^Rand as the challenge scores",
                    "train_steps": 1200, "postprocess": postprocess}
        records.append({"fold": fold, "checkpoint": f"weights/{name}_fold{fold}/final.pth", "protocol": protocol,
                        "summary": {"VRand": sum(values) / len(values), "VInfo": 0.9}, "per_image": per_image,
                        "train_seconds": 600.0, "eval_seconds": 30.0, "settings": {"MODEL": model, "LOSS": "dice"}})
    command = f"python crossval.py --name {name} --only {max(slices_by_fold)} --model {model} --dataset isbi2012"
    crossval.write_outputs(folder, name, 5, records, command)
    return folder / f"{name}.json"


def test_crossval_tables_pair_slice_by_slice_with_the_papers_figures_beside(tmp_path):
    cenet = crossval_table(tmp_path, "cells", "cenet", {0: [0.90, 0.80], 1: [0.95, 0.85]}, "watershed")
    backbone = crossval_table(tmp_path, "cells_backbone", "backbone", {0: [0.86, 0.81]})
    json_path, md_path = comparison.write("isbi", "t", [cenet, backbone], tmp_path)
    written, page = json.loads(json_path.read_text()), md_path.read_text()
    lead = written["runs"][0]
    assert sorted(lead["per_image"]) == ["slice00", "slice01", "slice02", "slice03"]
    assert lead["summary"]["VRand"]["mean"] == pytest.approx((0.90 + 0.80 + 0.95 + 0.85) / 4)
    assert lead["over_folds"]["VRand"]["mean"] == pytest.approx((0.85 + 0.90) / 2)
    # pairs only over the slices both tables tested: fold 0's, differences +0.04 and -0.01
    vrand = written["paired"][0]["metrics"]["VRand"]
    assert (vrand["images"], vrand["first_higher"]) == (2, 1)
    assert vrand["mean_difference"] == pytest.approx(0.015)
    assert lead["train_seconds"] == 1200.0 and lead["folds"] == [0, 1]
    assert lead["train_command"] == "python crossval.py --name cells --model cenet --dataset isbi2012"
    assert lead["eval_command"] == "python test.py --checkpoint weights/cells_fold<K>/final.pth --postprocess watershed"
    assert "| CE-Net | 0, 1 of 5 | 1200 |" in page and "| 0.9743 | 0.9878 |" in page    # Table IV beside ours
    assert "| Backbone | 0 of 5 | 1200 |" in page and "| 0.9569 | 0.9716 |" in page
    over_folds = page.split("### Mean ± std over folds")[1]
    assert "| CE-Net | 0, 1 of 5 | 0.8750 ± " in over_folds          # fold means 0.85 and 0.90
    assert "| Backbone |" not in over_folds and "Left out: 1 run of a single fold" in over_folds
    with pytest.raises(UserError, match="no cross-validated fold"):
        comparison.write("isbi", "t", [tmp_path / "isbi.json"], tmp_path)


def test_a_lever_on_one_fold_sits_beside_that_fold_of_a_finished_table(tmp_path):
    recipe = crossval_table(tmp_path, "cells", "cenet", {0: [0.90, 0.80], 1: [0.95, 0.85], 2: [0.70, 0.75]})
    lever = crossval_table(tmp_path, "cells_plain", "cenet", {0: [0.88, 0.84]})
    table = json.loads(recipe.read_text())
    table["records"][0]["git_commit"] = "abc123"    # folds trained since record their commit themselves
    recipe.write_text(json.dumps(table))
    json_path, md_path = comparison.write("levers", "t", [recipe, lever], tmp_path, folds=[0])
    lead = json.loads(json_path.read_text())["runs"][0]
    assert sorted(lead["per_image"]) == ["slice00", "slice01"] and lead["folds"] == [0]
    assert lead["summary"]["VRand"]["mean"] == pytest.approx(0.85)      # fold 0's slices, not all six
    assert lead["train_seconds"] == 600.0 and lead["train_commit"] == "abc123"
    assert "mean ± std over the 2 images" in md_path.read_text()
    assert "Mean ± std over folds" not in md_path.read_text()      # one fold each: no spread to show
    with pytest.raises(UserError, match=r"cells_plain.json has no fold 2 \(folds done: 0\)"):
        comparison.write("levers", "t", [recipe, lever], tmp_path, folds=[0, 2])


def test_evaluation_command_reproduces_the_test_protocol():
    assert comparison.evaluation_command("w.pth", {"tta": True, "threshold": 0.5, "scoring": "ours"}) == \
        "python test.py --checkpoint w.pth"
    assert comparison.evaluation_command("w.pth", {"tta": False, "threshold": 0.4, "scoring": "authors"}) == \
        "python test.py --checkpoint w.pth --tta false --threshold 0.4 --protocol authors"


def test_evaluation_command_names_the_other_dataset_its_folder_scale_and_split():
    away = {"tta": True, "threshold": 0.5, "scoring": "ours", "dataset": "chase", "trained_on": "drive",
            "data_root": "/data/CHASEDB1", "eval_scale": "auto", "split": "test"}
    assert comparison.evaluation_command("d.pth", away) == \
        "python test.py --checkpoint d.pth --dataset chase --data-root /data/CHASEDB1 --eval-scale auto"
    at_home = {**away, "trained_on": "chase", "eval_scale": "1", "split": "all"}
    assert comparison.evaluation_command("c.pth", at_home) == "python test.py --checkpoint c.pth --split all"
    adapted = {**away, "adapt_bn": "train"}
    assert comparison.evaluation_command("d.pth", adapted) == ("python test.py --checkpoint d.pth --dataset chase "
                                                               "--data-root /data/CHASEDB1 --eval-scale auto "
                                                               "--adapt-bn train")


def test_runs_told_apart_by_batchnorm_adaptation():
    runs = [{"model": "cenet", "loss": "dice_bce", "steps": 1400, "protocol": {"adapt_bn": choice}}
            for choice in ("none", "train", "scored")]
    assert [run["title"] for run in comparison.distinct_titles(runs)] == [
        "CE-Net", "CE-Net, BatchNorm re-estimated on the training images",
        "CE-Net, BatchNorm re-estimated on the scored images"]


def test_runs_of_one_model_are_told_apart_by_training_data_and_prediction_scale():
    def run(trained_on, eval_scale):
        return {"model": "cenet", "loss": "dice_bce", "steps": 1400,
                "protocol": {"dataset": "chase", "trained_on": trained_on, "eval_scale": eval_scale}}
    titles = [run["title"] for run in comparison.distinct_titles(
        [run("chase", "1"), run("drive", "1"), run("drive", "auto")])]
    assert titles == ["CE-Net, trained on CHASE_DB1, training scale", "CE-Net, trained on DRIVE, training scale",
                      "CE-Net, trained on DRIVE, FOV-matched scale"]
    assert [run["title"] for run in comparison.distinct_titles([run("drive", "1"), run("drive", "1.7")])] == [
        "CE-Net, training scale", "CE-Net, 1.7x prediction scale"]
    every_image = run("drive", "field")
    every_image["protocol"]["split"] = "all"
    assert [run["title"] for run in comparison.distinct_titles([run("drive", "field"), every_image])] == [
        "CE-Net", "CE-Net, training and test images"]
    camera, flips, unrecorded = ({**run("drive", "field"), "augment": augment} for augment in ("camera", "flips", None))
    assert [run["title"] for run in comparison.distinct_titles([camera, flips, unrecorded])] == [
        "CE-Net, camera augmentation", "CE-Net, flips only", "CE-Net"]   # a table older than the record: no tag


def test_runs_of_one_model_are_told_apart_by_their_training_crops():
    crops = {"model": "cenet", "loss": "weighted_bce_dice", "augment": "elastic", "steps": 1200,
             "patch_size": 256, "batch_size": 4}
    whole = {**crops, "patch_size": 512, "batch_size": 1}
    resized = {**crops, "patch_size": 0, "batch_size": 8}
    unrecorded = {key: value for key, value in crops.items() if key not in ("patch_size", "batch_size")}
    assert [run["title"] for run in comparison.distinct_titles([whole, crops, resized, unrecorded])] == [
        "CE-Net, 512 px crops, batch 1", "CE-Net, 256 px crops, batch 4", "CE-Net, whole resized images, batch 8",
        "CE-Net"]
    assert [run["title"] for run in comparison.distinct_titles([crops, {**crops, "steps": 600}])] == [
        "CE-Net, 1200 steps", "CE-Net, 600 steps"]   # the same crops: no tag


def test_runs_are_paired_only_with_a_run_scored_the_same_way():
    def run(tta, threshold=0.5, dataset="drive"):
        return {"protocol": {"tta": tta, "threshold": threshold, "dataset": dataset}}
    runs = [run(True), run(True), run(False), run(True), run(False), run(True, 0.4), run(True, dataset="chase")]
    assert comparison.reference_pairs(runs) == [(0, 1), (0, 3), (2, 4)]
    # a three-class nuclei model is scored on MoNuSeg's own test tiles and nuclei: it pairs with a binary one
    nuclei = [run(False, dataset="monuseg"), run(False, dataset="monuseg_contour"), run(False, dataset="glas")]
    assert comparison.reference_pairs(nuclei) == [(0, 1)]


def test_release_copy_is_float16_and_evaluates_like_the_original(tmp_path):
    torch.manual_seed(0)
    model = networks.build_model("backbone_rmp").eval()
    with torch.no_grad():  # a from-scratch network's variances can leave float16's range (max 65504)
        model.encoder.bn1.running_var.fill_(2e10)
        model.encoder.bn1.running_mean.fill_(1e5)
    settings = {"MODEL": "backbone_rmp", "DATASET": "drive", "IMAGE_SIZE": 64, "DATA_ROOT": "nowhere"}
    source = framework.save_checkpoint(tmp_path / "final.pth", model, settings, step=5)
    target = framework.release_checkpoint(source, tmp_path / "released" / "model.pth", git_commit="abc")
    payload = torch.load(target, weights_only=True)
    assert payload["weights_dtype"].startswith("float16") and payload["git_commit"] == "abc" and payload["step"] == 5
    weights = payload["state_dict"]
    assert weights["encoder.conv1.weight"].dtype == torch.float16
    assert weights["encoder.bn1.running_var"].dtype == torch.float32  # statistics keep their range
    assert target.stat().st_size < 0.6 * source.stat().st_size
    loaded, merged, _ = evaluation.load_model(target, {**settings, "MODEL": "cenet"}, frozenset())
    assert merged["MODEL"] == "backbone_rmp"
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.sigmoid(loaded.eval()(images)), torch.sigmoid(model(images)),
                                   rtol=0, atol=5e-3)
    with pytest.raises(UserError, match="refusing to overwrite"):
        framework.release_checkpoint(source, target)


@pytest.mark.parametrize("released", [RELEASED, EARLIER_RELEASE], ids=["released", "earlier"])
def test_readme_states_the_released_checkpoints_sha256(released):
    if not released.is_file():
        pytest.skip("no released checkpoint in this checkout")
    digest = hashlib.sha256(released.read_bytes()).hexdigest()
    assert digest in (REPO / "README.md").read_text()
    assert released.stat().st_size < 64 * 2**20


def committed_row(released, tta):
    committed = json.loads(COMMITTED.read_text())
    return next(run for run in committed["runs"]
                if Path(run["checkpoint"]).name == released.name and run["protocol"]["tta"] == tta)


def evaluate_released(released, tta, amp, drive_root, out):
    result = run_script("test.py", "--checkpoint", released, "--data-root", drive_root, "--out", out,
                        "--device", "cpu", "--tta", str(tta).lower(), "--amp", str(amp).lower())
    assert result.returncode == 0, result.stderr
    return result, json.loads((out / "metrics.json").read_text())


def drive_test_subset(drive_root, numbers, folder):
    """A DRIVE root whose test split holds only the given images (links to the real files): test.py's whole
    path with 8-way TTA on a few images costs a fraction of the 20."""
    for sub, pattern in (("images", "{}_test.tif"), ("1st_manual", "{}_manual1.gif"),
                         ("2nd_manual", "{}_manual2.gif"), ("mask", "{}_test_mask.gif")):
        (folder / "test" / sub).mkdir(parents=True)
        for number in numbers:
            source = Path(drive_root) / "test" / sub / pattern.format(number)
            if source.is_file():
                (folder / "test" / sub / source.name).symlink_to(source.resolve())
    return folder


# The released model with test.py's defaults (8-way TTA), image by image on three test images, and the earlier
# release without TTA over all 20 (its committed means and spreads); both in fp32 (--amp false), the precision
# of the committed tables, so on every CPU.
def test_released_checkpoint_with_tta_reproduces_the_committed_per_image_numbers(drive_root, tmp_path):
    """From now on, a change to preprocessing, test-time augmentation or a metric fails here."""
    row = committed_row(RELEASED, True)
    picked = ("03", "11", "19")  # the worst, a middling and the best FOV F1 of the committed row
    subset = drive_test_subset(drive_root, picked, tmp_path / "DRIVE")
    result, written = evaluate_released(RELEASED, True, False, subset, tmp_path / "released")
    assert written["protocol"]["precision"] == "fp32" and sorted(written["per_image"]) == list(picked)
    for name in picked:
        assert set(written["per_image"][name]) == set(row["per_image"][name])
        for key, expected in row["per_image"][name].items():
            assert written["per_image"][name][key] == pytest.approx(expected, abs=1e-3), (name, key)
    assert re.search(r"FOV AUC\s+0\.\d{4} ± 0\.\d{4}", result.stdout)


def test_earlier_release_reproduces_the_committed_summary_over_all_test_images(drive_root, tmp_path):
    row = committed_row(EARLIER_RELEASE, False)
    _, written = evaluate_released(EARLIER_RELEASE, False, False, drive_root, tmp_path / "earlier")
    summary = written["summary"]
    assert written["protocol"]["precision"] == "fp32"
    assert set(summary) == set(row["summary"])
    for key, expected in row["summary"].items():
        assert summary[key]["mean"] == pytest.approx(expected["mean"], abs=1e-3), key
        assert summary[key]["std"] == pytest.approx(expected["std"], abs=1e-3), key


def test_released_drive_model_on_chase_reproduces_the_committed_cross_dataset_row(tmp_path, monkeypatch):
    """Two images of the committed DRIVE -> CHASE_DB1 row without TTA, at the FOV-matched scale, in fp32,
    through test.py's whole evaluation: a change to the CHASE reader, the FOV estimate, the scale matching,
    the resampling or the scoring fails here, per image."""
    if not (CHASE / "Image_14R.jpg").is_file():
        pytest.skip(f"CHASE_DB1 not found at {CHASE} (set CHASE_ROOT)")
    row = next(run for run in json.loads(COMMITTED_CHASE.read_text())["runs"]
               if Path(run["checkpoint"]).name == RELEASED.name and not run["protocol"]["tta"]
               and run["protocol"]["eval_scale"] == "auto" and run["protocol"]["split"] == "test")
    picked = ("11L", "13R")
    monkeypatch.setitem(chase.SPLITS, "test", picked)
    chosen, given = main.parse_settings(["--dataset", "chase", "--data-root", str(CHASE), "--eval-scale", "auto",
                                         "--tta", "false", "--amp", "false", "--device", "cpu"])
    _, out, _ = evaluation.evaluate(RELEASED, chosen, given, out_dir=tmp_path / "chase")
    written = json.loads((out / "metrics.json").read_text())
    assert written["protocol"]["precision"] == "fp32" and sorted(written["per_image"]) == sorted(picked)
    for name in picked:
        assert written["protocol"]["scales"][name] == row["protocol"]["scales"][name]
        for key in ("FOV AUC", "FOV F1", "FOV Sen", "2nd annotator FOV F1"):
            assert written["per_image"][name][key] == pytest.approx(row["per_image"][name][key], abs=2e-3), \
                (name, key)


# Measured on the 20 DRIVE test images without TTA (2-core AMD EPYC with AVX-512 BF16): bf16 autocast moved
# the released model's probabilities by 0.00026 on average (0.025 at most, at a few vessel edges), and each
# image's FOV AUC by at most 3.6e-5, F1 by 4.2e-4, Sen by 6.9e-4; every summary mean stayed within 2.3e-4 of
# fp32. 1e-3 (the fp32 check's own tolerance) leaves room for other bf16 kernels without hiding a real fault.
def test_released_checkpoint_in_bf16_gives_the_committed_numbers(drive_root, tmp_path):
    if not devices.cpu_capability()[1]:
        pytest.skip(f"this CPU has no native bf16 ({devices.cpu_capability()[0]}), so AMP predicts in fp32 here")
    row = committed_row(RELEASED, False)
    _, written = evaluate_released(RELEASED, False, True, drive_root, tmp_path / "bf16")
    assert written["protocol"]["precision"] == "bf16 autocast"
    for key, expected in row["summary"].items():
        assert written["summary"][key]["mean"] == pytest.approx(expected["mean"], abs=1e-3), key
