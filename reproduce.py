"""Reproduce the paper's DRIVE table: CE-Net, Backbone, every ablation and U-Net, several seeds, one command.

    python reproduce.py --table drive                        # every model, recipes faithful + hires
    python reproduce.py --recipes faithful --models cenet,unet --seeds-main 5
    python reproduce.py --dry-run                            # the plan and a rough GPU-time estimate only
    python reproduce.py --image-size 64 --epochs 1 --device cpu --out /tmp/r   # a tiny CPU smoke run
    python reproduce.py --table drive_ablation_cpu --recipes cpu --models cenet,backbone,backbone_dac,\
        backbone_dac_noatrous,backbone_rmp,backbone_inception,backbone_inception_res --seeds 3 --seeds-main 3 \
        --data-root ../shared/DRIVE                  # the paper's Table VI with the cpu recipe

Each run is training.train -> evaluation.evaluate in this process (as main.py then test.py), named repro_<recipe>_<model>_s<seed> under
WEIGHTS_DIR and the results folder (an existing name gets a -2 suffix, nothing is overwritten). After
every run <out>/<table>.json (each run's numbers) and <out>/<table>.md (mean ± std over seeds, the
paper's numbers beside them, the protocol, figures of the best CE-Net run) are rewritten, so an
interrupted job loses little: the next call skips every run already recorded with the same settings
(--fresh runs them again) and continues the run in progress from its last resume point (weights/<run>/last.pth,
every CHECKPOINT_EVERY steps) when its settings are the same. Runs go seed by seed (seed 0 of every model,
then seed 1, ...), so a study stopped part-way has every model at the seeds it reached. Any constants.py flag (--image-size, --epochs,
--device, --data-root, ...) applies on top of every recipe. Recipes are those of recipes.py; the table
itself is written by tables.py.
"""
import argparse
import datetime
import gc
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

import cli
import data
import devices
import evaluation
import networks
import report
import tables
import training
from errors import UserError
from recipes import RECIPES
from tables import TABLES, duration, number

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

# A table of dozens of runs should not wait on, or flood, a visdom server; --visdom true brings it back.
BATCH_DEFAULTS = {"VISDOM": False}

# Settings that name a run or describe the machine, not the experiment: they may differ between a
# recorded run and a new one without making the recorded numbers stale.
PER_RUN_KEYS = {"MODEL", "SEED", "RUN_NAME", "RESUME"}
MACHINE_KEYS = {"DEVICE", "AMP", "CHANNELS_LAST", "COMPILE", "DATA_ROOT", "WEIGHTS_DIR", "RESULTS_DIR",
                *training.BOOKKEEPING}

# For the printed estimate: CE-Net trains ~225 images/s at 448 px, batch 8, bf16 + channels-last on one
# H200 (benchmark.py, torch 2.11), scaling with pixel count; plus ~15 s a run for start-up, warm-up and the
# TTA evaluation (6 + 5 s measured there) and pictures. DRIVE has 20 training images.
GPU_IMAGES_PER_SECOND_AT_448 = 225
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
    settings, given = cli.settings_from(args)
    return args, settings, given


def pick(text, known, what):
    """'a,b' -> ['a', 'b'] checked against `known` (order kept, duplicates dropped); 'all' -> known."""
    if text.strip() == "all":
        return list(known)
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise UserError(f"unknown {what} {', '.join(map(repr, unknown)) or '(none given)'}; "
                            f"choose from: {', '.join(known)}")
    return names


def check_args(args, base, given):
    """The chosen recipes and models; every contradiction is one UserError before anything runs."""
    if args.table not in TABLES:
        raise UserError(f"unknown table {args.table!r}; choose one of: {', '.join(TABLES)}")
    if "MODEL" in given:
        raise UserError("--model does not apply to reproduce.py; choose models with --models a,b")
    if "RESUME" in given:
        raise UserError("--resume does not apply to reproduce.py; an interrupted table resumes by itself "
                        "(recorded runs are skipped)")
    if "RUN_NAME" in given:
        raise UserError("--run-name does not apply to reproduce.py; "
                            "it names every run repro_<recipe>_<model>_s<seed>")
    dataset = TABLES[args.table]["dataset"]
    if base["DATASET"] != dataset:
        raise UserError(f"table {args.table!r} is on dataset {dataset!r}, not --dataset {base['DATASET']}")
    if args.seeds < 1 or args.seeds_main < 1:
        raise UserError(f"--seeds and --seeds-main must be at least 1 (got {args.seeds}, {args.seeds_main})")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError("run reproduce.py as one plain python process, not under torchrun")
    recipes = pick(args.recipes, list(RECIPES), "recipe")
    models = pick(args.models, list(networks.MODELS), "model")
    return recipes, models


# ------------------------------------------------------------------------------------------------------
# Plan
# ------------------------------------------------------------------------------------------------------

def run_settings(base, given, recipe, model, seed):
    """constants.py, then batch defaults and the recipe, then the command line on top, then the run's name."""
    settings = dict(base)
    for key, value in {**BATCH_DEFAULTS, **RECIPES[recipe]}.items():
        if key not in given:
            settings[key] = value
    settings.update(RECIPE=recipe, MODEL=model, SEED=seed, RUN_NAME=f"repro_{recipe}_{model}_s{seed}")
    return settings


def experiment(settings):
    """The settings that decide a run's numbers (not its name, not the machine)."""
    return {key: value for key, value in settings.items()
            if key not in PER_RUN_KEYS | MACHINE_KEYS}


def plan(base, given, recipes, models, seeds, seeds_main):
    """[(recipe, model, seed, settings)], seed by seed: every model's first seed, then every model's second,
    and so on (a model with fewer seeds drops out), so a study stopped part-way compares every model at
    the seeds it reached. Seeds count up from SEED (0 unless --seed says otherwise)."""
    runs = []
    for recipe in recipes:
        counts = {model: seeds_main if model in MAIN_MODELS else seeds for model in models}
        for offset in range(max(counts.values())):
            for model in models:
                if offset < counts[model]:
                    seed = base["SEED"] + offset
                    runs.append((recipe, model, seed, run_settings(base, given, recipe, model, seed)))
    return runs


def find_record(records, recipe, model, seed):
    return next((record for record in records
                 if (record["recipe"], record["model"], record["seed"]) == (recipe, model, seed)), None)


def differences(old, new):
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in keys if old.get(key) != new.get(key))


def estimate_seconds(settings, dataset):
    """Rough H100 wall time of one run (see GPU_IMAGES_PER_SECOND_AT_448): an estimate, never a measurement."""
    steps = data.steps_for(TRAIN_IMAGES.get(dataset, 20), settings["BATCH_SIZE"], settings["EPOCHS"])
    rate = GPU_IMAGES_PER_SECOND_AT_448 * (448 / settings["IMAGE_SIZE"]) ** 2
    return steps * settings["BATCH_SIZE"] / rate + RUN_OVERHEAD_SECONDS


# ------------------------------------------------------------------------------------------------------
# One run
# ------------------------------------------------------------------------------------------------------

def unfinished_run(settings):
    """The resume point of this run's own folder (weights/<run>/last.pth) when it was made with the same
    settings, else None: a study stopped mid-run continues that run instead of starting it again."""
    point = Path(settings["WEIGHTS_DIR"]) / settings["RUN_NAME"] / "last.pth"
    if not point.is_file():
        return None
    try:
        recorded = torch.load(point, map_location="cpu", weights_only=True)["settings"]
    except Exception:  # a damaged file: start afresh in a new folder, keep this one for the user
        say(f"notice: {point} cannot be read; {settings['RUN_NAME']} starts again in a new folder")
        return None
    if not tables.same_settings(experiment(recorded), experiment(settings)):
        say(f"notice: {point} was made with other settings ({differences(experiment(recorded), experiment(settings))}); "
            f"starting a new run beside it")
        return None
    return point


def run_one(recipe, model, seed, settings, results_dir, context):
    """Train (or continue an unfinished run), evaluate, and return the run's record (what <table>.json
    keeps): the summary, each test image's figures (for paired tests), times, machine and precision."""
    start = time.perf_counter()
    point = unfinished_run(settings)
    if point is not None:
        say(f"continuing {settings['RUN_NAME']} from {point}")
    run_dir = training.train({**settings, "RESUME": str(point) if point else ""})
    trained = time.perf_counter()
    checkpoint = torch.load(run_dir / "final.pth", map_location="cpu", weights_only=True)
    summary, eval_dir, _ = evaluation.evaluate(run_dir / "final.pth", settings,
                                               out_dir=Path(results_dir) / run_dir.name)
    finished = time.perf_counter()
    report = json.loads((eval_dir / "metrics.json").read_text())
    protocol = report["protocol"]
    # A continued run's training time includes the part before the stop (the checkpoint adds them up).
    train_seconds = checkpoint.get("train_seconds", trained - start)
    return {
        "recipe": recipe, "model": model, "seed": seed, "run": run_dir.name,
        "checkpoint": str(run_dir / "final.pth"), "eval_dir": str(eval_dir),
        # Per run: the mean over the test images (and their spread, for reference).
        "metrics": {name: tables.finite(value["mean"]) for name, value in summary.items()},
        "image_std": {name: tables.finite(value["std"]) for name, value in summary.items()},
        "images": len(report["per_image"]),
        "steps": protocol["train_steps"], "pretrained": protocol["pretrained"],
        "image_size": protocol["image_size"], "tta": protocol["tta"], "threshold": protocol["threshold"],
        "device": protocol["device"], "machine": context["machine"],
        "train_precision": checkpoint.get("precision", "fp32"), "eval_precision": protocol.get("precision"),
        "train_seconds": round(train_seconds, 1), "eval_seconds": round(finished - trained, 1),
        "wall_seconds": round(train_seconds + finished - trained, 1),
        "per_image": {name: {key: tables.finite(value) for key, value in row.items()}
                      for name, row in report["per_image"].items()},
        "settings": experiment(settings),
        "git_commit": context["commit"], "command": context["command"],
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
    }


# ------------------------------------------------------------------------------------------------------
# Aggregation
# ------------------------------------------------------------------------------------------------------

# ------------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------------

def say(message):
    print(message, flush=True)



def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    args, base, given = parse_args(argv)
    recipes, models = check_args(args, base, given)
    for recipe in recipes:
        recipe_settings = run_settings(base, given, recipe, models[0], 0)
        data.check_image_size(recipe_settings["PATCH_SIZE"] or recipe_settings["IMAGE_SIZE"])
    table, out = args.table, Path(args.out)
    json_path = out / f"{table}.json"
    previous = tables.load_previous(json_path)
    records = previous.get("runs", [])
    # Per-run test.py folders go beside the table unless --results-dir says otherwise.
    results_dir = Path(base["RESULTS_DIR"]) if "RESULTS_DIR" in given else out

    runs = plan(base, given, recipes, models, args.seeds, args.seeds_main)
    todo = []
    for recipe, model, seed, settings in runs:
        recorded = find_record(records, recipe, model, seed)
        if args.fresh or recorded is None or not tables.same_settings(recorded["settings"], experiment(settings)):
            todo.append((recipe, model, seed))
    estimate = sum(estimate_seconds(settings, TABLES[table]["dataset"]) for recipe, model, seed, settings in runs
                   if (recipe, model, seed) in todo)
    say(f"plan: {len(runs)} runs ({len(recipes)} recipes x {len(models)} models x seeds), {len(todo)} to run, "
        f"{len(runs) - len(todo)} already in {json_path}; rough estimate on one H200 for those to run: "
        f"{duration(estimate)} ({GPU_IMAGES_PER_SECOND_AT_448} img/s at 448 px as measured there, "
        f"+ {RUN_OVERHEAD_SECONDS}s a run)")
    if args.dry_run:
        for index, (recipe, model, seed, settings) in enumerate(runs, 1):
            state = "to run" if (recipe, model, seed) in todo else "recorded"
            size = (f"random {settings['PATCH_SIZE']}px crops" if settings["PATCH_SIZE"]
                    else f"{settings['IMAGE_SIZE']}px images")
            say(f"[{index}/{len(runs)}] {recipe}/{model} seed {seed}: {size}, "
                f"{settings['EPOCHS']} epochs, loss {settings['LOSS']} ({state})")
        return
    if not todo and not records:
        return

    device = devices.select_device(base["DEVICE"])
    context = {"machine": devices.machine_name(device), "commit": report.git_commit(),
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
        records, dropped = tables.merge(records, record)
        stale = [old for old in dropped if old["seed"] != seed]
        if stale:
            say(f"notice: dropped {len(stale)} older {recipe}/{model} runs made with other settings "
                f"(seeds {', '.join(str(old['seed']) for old in stale)}) so the row does not mix them")
        figures = tables.write_outputs(table, out, records, figures)
        spent += record["wall_seconds"]
        finished += 1
        say(f"[{index}/{len(runs)}] done {label} in {duration(record['wall_seconds'])}: " + ", ".join(
            f"{name} {number(record['metrics'].get(name))}" for name in ("FOV AUC", "FOV Acc", "FOV Sen")))
        release_memory()
    if not finished:
        figures = tables.write_outputs(table, out, records, figures)  # the script may be newer than the table
    say(f"wrote {json_path} and {out / f'{table}.md'} ({len(records)} runs; {finished} new in {duration(spent)})")



def release_memory():
    """Return the finished run's GPU memory before the next model is built."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()



if __name__ == "__main__":
    cli.run(main)
