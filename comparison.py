"""Two or more evaluated runs side by side, and paired per-image comparisons: what compare.py writes as
<name>.json and <name>.md (the CPU results tables of docs/results.md).

Differences never mix test protocols: each run is paired with the first run of the table that was scored
the same way (test-time augmentation, threshold, scoring), so with one protocol every run is compared with
the first, and a run evaluated without TTA is compared with the first run evaluated without TTA.

A run is a test.py output folder: its metrics.json (per-image rows, protocol) and the checkpoint it names
(steps, training wall time, settings). The paired comparison takes, for every metric, the per-image
differences first - other over the same test images, their mean, how many images the first model wins,
and the two-sided Wilcoxon signed-rank p-value (scipy's exact distribution for n <= 50 without ties).
"""
import json
import math
import shlex
import shutil
from pathlib import Path

import numpy as np
from scipy import stats

import cli
import constants
import data
import framework
import networks
import recipes
import report
import tables
import tasks
from errors import UserError

def load_run(eval_dir):
    """One evaluated run: its test.py metrics and what its checkpoint recorded of the training."""
    eval_dir = Path(eval_dir)
    metrics_path = eval_dir / "metrics.json"
    if not metrics_path.is_file():
        raise UserError(f"{metrics_path} not found; pass folders that test.py wrote")
    evaluated = json.loads(metrics_path.read_text())
    checkpoint = evaluated["protocol"]["checkpoint"]
    payload = framework.read_checkpoint(checkpoint)
    settings = payload.get("settings", {})
    model = evaluated["protocol"]["model"]
    return {
        "eval_dir": str(eval_dir), "checkpoint": checkpoint, "model": model,
        "title": networks.MODEL_TITLES.get(model, model), "loss": settings.get("LOSS"),
        "augment": data.augmentation_mode(settings.get("AUGMENT")),
        "patch_scale": settings.get("PATCH_SCALE", 1.0), "patch_size": settings.get("PATCH_SIZE"),
        "batch_size": settings.get("BATCH_SIZE"),
        "summary": evaluated["summary"], "per_image": evaluated["per_image"], "protocol": evaluated["protocol"],
        "steps": payload.get("step"), "train_seconds": payload.get("train_seconds"),
        "eval_seconds": evaluated["seconds"]["total_after_load"], "pretrained": payload.get("pretrained"),
        "train_machine": payload.get("machine"), "train_log": find_train_log(checkpoint, settings),
        "train_commit": payload.get("git_commit", "not recorded"),
        "train_command": training_command(settings) + averaging_command(payload, checkpoint),
        "eval_command": evaluation_command(checkpoint, evaluated["protocol"]),
        "weights_from": weights_origin(payload, settings),
    }


def weights_origin(payload, settings):
    """Where a checkpoint's weights came from when not from one run's own steps alone: averaged by average.py,
    or fine-tuned from another checkpoint (--init-weights); None otherwise."""
    averaged = payload.get("averaged_from")
    if averaged:
        steps = [entry.get("step") for entry in averaged]
        return f"mean of {len(steps)} checkpoints' weights (steps {', '.join(map(str, steps))})"
    if settings.get("INIT_WEIGHTS"):
        start = Path(settings["INIT_WEIGHTS"])
        return f"fine-tuned from {start.parent.name}/{start.name}"
    return None


def averaging_command(payload, checkpoint):
    averaged = payload.get("averaged_from")
    if not averaged:
        return ""
    sources = " ".join(entry["checkpoint"] for entry in averaged)
    return f" && python average.py {sources} --out {checkpoint}"


def load_crossval_table(table_path, folds=None):
    """A crossval.py table as one run: every fold's test images (each slice is tested by one fold only, so
    they pair image by image with another table over the same slices), its summary over those images, the
    training time of all folds together and the command that reruns it. `folds`: only those folds' records
    (a lever measured on one fold, set beside that fold of a finished table)."""
    path = Path(table_path)
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path} cannot be read as JSON ({error}); pass a <table>.json that crossval.py wrote")
    records = table.get("records") if isinstance(table, dict) else None
    if not records:
        raise UserError(f"{path} holds no cross-validated fold; pass a <table>.json that crossval.py wrote")
    records = sorted(records, key=lambda record: record["fold"])
    if folds is not None:
        missing = sorted(set(folds) - {record["fold"] for record in records})
        if missing:
            done = ", ".join(str(record["fold"]) for record in records)
            raise UserError(f"{path} has no fold {', '.join(map(str, missing))} (folds done: {done}); "
                            f"pass --folds with folds every table has")
        records = [record for record in records if record["fold"] in folds]
    first = records[0]
    per_image = {name: row for record in records for name, row in record["per_image"].items()}
    totals = tables.aggregate_folds(records)
    # Tables written before folds recorded their commit and machine: the checkpoints still on this disk say.
    kept = [framework.read_checkpoint(record["checkpoint"]) for record in records
            if not record.get("git_commit") and Path(record["checkpoint"]).is_file()]
    payload = kept[0] if kept else {}
    commits = list(dict.fromkeys([*(record["git_commit"] for record in records if record.get("git_commit")),
                                  *(checkpoint.get("git_commit", "not recorded") for checkpoint in kept)]))
    machine = next((record["machine"] for record in records if record.get("machine")), payload.get("machine"))
    on_disk = Path(first["checkpoint"]).is_file()
    settings = first["settings"]
    return {
        "eval_dir": str(path), "checkpoint": first["checkpoint"], "model": first["protocol"]["model"],
        "title": networks.MODEL_TITLES.get(first["protocol"]["model"], first["protocol"]["model"]),
        "loss": settings.get("LOSS"), "augment": data.augmentation_mode(settings.get("AUGMENT")),
        "patch_scale": settings.get("PATCH_SCALE", 1.0), "patch_size": settings.get("PATCH_SIZE"),
        "batch_size": settings.get("BATCH_SIZE"),
        "summary": totals["over_images"], "over_folds": totals["over_folds"],
        "folds": [record["fold"] for record in records], "num_folds": table.get("folds"),
        "per_image": per_image, "protocol": first["protocol"], "steps": first["protocol"].get("train_steps"),
        "train_seconds": sum(record["train_seconds"] or 0 for record in records),
        "eval_seconds": sum(record["eval_seconds"] or 0 for record in records),
        "pretrained": first["protocol"].get("pretrained"), "train_machine": machine,
        "train_commit": ", ".join(commits) or "not recorded",
        "train_log": find_train_log(first["checkpoint"], settings) if on_disk else None,
        "train_command": every_fold_command(table.get("command", "")),
        "eval_command": evaluation_command(fold_pattern(first["checkpoint"], first["fold"]), first["protocol"]),
        "table": path.stem,
    }


def fold_pattern(checkpoint, fold):
    """weights/name_fold0/final.pth -> weights/name_fold<K>/final.pth"""
    path = Path(checkpoint)
    return str(path.parent.with_name(path.parent.name.replace(f"_fold{fold}", "_fold<K>")) / path.name)


def every_fold_command(command):
    """A crossval.py command line without its --only: the one command that trains and scores every fold."""
    words = shlex.split(command)
    kept = []
    for index, word in enumerate(words):
        if word == "--only" or word.startswith("--only="):
            continue
        if index and words[index - 1] == "--only":
            continue
        kept.append(word)
    return shlex.join(kept)


def load_any(path, folds=None):
    """A test.py folder, or a crossval.py <table>.json (only `folds` of it, if given)."""
    return load_crossval_table(path, folds) if str(path).endswith(".json") else load_run(path)


LOSS_TITLES = {"dice": "Dice", "bce": "BCE", "ce": "CE", "dice_bce": "Dice + BCE", "varce": "varCE",
               "weighted_bce_dice": "Dice + border-weighted BCE",
               "weighted_bce_cldice": "Dice + border-weighted BCE + clDice"}
PREPROCESS_TITLES = {"clahe": "CLAHE", "authors": "authors' preprocessing"}
AUGMENT_TITLES = {"paper": "paper's augmentation", "authors_code": "authors' augmentation", "flips": "flips only",
                  "elastic": "elastic augmentation", "camera": "camera augmentation", "none": "no augmentation"}
DATASET_TITLES = {"drive": "DRIVE", "chase": "CHASE_DB1", "drishti": "Drishti-GS1", "isbi2012": "ISBI 2012",
                  "isbi2012_stack": "ISBI 2012 with neighbouring slices", "monuseg": "MoNuSeg",
                  "monuseg_contour": "MoNuSeg as inside / contour", "glas": "GlaS",
                  "origa": "ORIGA", "messidor": "Messidor", "rimone": "RIM-ONE"}
EVAL_SCALE_TITLES = {"1": "training scale", "auto": "FOV-matched scale", "field": "field-angle-matched scale"}
DEFAULT_TITLE = "Evaluated runs side by side"
SPLIT_TITLES = {"train": "training images", "all": "training and test images"}
ADAPT_BN_TITLES = {"train": "BatchNorm re-estimated on the training images",
                   "scored": "BatchNorm re-estimated on the scored images"}


def carried_runs(table_path):
    """The runs of a table compare.py wrote before, for putting new runs beside them when their test.py
    folders or checkpoints are no longer on this disk (the table keeps every per-image number)."""
    path = Path(table_path)
    if not path.is_file():
        raise UserError(f"{path} not found; --carry takes a <name>.json that compare.py wrote")
    try:
        table = json.loads(path.read_text())
    except ValueError as error:
        raise UserError(f"{path} is not JSON ({error}); --carry takes a <name>.json that compare.py wrote")
    if not isinstance(table, dict) or not table.get("runs"):
        raise UserError(f"{path} has no runs; --carry takes a <name>.json that compare.py wrote")
    runs = table["runs"]
    for run in runs:  # tables written before these were recorded: from the checkpoint, where it is still here
        missing = [key for key in ("loss", "augment") if key not in run]
        if missing and Path(run.get("checkpoint", "")).is_file():
            settings = framework.read_checkpoint(run["checkpoint"]).get("settings", {})
            recorded = {"loss": settings.get("LOSS"),
                        "augment": data.augmentation_mode(settings.get("AUGMENT"))}
            run.update({key: recorded[key] for key in missing})
    return runs, path.parent, table.get("figures", []), table.get("notes", []), table.get("title")


def distinct_titles(runs):
    """Each run titled by its model; where several runs share a model, the title adds what tells them
    apart: the training data ('CE-Net, trained on DRIVE'), the loss ('FullNet, varCE'), the augmentation
    ('CE-Net, camera augmentation'; only where recorded), the preprocessing ('CE-Net, CLAHE'), the training
    crops ('CE-Net, 512 px crops, batch 1'; only where recorded), the scale of crops and prediction ('CE-Net,
    1.5x scale', 'CE-Net, FOV-matched scale'), where the weights came from ('mean of 3 checkpoints' weights (steps
    ...)', 'fine-tuned from run/final.pth'), the number of steps ('CE-Net, 1500 steps'), 'no TTA', the images
    scored ('training and test images')."""
    for run in runs:
        run["title"] = networks.MODEL_TITLES.get(run["model"], run["model"])
    groups = {}
    for run in runs:
        groups.setdefault(run["title"], []).append(run)
    for group in groups.values():
        if len(group) == 1:
            continue
        differ = {name: len({value(run) for run in group}) > 1 for name, value in (
            ("trained_on", trained_on), ("loss", lambda run: run.get("loss")),
            ("augment", lambda run: run.get("augment")), ("crops", crops_of), ("preprocess", preprocess_of),
            ("scale", scale_of), ("eval_scale", eval_scale_of), ("steps", lambda run: run.get("steps")),
            ("tta", tta_of), ("split", split_of), ("postprocess", postprocess_of), ("adapt_bn", adapt_bn_of),
            ("weights_from", lambda run: run.get("weights_from")))}
        for run in group:
            parts = [run["title"]]
            if differ["trained_on"]:
                parts.append(f"trained on {DATASET_TITLES.get(trained_on(run), trained_on(run))}")
            if differ["loss"]:
                parts.append(LOSS_TITLES.get(run.get("loss"), str(run.get("loss"))))
            if differ["augment"] and run.get("augment"):
                parts.append(AUGMENT_TITLES.get(run["augment"], run["augment"]))
            if differ["crops"] and crops_of(run):
                parts.append(crops_title(*crops_of(run)))
            if differ["preprocess"] and preprocess_of(run) != "ours":
                parts.append(PREPROCESS_TITLES.get(preprocess_of(run), preprocess_of(run)))
            if differ["scale"] and scale_of(run) != 1:
                parts.append(f"{scale_of(run):g}x scale")
            if differ["eval_scale"]:
                parts.append(EVAL_SCALE_TITLES.get(eval_scale_of(run), f"{eval_scale_of(run)}x prediction scale"))
            if differ["postprocess"] and postprocess_of(run) != "none":
                parts.append(f"{postprocess_of(run)} post-processing")
            if differ["adapt_bn"] and adapt_bn_of(run) != "none":
                parts.append(ADAPT_BN_TITLES.get(adapt_bn_of(run), f"BatchNorm re-estimated ({adapt_bn_of(run)})"))
            if differ["weights_from"] and run.get("weights_from"):
                parts.append(run["weights_from"])
            told_apart = ("trained_on", "loss", "augment", "crops", "preprocess", "scale", "eval_scale", "tta", "split",
                          "postprocess", "adapt_bn", "weights_from")
            if differ["steps"] or not any(differ[name] for name in told_apart):
                parts.append(f"{run.get('steps')} steps")
            if differ["tta"] and not tta_of(run):
                parts.append("no TTA")
            if differ["split"] and split_of(run) != "test":
                parts.append(SPLIT_TITLES.get(split_of(run), split_of(run)))
            run["title"] = ", ".join(parts)
        titles = [run["title"] for run in group]
        for run in group:  # differing in something else (a learning rate, a seed): the run's folder says which
            if titles.count(run["title"]) > 1:
                run["title"] += f" ({run.get('table') or Path(run['checkpoint']).parent.name})"
    return runs


def trained_on(run):
    protocol = run.get("protocol", {})
    return protocol.get("trained_on", protocol.get("dataset"))


def split_of(run):
    return run.get("protocol", {}).get("split", "test")


def eval_scale_of(run):
    return str(run.get("protocol", {}).get("eval_scale", "1"))


def preprocess_of(run):
    return run.get("protocol", {}).get("preprocess", "ours")


def crops_of(run):
    """(PATCH_SIZE, BATCH_SIZE) of the training, or None for a table written before runs recorded them."""
    if run.get("patch_size") is None or run.get("batch_size") is None:
        return None
    return run["patch_size"], run["batch_size"]


def crops_title(patch_size, batch_size):
    return f"{patch_size} px crops, batch {batch_size}" if patch_size else f"whole resized images, batch {batch_size}"


def scale_of(run):
    return run.get("patch_scale", 1.0)


def postprocess_of(run):
    return run.get("protocol", {}).get("postprocess", "none")


def adapt_bn_of(run):
    return run.get("protocol", {}).get("adapt_bn", "none")


def tta_of(run):
    return run.get("protocol", {}).get("tta", True)


def scored_alike(run):
    """Runs with equal keys were scored on the same images in the same way, so their per-image numbers pair."""
    protocol = run["protocol"]
    return (scored_dataset(protocol.get("dataset")), protocol.get("split", "test"), protocol.get("tta"),
            protocol.get("threshold"), protocol.get("scoring", "ours"))


def scored_dataset(name):
    """The dataset whose test images and reference a run of dataset `name` was scored against."""
    return (tasks.DATASETS[name].scores_like or name) if name in tasks.DATASETS else name


def reference_pairs(runs):
    """(reference, other) index pairs: every run after the first of its protocol, with that first run."""
    first_of = {}
    pairs = []
    for index, run in enumerate(runs):
        key = scored_alike(run)
        if key in first_of:
            pairs.append((first_of[key], index))
        else:
            first_of[key] = index
    return pairs


def evaluation_command(checkpoint, protocol):
    """`python test.py` with the flags that reproduce the run's test protocol over constants.py and the
    checkpoint: the other dataset and its folder when the model is scored away from its training data, the
    prediction scale, the split, TTA, threshold and scoring."""
    words = [f"python test.py --checkpoint {checkpoint}"]
    dataset = protocol.get("dataset")
    if dataset and protocol.get("trained_on") and dataset != protocol["trained_on"]:
        words.append(f"--dataset {dataset}")
        if protocol.get("data_root"):
            words.append(f"--data-root {protocol['data_root']}")
    if str(protocol.get("eval_scale", "1")) != "1":
        words.append(f"--eval-scale {protocol['eval_scale']}")
    if protocol.get("split", "test") != "test":
        words.append(f"--split {protocol['split']}")
    if not protocol.get("tta", True):
        words.append("--tta false")
    if protocol.get("threshold", constants.THRESHOLD) != constants.THRESHOLD:
        words.append(f"--threshold {protocol['threshold']}")
    if protocol.get("scoring", "ours") != constants.PROTOCOL:
        words.append(f"--protocol {protocol['scoring']}")
    if protocol.get("postprocess", "none") != "none":
        words.append(f"--postprocess {protocol['postprocess']}")
    if protocol.get("adapt_bn", "none") != "none":
        words.append(f"--adapt-bn {protocol['adapt_bn']}")
    return " ".join(words)


def find_train_log(checkpoint, settings):
    """The run's train_log.csv: beside the checkpoint, or in the run folder its settings name (a released
    copy lives elsewhere); None when neither is on this disk."""
    for folder in (Path(checkpoint).parent, Path(settings.get("WEIGHTS_DIR", "weights")) / settings.get("RUN_NAME", "")):
        if (folder / "train_log.csv").is_file():
            return str(folder / "train_log.csv")
    return None


def training_command(settings):
    """`python main.py` with the flags that reproduce `settings` over constants.py and its recipe."""
    defaults = cli.default_settings()
    recipe = settings.get("RECIPE", "")
    defaults.update(recipes.RECIPES.get(recipe, {}))
    words = ["python main.py"] + ([f"--recipe {recipe}"] if recipe else [])
    for name, value in settings.items():
        if name in defaults and name != "RECIPE" and value != defaults[name]:
            words.append(f"{cli.flag(name)} {str(value).lower() if isinstance(value, bool) else value}")
    return " ".join(words)


def paired(first, other, metric_names):
    """Per metric: mean of (first - other) over the images both were scored on, the images where the
    first is higher, and the Wilcoxon signed-rank p-value of the differences (None when undefined)."""
    images = [name for name in first["per_image"] if name in other["per_image"]]
    if not images:
        raise UserError(f"{first['eval_dir']} and {other['eval_dir']} share no test image")
    result = {}
    for name in metric_names:
        a = np.array([value_of(first["per_image"][image].get(name)) for image in images])
        b = np.array([value_of(other["per_image"][image].get(name)) for image in images])
        keep = ~(np.isnan(a) | np.isnan(b))
        a, b = a[keep], b[keep]
        difference = a - b
        result[name] = {"images": int(keep.sum()), "mean_difference": float(difference.mean()) if a.size else None,
                        "first_higher": int((difference > 0).sum()), "other_higher": int((difference < 0).sum()),
                        "wilcoxon_p": wilcoxon_p(a, b), "identical": bool(a.size) and bool(np.array_equal(a, b))}
    return result


def value_of(value):
    return math.nan if value is None else float(value)


def wilcoxon_p(a, b):
    """Two-sided Wilcoxon signed-rank p-value of paired samples; None when every difference is zero."""
    if a.size == 0 or np.all(a == b):
        return None
    return float(stats.wilcoxon(a, b).pvalue)


def summary_cell(stat):
    if stat is None or stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}"


def minutes(seconds):
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min"


def render_markdown(title, runs, comparisons, metric_names, figures, notes=()):
    first = runs[0]
    lines = [f"# {title}", "",
             "Written by `compare.py` from the test.py folders (or crossval.py tables) of these runs; rerun it "
             "rather than editing this file. Every number below was measured, on the machine named under *How "
             "these were made*.", "",
             f"## Test images: mean ± std over the {len(first['per_image'])} images", "",
             first["protocol"]["evaluation"], ""]
    crossval = any(run.get("folds") for run in runs)
    paper = paper_figures(first)
    paper_metrics = [name for name in metric_names if any(name in row for row in paper.get("figures", {}).values())]
    headers = (["model"] + (["folds"] if crossval else []) + ["steps", "training", "test-time augmentation",
                                                              "evaluation"]
               + metric_names + [f"paper {name}" for name in paper_metrics])
    rows = []
    for run in runs:
        row = [run["title"]] + ([folds_cell(run)] if crossval else []) + [
            run["steps"], minutes(run["train_seconds"]), "8-way flips" if run["protocol"]["tta"] else "none",
            minutes(run["eval_seconds"])]
        row += [summary_cell(run["summary"].get(name)) for name in metric_names]
        published = paper.get("figures", {}).get(run["model"], {})
        row += [f"{published[name]:.4f}" if name in published else "n/a" for name in paper_metrics]
        rows.append(row)
    lines.append(report.markdown_table(headers, rows))
    if crossval:
        lines += ["Cross-validated rows: each test image is scored by the one fold that held it out; steps are a "
                  "fold's, training and evaluation times are all folds' together.", ""]
        lines += fold_lines(runs, metric_names)
    if paper_metrics:
        lines += [f"Paper columns: {paper['source']}.", ""]
    for reference, other, comparison in comparisons:
        lines += [f"## Paired per-image comparison: {reference['title']} − {other['title']}", "",
                  "Differences taken image by image over the same test images; p = two-sided Wilcoxon "
                  "signed-rank test of those differences.", ""]
        body = []
        # A figure that does not depend on the model (the 2nd annotator's) is equal on every image.
        identical = [name for name in metric_names if comparison[name].get("identical")]
        for name in metric_names:
            if name in identical:
                continue
            entry = comparison[name]
            p_value = "n/a" if entry["wilcoxon_p"] is None else f"{entry['wilcoxon_p']:.2g}"
            mean = "n/a" if entry["mean_difference"] is None else f"{entry['mean_difference']:+.4f}"
            body.append([name, mean, f"{entry['first_higher']} of {entry['images']}", p_value])
        lines.append(report.markdown_table(
            ["metric", "mean difference", f"images where {reference['title']} is higher", "Wilcoxon p"], body))
        if identical:
            lines += [f"Equal on every image for both, so not compared: {', '.join(identical)}.", ""]
    lines += ["## How these were made", ""]
    for run in runs:
        machine = f" on {run['train_machine']}" if run["train_machine"] else ""
        encoder = str(run["pretrained"]).removeprefix("encoder: ")
        folds = len(run.get("folds") or [])
        steps = (f"{run['steps']} training steps a fold, {folds} fold{'s' if folds > 1 else ''} in "
                 f"{minutes(run['train_seconds'])}"
                 if folds else f"{run['steps']} training steps in {minutes(run['train_seconds'])}")
        lines += [f"- **{run['title']}**: {steps}{machine}, "
                  f"{commits_text(run['train_commit'])}; encoder: {encoder}.",
                  f"  - train: `{run['train_command']}`",
                  f"  - evaluate{' each fold K (that command does it)' if run.get('folds') else ''}: "
                  f"`{run['eval_command']}` ({minutes(run['eval_seconds'])} on "
                  f"{run['protocol'].get('machine', run['protocol']['device'])}; test-time augmentation: "
                  f"{'8-way flips' if run['protocol']['tta'] else 'none'}; threshold {run['protocol']['threshold']}; "
                  f"input: {run['protocol'].get('input', 'resized')})"]
    lines += [f"- {note}" for note in notes]
    if figures:
        lines += ["", f"## {first['title']}: figures", ""]
        lines += [f"![{Path(name).stem}]({name})" for name in figures]
    return "\n".join(lines) + "\n"


def commits_text(commits):
    """'code at commit `a`', or 'code at commits `a`, `b`' for folds trained at several commits."""
    names = [name.strip() for name in str(commits).split(",")]
    return f"code at commit{'s' if len(names) > 1 else ''} " + ", ".join(f"`{name}`" for name in names)


def folds_cell(run):
    if not run.get("folds"):
        return "n/a"
    return f"{', '.join(str(fold) for fold in run['folds'])} of {run['num_folds']}"


def paper_figures(run):
    """The paper's figures for the dataset `run` was scored on ({} where the paper reports none)."""
    name = run.get("protocol", {}).get("dataset")
    return (tasks.DATASETS[name].paper or {}) if name in tasks.DATASETS else {}


def fold_lines(runs, metric_names):
    """Mean ± std over folds (one value per fold: the mean of its test images) of the runs with two folds or
    more; a single fold has no spread to show, and its mean is the image mean of the table above."""
    body = [[run["title"], folds_cell(run)] + [summary_cell(run["over_folds"].get(name)) for name in metric_names]
            for run in runs if len(run.get("folds") or []) > 1]
    if not body:
        return []
    single = sum(1 for run in runs if len(run.get("folds") or []) == 1)
    note = ([f"Left out: {single} run{'s' if single > 1 else ''} of a single fold (no spread over folds; the mean "
             f"over its images is above).", ""] if single else [])
    return ["### Mean ± std over folds", "", report.markdown_table(["model", "folds"] + metric_names, body)] + note


def copy_figures(run, out, prefix, overlay):
    """The first run's training curve (drawn from its train_log.csv), ROC plot and one overlay, re-compressed
    into <out>/figures."""
    source = Path(run["eval_dir"])
    picks = [(source / "roc.png", f"{prefix}_roc.png"), (source / f"{overlay}_overlay.png", f"{prefix}_{overlay}_overlay.png")]
    figures = Path(out) / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    written = []
    if run["train_log"]:
        name = f"{prefix}_training_curve.png"
        report.training_curve_plot(run["train_log"], figures / name, f"{run['title']}: training loss")
        written.append(f"figures/{name}")
    else:
        print(f"notice: no train_log.csv found for {run['checkpoint']}; the training curve is left out")
    for path, name in picks:
        if not path.is_file():
            print(f"notice: {path} not found; {name} left out of the figures")
            continue
        report.save_compressed_copy(path, figures / name)
        written.append(f"figures/{name}")
    return written


def keep_figures(names, table_dir, out):
    """The carried table's figures that still exist, beside the table or already in `out`, as paths relative
    to `out` (copied there when they live elsewhere)."""
    kept = []
    for name in names:
        found = next((folder / name for folder in (Path(table_dir), Path(out)) if (folder / name).is_file()), None)
        if found is None:
            print(f"notice: {name} of the carried table not found; left out of the figures")
            continue
        target = Path(out) / "figures" / found.name
        if found.resolve() != target.resolve():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(found, target)
        kept.append(f"figures/{found.name}")
    return kept


def write(name, title, eval_dirs, out, overlay="01", notes=(), carry=None, carry_after=False, folds=None):
    """`carry`: a table written before whose runs come first (its first run stays the reference), with
    its figures where the first run's test.py folder is no longer on this disk; with `carry_after` they
    come after the new runs, so the first new run becomes the reference. The carried table's notes stay, before
    the new ones, and so does its title unless `title` names another."""
    carried, carried_dir, carried_figures, carried_notes, carried_title = (
        carried_runs(carry) if carry else ([], None, [], [], None))
    title = title or carried_title or DEFAULT_TITLE
    notes = list(dict.fromkeys([*carried_notes, *notes]))
    new = [load_any(path, folds) for path in eval_dirs]
    runs = distinct_titles(new + carried if carry_after else carried + new)
    if not runs:
        raise UserError("nothing to compare: pass test.py output folders (and/or --carry TABLE.json)")
    metric_names = list(runs[0]["summary"])
    comparisons = [(runs[a], runs[b], paired(runs[a], runs[b], metric_names)) for a, b in reference_pairs(runs)]
    if Path(runs[0]["eval_dir"]).is_dir():
        figures = copy_figures(runs[0], out, name, overlay)
    else:
        figures = keep_figures(carried_figures, carried_dir, out)
    payload = {"title": title, "runs": runs, "paired": [
        {"first": reference["model"], "other": other["model"], "first_title": reference["title"],
         "other_title": other["title"], "metrics": comparison}
        for reference, other, comparison in comparisons], "figures": figures, "notes": list(notes)}
    out = Path(out)
    report.write_json(out / f"{name}.json", payload)
    report.write_text(out / f"{name}.md", render_markdown(title, runs, comparisons, metric_names, figures, notes))
    return out / f"{name}.json", out / f"{name}.md"
