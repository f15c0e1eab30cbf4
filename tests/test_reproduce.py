"""reproduce.py: the whole table at toy scale on 2+2 real DRIVE images, resuming, and its arithmetic."""
import contextlib
import io
import json
import math
import re
from pathlib import Path

import pytest

import reproduce
import tables
from conftest import module_folder
from errors import UserError

# 2 recipes x (cenet with 2 seeds + backbone with 1) = 6 tiny CPU runs.
TOY = ["--models", "cenet,backbone", "--recipes", "faithful,hires", "--seeds", "1", "--seeds-main", "2",
       "--image-size", "64", "--batch-size", "2", "--epochs", "1", "--pretrained", "none", "--device", "cpu"]
ROWS = {("faithful", "cenet"): 2, ("faithful", "backbone"): 1, ("hires", "cenet"): 2, ("hires", "backbone"): 1}
METRIC_COLUMNS = [f"{group} {name}" for group in ("FOV", "whole") for name in ("AUC", "Acc", "Sen", "Spe", "F1")]


def run_reproduce(args):
    """reproduce.main in this process (what `python reproduce.py ARGS` runs); returns what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        reproduce.main([str(arg) for arg in args])
    return printed.getvalue()


@pytest.fixture(scope="module")
def table(small_drive, tmp_path_factory):
    """The toy table, written by one call and then asked for again (which must skip everything)."""
    with module_folder(tmp_path_factory, "repro") as work:
        args = [*TOY, "--data-root", small_drive, "--weights-dir", work / "weights", "--out", work / "results"]
        first = run_reproduce(args)
        report_after_first = (work / "results" / "drive.json").read_text()
        second = run_reproduce(args)
        out = work / "results"
        yield {"work": work, "out": out, "first": first, "second": second, "first_json": report_after_first,
               "json": json.loads((out / "drive.json").read_text()), "md": (out / "drive.md").read_text()}


def markdown_rows(md):
    """{(recipe, model): {column: cell}} from the main table of drive.md."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| recipe | model | seeds |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|"))))
        model = re.search(r"`(\w+)`", cells["model"]).group(1)
        rows[(cells["recipe"], model)] = cells
    return header, rows


def by_hand(values):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((value - mean) ** 2 for value in values) / (n - 1)) if n > 1 else None
    return mean, std


def test_one_row_per_recipe_and_model_with_all_columns(table):
    report = table["json"]
    assert {(row["recipe"], row["model"]): row["n"] for row in report["rows"]} == ROWS
    assert len(report["runs"]) == 6
    header, rows = markdown_rows(table["md"])
    for column in ["seeds", *METRIC_COLUMNS, "paper AUC", "paper Acc", "paper Sen", "encoder"]:
        assert column in header, column
    assert set(rows) == set(ROWS)
    for key, cells in rows.items():
        assert cells["seeds"] == str(ROWS[key])
        assert cells["encoder"] == "scratch"  # --pretrained none, said beside the numbers
        for column in METRIC_COLUMNS:
            assert 0.0 <= float(cells[column].split(" ± ")[0]) <= 1.0, (key, column)
    for row in report["rows"]:
        for column in METRIC_COLUMNS:
            assert 0.0 <= row["metrics"][column]["mean"] <= 1.0


def test_rows_are_mean_and_std_over_seeds_of_the_recorded_runs(table):
    report, (_, md_rows) = table["json"], markdown_rows(table["md"])
    for row in report["rows"]:
        runs = [run for run in report["runs"] if (run["recipe"], run["model"]) == (row["recipe"], row["model"])]
        assert sorted(run["seed"] for run in runs) == row["seeds"] == list(range(row["n"]))
        for column in METRIC_COLUMNS:
            mean, std = by_hand([run["metrics"][column] for run in runs])
            assert row["metrics"][column]["mean"] == pytest.approx(mean, abs=1e-12)
            cell = md_rows[(row["recipe"], row["model"])][column]
            if std is None:
                assert row["metrics"][column]["std"] is None and cell == f"{mean:.4f}"
            else:
                assert row["metrics"][column]["std"] == pytest.approx(std, abs=1e-12)
                assert cell == f"{mean:.4f} ± {std:.4f}"


def test_each_run_is_the_mean_over_test_images_of_test_py(table):
    for run in table["json"]["runs"]:
        assert run["run"] == f"repro_{run['recipe']}_{run['model']}_s{run['seed']}"
        assert Path(run["checkpoint"]).is_file()
        per_image = json.loads((Path(run["eval_dir"]) / "metrics.json").read_text())["per_image"]
        assert set(per_image) == {"01", "02"} and run["images"] == 2
        for column in METRIC_COLUMNS:
            assert run["metrics"][column] == pytest.approx(sum(row[column] for row in per_image.values()) / 2)
        assert run["steps"] == 1 and run["settings"]["IMAGE_SIZE"] == 64 and run["settings"]["EPOCHS"] == 1
    # The command line beat the recipe: hires asked for 576 px and 1000 epochs, --image-size 64 --epochs 1 won.
    assert table["json"]["recipes"]["hires"]["IMAGE_SIZE"] == 576


def test_paper_numbers_sit_beside_cenet_and_nothing_is_invented(table):
    _, rows = markdown_rows(table["md"])
    for recipe in ("faithful", "hires"):
        cenet, backbone = rows[(recipe, "cenet")], rows[(recipe, "backbone")]
        assert (cenet["paper AUC"], cenet["paper Acc"], cenet["paper Sen"]) == ("0.9779", "0.9545", "0.8309")
        assert (backbone["paper AUC"], backbone["paper Acc"], backbone["paper Sen"]) == ("n/a", "n/a", "n/a")
    md = table["md"]
    assert "Table II" in md and "Table VI" in md and "0.9819" in md and "0.9829" in md and "0.8607" in md


def test_protocol_is_spelled_out(table):
    md = table["md"]
    for phrase in ("1st manual annotator", "Threshold", "Test-time augmentation", "train/test size (px)",
                   "SGD", "Machine: CPU", "Wall time", "trained from scratch", "| steps | 1 | 1 |"):
        assert phrase in md, phrase
    assert re.search(r"Git commit: `([0-9a-f]{40}(\+dirty)?|unknown)`", md)
    assert "python reproduce.py --models cenet,backbone --recipes faithful,hires" in md


def test_second_call_skips_every_finished_run(table):
    first, second = table["first"], table["second"]
    assert first.count("] run ") == 6 and "ETA" in first and "[6/6] done" in first
    assert second.count("] skip ") == 6 and "] run " not in second
    assert "0 to run" in second
    assert json.loads(table["first_json"])["runs"] == table["json"]["runs"]
    assert not list((table["work"] / "weights").glob("*-2"))  # nothing trained twice


def test_best_cenet_figures_are_copied_and_linked(table):
    report, out = table["json"], table["out"]
    cenet_runs = [run for run in report["runs"] if run["model"] == "cenet"]
    best = max(cenet_runs, key=lambda run: run["metrics"]["FOV AUC"])
    figures = report["figures"]
    assert figures["run"] == best["run"] and len(figures["files"]) == 3
    assert figures["files"][0].endswith("_roc.png")
    assert all(name.endswith("_overlay.png") for name in figures["files"][1:])
    for name in figures["files"]:
        assert (out / name).stat().st_size > 0
        assert f"]({name})" in table["md"]


@pytest.mark.parametrize("args, pattern", [
    (["--models", "cenet,nope"], "unknown model 'nope'"),
    (["--recipes", "faithful,fast"], "unknown recipe 'fast'"),
    (["--model", "unet"], "--models"),
    (["--seeds", "0"], "at least 1"),
    (["--table", "stare"], "unknown table"),
    (["--image-size", "100"], "multiple of 32"),
])
def test_bad_input_is_a_user_error(args, pattern, tmp_path):
    """Each is a UserError, which cli.run prints as one `error:` line (tests/test_scripts.py checks that)."""
    with pytest.raises(UserError) as caught:
        reproduce.main(["--dry-run", "--out", str(tmp_path), *args])
    assert pattern in str(caught.value)


def test_dry_run_plans_the_full_table_without_running(tmp_path):
    printed = run_reproduce(["--dry-run", "--out", tmp_path])
    # 2 recipes x (6 ablation models x 3 seeds + cenet and unet x 5 seeds)
    assert "plan: 56 runs" in printed and "estimate on one H200" in printed
    assert printed.count("faithful/cenet seed") == 5 and printed.count("faithful/backbone_rmp seed") == 3
    assert "hires/unet seed 4: 576px images, 1000 epochs" in printed
    assert not list(tmp_path.iterdir())


def test_dry_run_of_a_crop_recipe_names_its_crops(tmp_path):
    printed = run_reproduce(["--dry-run", "--out", tmp_path, "--table", "drive_ablation_cpu", "--recipes", "cpu",
                             "--models", "cenet", "--seeds-main", "1"])
    assert "cpu/cenet seed 0: random 256px crops, 280 epochs, loss dice_bce (to run)" in printed


# --- in-process: the arithmetic and bookkeeping, on hand-made numbers ------------------------------------

def record(recipe, model, seed, auc, acc, epochs=300):
    metrics = {column: 0.5 for column in METRIC_COLUMNS}
    metrics.update({"FOV AUC": auc, "FOV Acc": acc})
    return {"recipe": recipe, "model": model, "seed": seed, "run": f"r{seed}", "metrics": metrics,
            "pretrained": "encoder: random initialisation (ImageNet weights unavailable)", "steps": 900,
            "wall_seconds": 10.0, "settings": {"EPOCHS": epochs}, "eval_dir": "/nonexistent"}


def test_aggregate_by_hand():
    records = [record("faithful", "cenet", 0, 0.97, 0.95), record("faithful", "cenet", 1, 0.98, 0.96),
               record("faithful", "cenet", 2, 0.96, 0.94), record("faithful", "unet", 0, 0.90, 0.93),
               record("hires", "cenet", 0, 0.99, 0.97)]
    rows = {(row["recipe"], row["model"]): row for row in tables.aggregate(records)}
    assert list(rows) == [("faithful", "cenet"), ("faithful", "unet"), ("hires", "cenet")]
    cenet = rows[("faithful", "cenet")]
    # mean (0.97 + 0.98 + 0.96) / 3 = 0.97; deviations 0, 0.01, -0.01 -> sqrt(0.0002 / 2) = 0.01
    assert cenet["n"] == 3 and cenet["seeds"] == [0, 1, 2]
    assert cenet["metrics"]["FOV AUC"]["mean"] == pytest.approx(0.97)
    assert cenet["metrics"]["FOV AUC"]["std"] == pytest.approx(0.01)
    assert cenet["metrics"]["FOV Acc"]["mean"] == pytest.approx(0.95)
    assert cenet["metrics"]["FOV Acc"]["std"] == pytest.approx(0.01)
    assert cenet["metrics"]["whole Sen"] == {"mean": 0.5, "std": 0.0}
    assert cenet["encoder"] == "scratch" and cenet["wall_seconds"] == 30.0
    single = rows[("faithful", "unet")]["metrics"]["FOV AUC"]
    assert single == {"mean": pytest.approx(0.90), "std": None}  # one seed: no spread to claim
    assert tables.cell(cenet["metrics"]["FOV AUC"]) == "0.9700 ± 0.0100"
    assert tables.cell(single) == "0.9000"
    assert tables.mean_std([None, 0.2, 0.4]) == {"mean": pytest.approx(0.3), "std": pytest.approx(math.sqrt(0.02))}


def test_merge_replaces_a_seed_and_never_mixes_settings_in_a_row():
    records = [record("faithful", "cenet", 0, 0.97, 0.95), record("faithful", "cenet", 1, 0.98, 0.96),
               record("faithful", "unet", 0, 0.90, 0.93)]
    merged, dropped = tables.merge(records, record("faithful", "cenet", 1, 0.99, 0.97))
    assert [r["metrics"]["FOV AUC"] for r in merged if r["model"] == "cenet"] == [0.97, 0.99] and len(dropped) == 1
    merged, dropped = tables.merge(merged, record("faithful", "cenet", 0, 0.5, 0.5, epochs=1))
    assert [(r["model"], r["seed"]) for r in merged] == [("unet", 0), ("cenet", 0)]
    assert len(dropped) == 2


def test_command_line_beats_recipe_and_names_each_run():
    import argparse

    import cli
    parser = cli.add_constant_flags(argparse.ArgumentParser())
    base, given = cli.settings_from(parser.parse_args(["--image-size", "64"]))
    hires = reproduce.run_settings(base, given, "hires", "unet", 3)
    assert hires["IMAGE_SIZE"] == 64 and hires["EPOCHS"] == 1000 and hires["LOSS"] == "dice"
    assert hires["RUN_NAME"] == "repro_hires_unet_s3" and hires["SEED"] == 3 and hires["MODEL"] == "unet"
    plain = reproduce.run_settings(*cli.settings_from(parser.parse_args([])), "hires", "cenet", 0)
    assert plain["IMAGE_SIZE"] == 576 and plain["VISDOM"] is False
    assert "MODEL" not in reproduce.experiment(plain) and "DEVICE" not in reproduce.experiment(plain)
    assert reproduce.experiment(plain)["EPOCHS"] == 1000


def test_runs_go_seed_by_seed_so_a_stopped_study_covers_every_model():
    import argparse

    import cli
    base, given = cli.settings_from(cli.add_constant_flags(argparse.ArgumentParser()).parse_args([]))
    runs = reproduce.plan(base, given, ["cpu"], ["cenet", "backbone", "unet"], seeds=1, seeds_main=2)
    assert [(model, seed) for _, model, seed, _ in runs] == [("cenet", 0), ("backbone", 0), ("unet", 0),
                                                             ("cenet", 1), ("unet", 1)]


def test_each_record_keeps_per_image_figures_and_precision(table):
    for run in table["json"]["runs"]:
        written = json.loads((Path(run["eval_dir"]) / "metrics.json").read_text())
        assert run["per_image"] == written["per_image"]
        assert run["train_precision"] == run["eval_precision"] == written["protocol"]["precision"]


def test_a_run_stopped_part_way_continues_from_its_resume_point(small_drive, tmp_path):
    """A study killed mid-run (a session's end, a cluster's limit) leaves weights/<run>/last.pth; the next call
    continues that run in the same folder, and ends with the weights of a run that was never stopped."""
    import torch

    import framework

    def toy(where):
        return ["--models", "backbone", "--recipes", "faithful", "--seeds", "1", "--image-size", "64",
                "--batch-size", "2", "--epochs", "2", "--pretrained", "none", "--device", "cpu",
                "--checkpoint-every", "1", "--checkpoint-min-seconds", "0", "--data-root", small_drive, "--weights-dir", where / "weights",
                "--out", where / "results"]

    original_step = framework.Trainer.step

    def killed_in_step_two(self):
        if self.step_count == 1:  # step 1 is done and its resume point written
            raise KeyboardInterrupt
        return original_step(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(framework.Trainer, "step", killed_in_step_two)
        with pytest.raises(KeyboardInterrupt):
            run_reproduce(toy(tmp_path / "stopped"))
    run_dir = tmp_path / "stopped" / "weights" / "repro_faithful_backbone_s0"
    assert (run_dir / "last.pth").is_file() and not (run_dir / "final.pth").exists()

    printed = run_reproduce(toy(tmp_path / "stopped"))
    assert "continuing repro_faithful_backbone_s0" in printed
    assert not (run_dir.parent / "repro_faithful_backbone_s0-2").exists()
    run_reproduce(toy(tmp_path / "straight"))
    continued = torch.load(run_dir / "final.pth", weights_only=True)
    straight = torch.load(tmp_path / "straight" / "weights" / "repro_faithful_backbone_s0" / "final.pth",
                          weights_only=True)
    assert continued["step"] == straight["step"] == 2
    for name, value in straight["state_dict"].items():
        assert torch.equal(continued["state_dict"][name], value), name
    record = json.loads((tmp_path / "stopped" / "results" / "drive.json").read_text())["runs"][0]
    assert record["train_seconds"] == pytest.approx(continued["train_seconds"], abs=0.1)


def test_an_unfinished_run_with_other_settings_is_left_alone(tmp_path, capsys):
    import torch
    run_dir = tmp_path / "repro_faithful_backbone_s0"
    run_dir.mkdir()
    settings = {"WEIGHTS_DIR": str(tmp_path), "RUN_NAME": run_dir.name, "EPOCHS": 2, "MODEL": "backbone"}
    torch.save({"settings": {**settings, "EPOCHS": 3}}, run_dir / "last.pth")
    assert reproduce.unfinished_run(settings) is None
    assert "EPOCHS 3 -> 2" in capsys.readouterr().out
    torch.save({"settings": {**settings, "DEVICE": "cuda"}}, run_dir / "last.pth")  # the machine may differ
    assert reproduce.unfinished_run(settings) == run_dir / "last.pth"


def test_a_setting_added_later_matches_its_default():
    """A run recorded before a setting existed ran as its default; it stays recorded under the new code."""
    import constants
    old = {"EPOCHS": 280, "LOSS": "dice_bce"}
    assert tables.same_settings(old, {**old, "SPLIT": constants.SPLIT})
    assert not tables.same_settings(old, {**old, "SPLIT": "all"})
    assert not tables.same_settings(old, {**old, "EPOCHS": 281})
