"""The DRIVE reproduction table: runs aggregated over seeds, the paper's numbers beside them, the protocol,
and the best CE-Net run's figures, as <out>/<table>.json and <out>/<table>.md (see reproduce.py)."""
import datetime
import json
import math
import statistics
from pathlib import Path

import metrics
import networks
import report
from errors import UserError
from recipes import RECIPE_WHY, RECIPES

# --- what each table is -----------------------------------------------------------------------------------
TABLES = {"drive": {"dataset": "drive", "title": "DRIVE retinal vessel segmentation"},
          "drive_ablation_cpu": {"dataset": "drive", "title": "DRIVE ablation (the paper's Table VI), cpu recipe"}}
ABLATION_TABLES = ("drive_ablation_cpu",)  # written by ablation.py: paired answers instead of the generic page



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



def duration(seconds):
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"



def finite(value):
    """JSON has no NaN: an undefined metric (e.g. Sen of an image without vessels) is stored as null."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value



def same_settings(old, new):
    """Whether two runs' settings describe the same experiment. A setting that did not exist when a run was
    recorded matches when the other run has it at constants.py's default (the run behaved that way)."""
    import constants
    absent = object()
    for key in set(old) | set(new):
        first, second = old.get(key, absent), new.get(key, absent)
        if first is absent:
            first = getattr(constants, key, absent)
        if second is absent:
            second = getattr(constants, key, absent)
        if first != second:
            return False
    return True


def merge(records, new):
    """Add `new`; drop the record it replaces and every run of its row (recipe, model) made with other
    settings, so a row never mixes two configurations. Returns (records, dropped)."""
    kept, dropped = [], []
    for record in records:
        same_row = (record["recipe"], record["model"]) == (new["recipe"], new["model"])
        if same_row and (record["seed"] == new["seed"] or not same_settings(record["settings"], new["settings"])):
            dropped.append(record)
        else:
            kept.append(record)
    return kept + [new], dropped



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
    recipe, model = key
    recipes, models = list(RECIPES), list(networks.MODELS)
    return (recipes.index(recipe) if recipe in recipes else len(recipes), recipe,
            models.index(model) if model in models else len(models), model)



def aggregate(records):
    """One row per (recipe, model): mean ± std over seeds of each run's mean over the test images."""
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


def as_numbers(row):
    """A JSON row (undefined figures stored as null) with NaN for null, as metrics.summarize reads it."""
    return {name: math.nan if value is None else value for name, value in row.items()}


def aggregate_folds(records):
    """Of crossval.py's fold records: mean and population std of every figure over the folds' means (one
    value a fold) and over all test images of all folds (one value an image), by metrics.summarize."""
    fold_means = [as_numbers(record["summary"]) for record in records]
    images = [as_numbers(row) for record in records for row in record["per_image"].values()]
    return {"folds": [record["fold"] for record in records], "images": len(images),
            "over_folds": metrics.summarize(fold_means), "over_images": metrics.summarize(images)}


def best_cenet(records):
    """The CE-Net run with the highest FOV AUC whose test.py pictures are still on this disk."""
    candidates = [record for record in records if record["model"] == "cenet"
                  and record["metrics"].get("FOV AUC") is not None
                  and (Path(record["eval_dir"]) / "roc.png").is_file()]
    return max(candidates, key=lambda record: record["metrics"]["FOV AUC"], default=None)



def copy_figures(records, out, table, previous):
    """Copy the best CE-Net run's ROC plot and two overlays into <out>/figures (re-compressed, small)."""
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
        report.save_compressed_copy(path, figures / name)
        files.append(f"figures/{name}")
    return {"run": best["run"], "recipe": best["recipe"], "seed": best["seed"],
            "FOV AUC": best["metrics"]["FOV AUC"], "eval_dir": best["eval_dir"], "files": files}



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
    lines += [f"- `{recipe}`: {RECIPE_WHY.get(recipe, 'recipe no longer in recipes.py')}" for recipe in recipes]
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



def write_ablation(table, out, records):
    """The Table VI study's own page: paired answers per comparison, a per-seed figure (ablation.py)."""
    import ablation
    models = ["backbone", "backbone_dac", "backbone_dac_noatrous", "backbone_inception", "backbone_inception_res",
              "backbone_rmp", "cenet", "unet"]
    figure = Path(out) / "figures" / f"{table}_fov_auc.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    ablation.plot(records, models, networks.MODEL_TITLES, figure)
    commands = list(dict.fromkeys(record.get("command", "") for record in records))
    payload = {
        "table": table, "dataset": TABLES[table]["dataset"],
        "written": datetime.datetime.now().isoformat(timespec="seconds"),
        "aggregation": "per model: mean and sample std (n-1) over seeds of each run's mean over the test images",
        "paper_auc": ablation.PAPER_AUC, "comparisons": ablation.compare(records), "runs": records,
    }
    report.write_text(Path(out) / f"{table}.json", json.dumps(payload, indent=1) + "\n")
    report.write_text(Path(out) / f"{table}.md", ablation.render(records, models, networks.MODEL_TITLES,
                                                                 " / ".join(commands), f"figures/{figure.name}"))
    return None


def write_outputs(table, out, records, previous_figures):
    if table in ABLATION_TABLES:
        return write_ablation(table, out, records)
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
    report.write_text(Path(out) / f"{table}.json", json.dumps(payload, indent=1) + "\n")
    report.write_text(Path(out) / f"{table}.md", render_markdown(table, rows, records, figures))
    return figures



def load_previous(path):
    if not path.is_file():
        return {}
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not readable JSON ({error}); move it away to start a new table")
    if not isinstance(previous, dict) or not isinstance(previous.get("runs", []), list):
        raise UserError(f"{path} is not a table written by reproduce.py; move it away to start a new table")
    return previous



def number(value):
    return "n/a" if value is None else f"{value:.4f}"

