"""Reproduce the paper's DRIVE table: CE-Net, Backbone, every ablation and U-Net, several seeds, one command.

    python reproduce.py --table drive                        # every model, recipes faithful + hires
    python reproduce.py --recipes faithful --models cenet,unet --seeds-main 5
    python reproduce.py --dry-run                            # the plan and a rough GPU-time estimate only
    python reproduce.py --image-size 64 --epochs 1 --device cpu --out /tmp/r   # a tiny CPU smoke run

Each run is main.train -> test.evaluate in this process, named repro_<recipe>_<model>_s<seed> under
WEIGHTS_DIR and the results folder (an existing name gets a -2 suffix, nothing is overwritten). After
every run <out>/<table>.json (each run's numbers) and <out>/<table>.md (mean ± std over seeds, the
paper's numbers beside them, the protocol, figures of the best CE-Net run) are rewritten, so an
interrupted job loses at most the run in progress, and the next call skips every run already recorded
with the same settings (--fresh runs them again). Any constants.py flag (--image-size, --epochs,
--device, --data-root, ...) applies on top of every recipe.
"""
import argparse
import datetime
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import cli

REPO = Path(__file__).resolve().parent

# --- what to run (command line: --table, --recipes, --models, --seeds, --seeds-main, --out, --fresh) ----
TABLE = "drive"
RUN_RECIPES = "faithful,hires"
MODELS = ("cenet,backbone,backbone_dac,backbone_dac_noatrous,backbone_rmp,backbone_inception,"
          "backbone_inception_res,unet")
SEEDS = 3                      # seeds per ablation model: enough for a spread, affordable for six models
SEEDS_MAIN = 5                 # seeds for the headline pair, where the paper's claim rests on a small gap
MAIN_MODELS = ("cenet", "unet")
OUT = "results"
FRESH = False

# --- recipes: overrides of constants.py, applied under any command-line constant --------------------------
RECIPES = {
    "faithful": {},
    "hires": {"IMAGE_SIZE": 576, "EPOCHS": 1000},
    "hires_dice_bce": {"IMAGE_SIZE": 576, "EPOCHS": 1000, "LOSS": "dice_bce"},
}
RECIPE_WHY = {
    "faithful": "constants.py as shipped, i.e. the paper: 448x448, 300 epochs (900 steps of batch 8 on the "
                "20 training images), SGD momentum 0.9, poly LR from 4e-3, Dice loss.",
    "hires": "DRIVE images are 565x584; 448 shrinks them by about 0.78 and the 1-2 px capillaries fall below a "
             "pixel. 576, the nearest multiple of 32 above native, resizes by 1.02/0.99 instead. Where the encoder "
             "has to start from random weights (no ImageNet download, as where this was written), 900 steps "
             "is short: 1000 epochs = 3000 steps. Loss unchanged (Dice).",
    "hires_dice_bce": "hires plus a BCE term beside Dice. Dice alone drives probabilities to 0/1, which ranks "
                      "pixels coarsely and can cost AUC; the BCE term keeps per-pixel probabilities "
                      "calibrated. Its own recipe, so each change is measured alone.",
}
# A table of dozens of runs should not wait on, or flood, a visdom server; --visdom true brings it back.
BATCH_DEFAULTS = {"VISDOM": False}

# --- what each table is -----------------------------------------------------------------------------------
TABLES = {"drive": {"dataset": "drive", "title": "DRIVE retinal vessel segmentation"}}
METRICS = ("AUC", "Acc", "Sen", "Spe", "F1")
GROUPS = ("FOV", "whole")
PAPER_METRICS = ("AUC", "Acc", "Sen")

# The paper's numbers, only where a source was checked. Table VI (ablations on DRIVE) could not be
# retrieved from a verifiable source when this was written, so those rows stay n/a instead of
# numbers from memory.
PAPER = {
    "drive": {
        "cenet": {"AUC": 0.9779, "Acc": 0.9545, "Sen": 0.8309,
                  "source": "Gu et al., CE-Net, IEEE TMI 2019, Table II (DRIVE)"},
    },
}
PAPER_NOTES = {
    "drive": [
        "Paper, Table II: CE-Net on DRIVE Sen 0.8309, Acc 0.9545, AUC 0.9779 (ImageNet-pretrained ResNet-34 "
        "encoder). The paper does not say, in the text checked, whether these are inside the FOV mask or over "
        "the whole image; compare with both groups.",
        "Paper, Table VI (ablation on DRIVE: Backbone, +DAC, +DAC w/o atrous, +RMP, +Inception, "
        "+Inception-ResNet): not found in any source we could verify while writing reproduce.py, so those "
        "cells read n/a. Fill in PAPER in reproduce.py from the paper itself if you have it.",
        "Authors' README (github.com/Guzaiwang/CE-Net): the released CE-Net model \"achieves 0.9819 in the AUC\" "
        "on DRIVE (one checkpoint, protocol not stated).",
        "U-Net as reported by users of the authors' code (github.com/Guzaiwang/CE-Net issue #15): Sen 0.8607, "
        "Acc 0.9574, AUC 0.9829 (2020-08-10) and Sen 0.844, Acc 0.956, AUC 0.98 (2020-01-11), i.e. above the "
        "paper's CE-Net.",
    ],
}

# Settings that name a run or describe the machine, not the experiment: they may differ between a
# recorded run and a new one without making the recorded numbers stale.
PER_RUN_KEYS = {"MODEL", "SEED", "RUN_NAME"}
MACHINE_KEYS = {"DEVICE", "AMP", "CHANNELS_LAST", "COMPILE", "DATA_ROOT", "WEIGHTS_DIR", "RESULTS_DIR",
                "VISDOM", "VISDOM_SERVER", "VISDOM_PORT", "LOG_EVERY"}

# Planning numbers for the printed estimate, not measurements: ~1000 training images/s for CE-Net at
# 448 px on one H100 (bf16), scaling with pixel count, plus ~15 s a run for start-up, TTA evaluation
# and pictures. DRIVE has 20 training images.
GPU_IMAGES_PER_SECOND_AT_448 = 1000
RUN_OVERHEAD_SECONDS = 15
TRAIN_IMAGES = {"drive": 20}


# ------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", default=TABLE, help=f"which table (default {TABLE}; one of {', '.join(TABLES)})")
    parser.add_argument("--recipes", default=RUN_RECIPES,
                        help=f"comma-separated, or 'all' (default {RUN_RECIPES}; known: {', '.join(RECIPES)})")
    parser.add_argument("--models", default=MODELS, help="comma-separated model names, or 'all' (default: all)")
    parser.add_argument("--seeds", type=int, default=SEEDS, help=f"seeds per ablation model (default {SEEDS})")
    parser.add_argument("--seeds-main", type=int, default=SEEDS_MAIN,
                        help=f"seeds for {', '.join(MAIN_MODELS)} (default {SEEDS_MAIN})")
    parser.add_argument("--out", default=OUT, help=f"folder for <table>.json, <table>.md, figures/ (default {OUT})")
    parser.add_argument("--fresh", action="store_true", default=FRESH,
                        help="run again even the runs already recorded in <out>/<table>.json")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and an estimate, run nothing")
    cli.add_constant_flags(parser)
    args = parser.parse_args(argv)
    return args, cli.settings_from(args)


def pick(text, known, what):
    """'a,b' -> ['a', 'b'] checked against `known` (order kept, duplicates dropped); 'all' -> known."""
    if text.strip() == "all":
        return list(known)
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise cli.UserError(f"unknown {what} {', '.join(map(repr, unknown)) or '(none given)'}; "
                            f"choose from: {', '.join(known)}")
    return names


def check_args(args, base):
    """The chosen recipes and models; every contradiction is one UserError before anything runs."""
    import networks
    if args.table not in TABLES:
        raise cli.UserError(f"unknown table {args.table!r}; choose one of: {', '.join(TABLES)}")
    overridden = set(base["_OVERRIDDEN"])
    if "MODEL" in overridden:
        raise cli.UserError("--model does not apply to reproduce.py; choose models with --models a,b")
    if "RUN_NAME" in overridden:
        raise cli.UserError("--run-name does not apply to reproduce.py; "
                            "it names every run repro_<recipe>_<model>_s<seed>")
    dataset = TABLES[args.table]["dataset"]
    if base["DATASET"] != dataset:
        raise cli.UserError(f"table {args.table!r} is on dataset {dataset!r}, not --dataset {base['DATASET']}")
    if args.seeds < 1 or args.seeds_main < 1:
        raise cli.UserError(f"--seeds and --seeds-main must be at least 1 (got {args.seeds}, {args.seeds_main})")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise cli.UserError("run reproduce.py as one plain python process, not under torchrun")
    recipes = pick(args.recipes, list(RECIPES), "recipe")
    models = pick(args.models, list(networks.MODELS), "model")
    return recipes, models


# ------------------------------------------------------------------------------------------------------
# Plan
# ------------------------------------------------------------------------------------------------------

def run_settings(base, recipe, model, seed):
    """constants.py, then batch defaults and the recipe, then the command line on top, then the run's name."""
    overridden = set(base["_OVERRIDDEN"])
    settings = dict(base)
    for key, value in {**BATCH_DEFAULTS, **RECIPES[recipe]}.items():
        if key not in overridden:
            settings[key] = value
    settings.update(MODEL=model, SEED=seed, RUN_NAME=f"repro_{recipe}_{model}_s{seed}")
    # Everything counts as given, so test.evaluate keeps exactly these settings over the checkpoint's.
    settings["_OVERRIDDEN"] = sorted(key for key in settings if not key.startswith("_"))
    return settings


def experiment(settings):
    """The settings that decide a run's numbers (not its name, not the machine)."""
    return {key: value for key, value in settings.items()
            if not key.startswith("_") and key not in PER_RUN_KEYS | MACHINE_KEYS}


def plan(base, recipes, models, seeds, seeds_main):
    """[(recipe, model, seed, settings)]; seeds count up from SEED (0 unless --seed says otherwise)."""
    runs = []
    for recipe in recipes:
        for model in models:
            count = seeds_main if model in MAIN_MODELS else seeds
            for seed in range(base["SEED"], base["SEED"] + count):
                runs.append((recipe, model, seed, run_settings(base, recipe, model, seed)))
    return runs


def find_record(records, recipe, model, seed):
    return next((record for record in records
                 if (record["recipe"], record["model"], record["seed"]) == (recipe, model, seed)), None)


def differences(old, new):
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in keys if old.get(key) != new.get(key))


def merge(records, new):
    """Add `new`; drop the record it replaces and every run of its row (recipe, model) made with other
    settings, so a row never mixes two configurations. Returns (records, dropped)."""
    kept, dropped = [], []
    for record in records:
        same_row = (record["recipe"], record["model"]) == (new["recipe"], new["model"])
        if same_row and (record["seed"] == new["seed"] or record["settings"] != new["settings"]):
            dropped.append(record)
        else:
            kept.append(record)
    return kept + [new], dropped


def estimate_seconds(settings, dataset):
    """Rough H100 wall time of one run (see GPU_IMAGES_PER_SECOND_AT_448): an estimate, never a measurement."""
    import data
    steps = data.steps_for(TRAIN_IMAGES.get(dataset, 20), settings["BATCH_SIZE"], settings["EPOCHS"])
    rate = GPU_IMAGES_PER_SECOND_AT_448 * (448 / settings["IMAGE_SIZE"]) ** 2
    return steps * settings["BATCH_SIZE"] / rate + RUN_OVERHEAD_SECONDS


def duration(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# ------------------------------------------------------------------------------------------------------
# One run
# ------------------------------------------------------------------------------------------------------

def git_commit():
    """HEAD's hash, with '+dirty' when tracked files differ from it; 'unknown' outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=20)
        if head.returncode:
            return "unknown"
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True, timeout=20)
        return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_name(device):
    import torch
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"CPU {platform.machine()} x{os.cpu_count()} (torch {torch.__version__})"


def finite(value):
    """JSON has no NaN: an undefined metric (e.g. Sen of an image without vessels) is stored as null."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def run_one(recipe, model, seed, settings, results_dir, context):
    """Train, evaluate, and return the run's record (what <table>.json keeps)."""
    import main as trainer
    import test as evaluator
    start = time.perf_counter()
    run_dir = trainer.train(settings)
    trained = time.perf_counter()
    summary, eval_dir, _ = evaluator.evaluate(run_dir / "final.pth", settings, out_dir=Path(results_dir) / run_dir.name)
    finished = time.perf_counter()
    report = json.loads((eval_dir / "metrics.json").read_text())
    protocol = report["protocol"]
    return {
        "recipe": recipe, "model": model, "seed": seed, "run": run_dir.name,
        "checkpoint": str(run_dir / "final.pth"), "eval_dir": str(eval_dir),
        # Per run: the mean over the test images (and their spread, for reference).
        "metrics": {name: finite(value["mean"]) for name, value in summary.items()},
        "image_std": {name: finite(value["std"]) for name, value in summary.items()},
        "images": len(report["per_image"]),
        "steps": protocol["train_steps"], "pretrained": protocol["pretrained"],
        "image_size": protocol["image_size"], "tta": protocol["tta"], "threshold": protocol["threshold"],
        "device": protocol["device"], "machine": context["machine"],
        "train_seconds": round(trained - start, 1), "eval_seconds": round(finished - trained, 1),
        "wall_seconds": round(finished - start, 1),
        "settings": experiment(settings),
        "git_commit": context["commit"], "command": context["command"],
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
    }


# ------------------------------------------------------------------------------------------------------
# Aggregation
# ------------------------------------------------------------------------------------------------------

def mean_std(values):
    """Mean and sample standard deviation (n - 1) over seeds; std is None for a single seed (no spread)."""
    values = [value for value in values if value is not None]
    if not values:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def encoder_label(status):
    """What the encoder really started from, read from the checkpoint's status line."""
    text = (status or "").lower()
    if "no pretrained encoder" in text:
        return "scratch (no encoder to pretrain)"
    if "random" in text:
        return "scratch"
    if "imagenet" in text and "loaded" in text:
        return "ImageNet"
    if "loaded" in text:
        return "pretrained file"
    return "unknown"


def row_order(key):
    import networks
    recipe, model = key
    recipes, models = list(RECIPES), list(networks.MODELS)
    return (recipes.index(recipe) if recipe in recipes else len(recipes), recipe,
            models.index(model) if model in models else len(models), model)


def aggregate(records):
    """One row per (recipe, model): mean ± std over seeds of each run's mean over the test images."""
    import networks
    groups = {}
    for record in records:
        groups.setdefault((record["recipe"], record["model"]), []).append(record)
    rows = []
    for key in sorted(groups, key=row_order):
        runs = sorted(groups[key], key=lambda record: record["seed"])
        names = list(dict.fromkeys(name for run in runs for name in run["metrics"]))
        encoders = sorted({encoder_label(run.get("pretrained")) for run in runs})
        rows.append({
            "recipe": key[0], "model": key[1], "title": networks.MODEL_TITLES.get(key[1], key[1]),
            "n": len(runs), "seeds": [run["seed"] for run in runs],
            "metrics": {name: mean_std([run["metrics"].get(name) for run in runs]) for name in names},
            "encoder": encoders[0] if len(encoders) == 1 else "mixed: " + " / ".join(encoders),
            "steps": sorted({run.get("steps") for run in runs}, key=str),
            "wall_seconds": round(sum(run.get("wall_seconds") or 0 for run in runs), 1),
        })
    return rows


# ------------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------------

def best_cenet(records):
    """The CE-Net run with the highest FOV AUC whose test.py pictures are still on this disk."""
    candidates = [record for record in records if record["model"] == "cenet"
                  and record["metrics"].get("FOV AUC") is not None
                  and (Path(record["eval_dir"]) / "roc.png").is_file()]
    return max(candidates, key=lambda record: record["metrics"]["FOV AUC"], default=None)


def copy_figures(records, out, table, previous):
    """Copy the best CE-Net run's ROC plot and two overlays into <out>/figures (re-compressed, small)."""
    from PIL import Image
    best = best_cenet(records)
    figures = Path(out) / "figures"
    if best is None:
        # Keep what an earlier call copied while its files are still there (e.g. run dirs on another disk).
        if previous and all((Path(out) / name).is_file() for name in previous.get("files", [])):
            return previous
        return None
    prefix = f"{table}_best_cenet"
    if previous and previous.get("run") == best["run"] and all((Path(out) / f).is_file() for f in previous["files"]):
        return previous
    figures.mkdir(parents=True, exist_ok=True)
    for old in figures.glob(f"{prefix}_*.png"):
        old.unlink()
    source = Path(best["eval_dir"])
    picks = [(source / "roc.png", f"{prefix}_roc.png")]
    picks += [(path, f"{prefix}_{path.name}") for path in sorted(source.glob("*_overlay.png"))[:2]]
    files = []
    for path, name in picks:
        with Image.open(path) as picture:
            picture.save(figures / name, optimize=True)  # test.py writes fast, large PNGs; these live in git
        files.append(f"figures/{name}")
    return {"run": best["run"], "recipe": best["recipe"], "seed": best["seed"],
            "FOV AUC": best["metrics"]["FOV AUC"], "eval_dir": best["eval_dir"], "files": files}


# ------------------------------------------------------------------------------------------------------
# Writing the table
# ------------------------------------------------------------------------------------------------------

def cell(stat):
    if stat is None or stat.get("mean") is None:
        return "n/a"
    if stat.get("std") is None:
        return f"{stat['mean']:.4f}"
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}"


def paper_cells(table, model):
    numbers = PAPER.get(table, {}).get(model)
    return [f"{numbers[name]:.4f}" if numbers else "n/a" for name in PAPER_METRICS]


def setting_values(records, key):
    values = list(dict.fromkeys(json.dumps(record["settings"].get(key)) for record in records))
    return " / ".join(json.loads(value) if value.startswith('"') else value for value in values)


def render_markdown(table, rows, records, figures):
    spec = TABLES[table]
    lines = [f"# {spec['title']}: CE-Net vs Backbone vs U-Net vs every ablation", "",
             f"Written by `reproduce.py` from `{table}.json` ({len(records)} runs, {len(rows)} rows); "
             f"rerun it rather than editing this file.", ""]
    resnet_rows = [row for row in rows if row["model"] != "unet"]
    scratch = [row for row in resnet_rows if row["encoder"] != "ImageNet"]
    if scratch:
        statuses = " ".join(str(record.get("pretrained")) for record in records)
        why = ("ImageNet weights could not be downloaded on the machine that ran them" if "unavailable" in statuses
               else "that is what PRETRAINED asked for")
        which = ("Every ResNet-34 encoder below" if len(scratch) == len(resnet_rows)
                 else "The rows whose `encoder` is not ImageNet")
        lines += [f"**{which} started from random weights, i.e. was trained from scratch ({why}). The paper used an "
                  "ImageNet-pretrained ResNet-34, so these are not the paper's setting; the `encoder` column says "
                  "what each row started from.**", ""]
    images = " / ".join(str(count) for count in sorted({record.get("images") for record in records}, key=str))
    metric_headers = [f"{group} {name}" for group in GROUPS for name in METRICS]
    paper_headers = [f"paper {name}" for name in PAPER_METRICS]
    lines += [f"Mean ± sample std (n − 1) **over seeds** of each run's mean over the {images} test images. "
              "Column groups: **FOV** = inside DRIVE's field-of-view mask (the field's standard); "
              "**whole** = every pixel of the image (the black border counts as easy true negatives). "
              "**paper** = the CE-Net paper's number for that model (see notes; n/a = no checked source).", "",
              "| recipe | model | seeds | " + " | ".join(metric_headers + paper_headers) + " | encoder |",
              "|---|---|---|" + "---|" * (len(metric_headers) + len(paper_headers)) + "---|"]
    for row in rows:
        cells = [cell(row["metrics"].get(name)) for name in metric_headers] + paper_cells(table, row["model"])
        lines.append(f"| {row['recipe']} | {row['title']} (`{row['model']}`) | {row['n']} | "
                     + " | ".join(cells) + f" | {row['encoder']} |")
    lines += ["", "Notes on the reference numbers:", ""]
    lines += [f"{number}. {note}" for number, note in enumerate(PAPER_NOTES.get(table, []), 1)]

    if figures:
        lines += ["", "## Best CE-Net run", "",
                  f"`{figures['run']}` (recipe {figures['recipe']}, seed {figures['seed']}, FOV AUC "
                  f"{figures['FOV AUC']:.4f}); all of its test.py outputs are in `{figures['eval_dir']}`. "
                  "Overlays: white = vessel found, red = false positive, blue = vessel missed.", ""]
        lines += [f"![{Path(name).stem}]({name})" for name in figures["files"]]

    recipes = list(dict.fromkeys(row["recipe"] for row in rows))
    by_recipe = {recipe: [record for record in records if record["recipe"] == recipe] for recipe in recipes}
    lines += ["", "## Protocol", "",
              "- Data: DRIVE, the 20 `training/` images to train, the 20 `test/` images to test, labels of the "
              "**1st manual annotator** (`1st_manual/`), FOV masks from `test/mask/`. No validation split and no "
              "model selection: the checkpoint after the last step is the one evaluated.",
              "- Resolution: images are resized (antialiased bilinear) to IMAGE_SIZE x IMAGE_SIZE for training and "
              "testing; predicted probabilities are resized back to the native 565x584 and scored there.",
              "- Test-time augmentation: the 8 flips/transpositions, probabilities averaged (when TTA is true).",
              "- Threshold: a pixel is vessel when its probability > THRESHOLD (Acc, Sen, Spe, F1); AUC is the exact "
              "ROC area, threshold-free.",
              "- Optimiser: SGD with momentum and weight decay, poly LR `lr = LR (1 - step/steps)^POLY_POWER`, "
              "the paper's augmentation (flips, 90-110 % scaling, shift, HSV jitter); one epoch = "
              "ceil(training images / BATCH_SIZE) steps.",
              "- Seeds: a run's seed drives initialisation, batch order and augmentation; each row's seeds count up "
              "from SEED (0 by default) and are listed under *Every run*.",
              "- Pretraining: the `encoder` column is read from each checkpoint (what really happened), PRETRAINED "
              "below is what was asked for.", "",
              "| setting | " + " | ".join(recipes) + " |", "|---|" + "---|" * len(recipes)]
    for key, label in (("IMAGE_SIZE", "train/test size (px)"), ("EPOCHS", "epochs"), ("BATCH_SIZE", "batch"),
                       ("LR", "LR"), ("POLY_POWER", "poly power"), ("MOMENTUM", "momentum"),
                       ("WEIGHT_DECAY", "weight decay"), ("LOSS", "loss"), ("AUGMENT", "augmentation"),
                       ("PRETRAINED", "PRETRAINED asked"), ("TTA", "TTA"), ("THRESHOLD", "threshold")):
        lines.append(f"| {label} | " + " | ".join(setting_values(by_recipe[r], key) for r in recipes) + " |")
    steps = [" / ".join(map(str, sorted({rec.get("steps") for rec in by_recipe[r]}, key=str))) for r in recipes]
    walls = [duration(sum(rec.get("wall_seconds") or 0 for rec in by_recipe[r])) for r in recipes]
    lines += ["| steps | " + " | ".join(steps) + " |", "| runs | " + " | ".join(str(len(by_recipe[r])) for r in recipes)
              + " |", "| wall time, all runs | " + " | ".join(walls) + " |", ""]
    lines += [f"- `{recipe}`: {RECIPE_WHY.get(recipe, 'recipe no longer in reproduce.py')}" for recipe in recipes]
    machines = list(dict.fromkeys(record.get("machine", "unknown") for record in records))
    commits = list(dict.fromkeys(record.get("git_commit", "unknown") for record in records))
    commands = list(dict.fromkeys(record.get("command", "") for record in records))
    lines += ["", f"- Machine: {'; '.join(machines)}.",
              f"- Wall time: {duration(sum(record.get('wall_seconds') or 0 for record in records))} for all "
              f"{len(records)} runs (train + evaluate, one after another).",
              f"- Git commit: {', '.join(f'`{commit}`' for commit in commits)}.",
              "- Command(s) that produced these runs:", ""]
    lines += [f"      {command}" for command in commands]

    lines += ["", "## Every run", "", "| recipe | model | seed | FOV AUC | FOV Acc | FOV Sen | whole AUC | steps | "
              "wall (s) | run |", "|---|---|---|---|---|---|---|---|---|---|"]
    for record in sorted(records, key=lambda rec: (row_order((rec["recipe"], rec["model"])), rec["seed"])):
        values = [record["metrics"].get(name) for name in ("FOV AUC", "FOV Acc", "FOV Sen", "whole AUC")]
        lines.append(f"| {record['recipe']} | {record['model']} | {record['seed']} | "
                     + " | ".join(number(value) for value in values)
                     + f" | {record.get('steps')} | {record.get('wall_seconds')} | `{record['run']}` |")
    return "\n".join(lines) + "\n"


def write_atomic(path, text):
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(text)
    os.replace(temporary, path)  # an interrupted write never leaves half a table behind


def write_outputs(table, out, records, previous_figures):
    rows = aggregate(records)
    figures = copy_figures(records, out, table, previous_figures)
    payload = {
        "table": table, "dataset": TABLES[table]["dataset"],
        "written": datetime.datetime.now().isoformat(timespec="seconds"),
        "aggregation": "rows: mean and sample std (n-1) over seeds of each run's mean over the test images",
        "recipes": {name: RECIPES[name] for name in RECIPES},
        "paper": {"numbers": PAPER.get(table, {}), "notes": PAPER_NOTES.get(table, [])},
        "rows": rows, "figures": figures, "runs": records,
    }
    write_atomic(Path(out) / f"{table}.json", json.dumps(payload, indent=1) + "\n")
    write_atomic(Path(out) / f"{table}.md", render_markdown(table, rows, records, figures))
    return figures


def load_previous(path):
    if not path.is_file():
        return {}
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise cli.UserError(f"{path} is not readable JSON ({error}); move it away to start a new table")
    if not isinstance(previous, dict) or not isinstance(previous.get("runs", []), list):
        raise cli.UserError(f"{path} is not a table written by reproduce.py; move it away to start a new table")
    return previous


# ------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------

def number(value):
    return "n/a" if value is None else f"{value:.4f}"


def say(message):
    print(message, flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    args, base = parse_args(argv)
    recipes, models = check_args(args, base)
    import data
    for recipe in recipes:
        data.check_image_size(run_settings(base, recipe, models[0], 0)["IMAGE_SIZE"])
    table, out = args.table, Path(args.out)
    json_path = out / f"{table}.json"
    previous = load_previous(json_path)
    records = previous.get("runs", [])
    # Per-run test.py folders go beside the table unless --results-dir says otherwise.
    results_dir = Path(base["RESULTS_DIR"]) if "RESULTS_DIR" in base["_OVERRIDDEN"] else out

    runs = plan(base, recipes, models, args.seeds, args.seeds_main)
    todo = []
    for recipe, model, seed, settings in runs:
        recorded = find_record(records, recipe, model, seed)
        if args.fresh or recorded is None or recorded["settings"] != experiment(settings):
            todo.append((recipe, model, seed))
    estimate = sum(estimate_seconds(settings, TABLES[table]["dataset"]) for recipe, model, seed, settings in runs
                   if (recipe, model, seed) in todo)
    say(f"plan: {len(runs)} runs ({len(recipes)} recipes x {len(models)} models x seeds), {len(todo)} to run, "
        f"{len(runs) - len(todo)} already in {json_path}; rough H100 estimate for those to run: {duration(estimate)} "
        f"(assumes ~{GPU_IMAGES_PER_SECOND_AT_448} img/s at 448 px + {RUN_OVERHEAD_SECONDS}s a run; not measured)")
    if args.dry_run:
        for index, (recipe, model, seed, settings) in enumerate(runs, 1):
            state = "to run" if (recipe, model, seed) in todo else "recorded"
            say(f"[{index}/{len(runs)}] {recipe}/{model} seed {seed}: {settings['IMAGE_SIZE']}px, "
                f"{settings['EPOCHS']} epochs, loss {settings['LOSS']} ({state})")
        return
    if not todo and not records:
        return

    import framework
    device = framework.select_device(base["DEVICE"])
    context = {"machine": machine_name(device), "commit": git_commit(),
               "command": "python reproduce.py " + shlex.join(argv)}
    out.mkdir(parents=True, exist_ok=True)
    figures = previous.get("figures")
    spent, finished = 0.0, 0
    for index, (recipe, model, seed, settings) in enumerate(runs, 1):
        label = f"{recipe}/{model} seed {seed}"
        if (recipe, model, seed) not in todo:
            auc = find_record(records, recipe, model, seed)["metrics"].get("FOV AUC")
            say(f"[{index}/{len(runs)}] skip {label}: already in {json_path} (FOV AUC {number(auc)}); "
                f"--fresh runs it again")
            continue
        recorded = find_record(records, recipe, model, seed)
        if recorded is not None and not args.fresh:
            changed = differences(recorded["settings"], experiment(settings))
            say(f"notice: {label} was recorded with other settings ({changed}); running it again")
        left = len(todo) - finished
        eta = f"ETA {duration(spent / finished * left)}" if finished else "ETA after the first run"
        say(f"[{index}/{len(runs)}] run {label} ({finished + 1} of {len(todo)} to run, {eta})")
        record = run_one(recipe, model, seed, settings, results_dir, context)
        records, dropped = merge(records, record)
        stale = [old for old in dropped if old["seed"] != seed]
        if stale:
            say(f"notice: dropped {len(stale)} older {recipe}/{model} runs made with other settings "
                f"(seeds {', '.join(str(old['seed']) for old in stale)}) so the row does not mix them")
        figures = write_outputs(table, out, records, figures)
        spent += record["wall_seconds"]
        finished += 1
        say(f"[{index}/{len(runs)}] done {label} in {duration(record['wall_seconds'])}: " + ", ".join(
            f"{name} {number(record['metrics'].get(name))}" for name in ("FOV AUC", "FOV Acc", "FOV Sen")))
        release_memory()
    if not finished:
        figures = write_outputs(table, out, records, figures)  # the script may be newer than the table
    say(f"wrote {json_path} and {out / f'{table}.md'} ({len(records)} runs; {finished} new in {duration(spent)})")


def release_memory():
    """Return the finished run's GPU memory before the next model is built."""
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    cli.run(main)
