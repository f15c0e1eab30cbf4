"""K-fold cross-validation of one set of settings: train and score every fold, then mean ± std over the folds
and over all their test images. Made for isbi2012, whose 30 labelled slices are all there is (FOLD k of 5 tests
on slices 6k..6k+5 and trains on the other 24); it works for every dataset that splits by FOLD / NUM_FOLDS.

    python crossval.py --name isbi_cpu --recipe cpu --dataset isbi2012 --data-root ../shared/ISBI2012
    python crossval.py --name isbi_cpu --table isbi_cpu_watershed --postprocess watershed \\
        --recipe cpu --dataset isbi2012 --data-root ../shared/ISBI2012   # the same weights, scored anew
    python crossval.py --name isbi_cpu --recipe cpu --dataset isbi2012 --dry-run    # what would run
    python crossval.py --name isbi_screen --only 0,2 --recipe cpu --epochs 100 ...  # two folds only, for a screen

Fold k is training.train with FOLD k, NUM_FOLDS --folds and RUN_NAME <name>_fold<k> (weights/<name>_fold<k>/),
as main.py runs it, then evaluation.evaluate into <results>/<table>/fold<k>/, as test.py does. After every fold,
<results>/<table>.json (each fold's summary and per-image figures) and <table>.md (mean ± std over folds and over
images, each fold's means) are rewritten. It resumes by itself: a fold recorded in <table>.json with the same
settings is skipped, a fold whose final.pth was trained with the same settings is only scored (so another
--postprocess or --threshold scores the trained folds again without training: give it its own --table), and an
unfinished fold continues from its last.pth. Any constants.py flag applies to every fold.
"""
import argparse
import datetime
import json
import math
import shlex
import sys
from pathlib import Path

import torch

import cli
import evaluation
import report
import tables
import training
from errors import UserError

FOLDS = 5
# Settings that name a run, say where it is watched, or describe the machine: they may differ between a
# recorded fold and a new one without making its numbers stale.
NOT_EXPERIMENT = {"RUN_NAME", "RESUME", "DEVICE", "AMP", "CHANNELS_LAST", "COMPILE", "DATA_ROOT", "WEIGHTS_DIR",
                  "RESULTS_DIR", *training.BOOKKEEPING}
# Settings that change how a trained fold is scored, not how it is trained.
SCORING = {"THRESHOLD", "POSTPROCESS", "WATERSHED_SEED", "TTA", "SPLIT", "PROTOCOL", "EVAL_SCALE"}
# crossval.py sets these itself, fold by fold.
OWN = ("FOLD", "NUM_FOLDS", "RUN_NAME", "RESUME")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="names the fold runs: weights/<name>_fold<k>/")
    parser.add_argument("--folds", type=int, default=FOLDS, help=f"number of folds (default {FOLDS})")
    parser.add_argument("--table", default=None, help="names <results>/<table>.{md,json} (default: --name)")
    parser.add_argument("--only", default="", help="comma-separated folds to run now, e.g. 0,2 (default: all); "
                                                   "the table keeps the other folds already recorded")
    parser.add_argument("--dry-run", action="store_true", help="print what each fold would do, run nothing")
    cli.add_constant_flags(parser)
    args = parser.parse_args(argv)
    settings, given = cli.settings_from(args)
    return args, settings, given


def check_args(args, given):
    """The folds to run now (--only); every contradiction is one UserError before anything runs."""
    for name in OWN:
        if name in given:
            raise UserError(f"{cli.flag(name)} does not apply to crossval.py: it runs every fold of --folds, "
                            f"named <name>_fold<k>, and resumes unfinished folds by itself")
    if args.folds < 2:
        raise UserError(f"--folds {args.folds}: a cross-validation needs at least 2 folds")
    for text, what in ((args.name, "--name"), (args.table or args.name, "--table")):
        if not text or any(separator in text for separator in ("/", "\\")) or text in (".", ".."):
            raise UserError(f"{what} {text!r} must be a plain name, without / or \\")
    return chosen_folds(args.only, args.folds)


def chosen_folds(text, folds):
    """--only "0,2" -> [0, 2]; "" -> every fold; anything else is one clear error."""
    if not text.strip():
        return list(range(folds))
    try:
        chosen = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        chosen = []
    if not chosen or not all(0 <= fold < folds for fold in chosen):
        raise UserError(f"--only {text!r} must name folds between 0 and {folds - 1}, comma-separated (e.g. 0,2)")
    return chosen


def fold_settings(base, given, name, fold, folds):
    """The settings of fold `fold`: the command line's, with the fold, its run name and no live plots (a study
    of several runs should not wait on a visdom server; --visdom true brings them back)."""
    settings = {**base, "FOLD": fold, "NUM_FOLDS": folds, "RUN_NAME": f"{name}_fold{fold}", "RESUME": ""}
    if "VISDOM" not in given:
        settings["VISDOM"] = False
    return settings


def experiment(settings, scoring=True):
    """The settings that decide a fold's numbers (with `scoring`) or its weights (without)."""
    left_out = NOT_EXPERIMENT | (set() if scoring else SCORING)
    return {key: value for key, value in settings.items() if key not in left_out}


def recorded_settings(path):
    """The settings a final.pth or last.pth was made with; None for a file that cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["settings"]
    except Exception:  # a damaged file is left alone for its owner; the fold trains again beside it
        print(f"notice: {path} cannot be read; not using it", file=sys.stderr)
        return None


def trained_run(settings):
    """(final.pth, last.pth) of this fold, each None where there is none made with these training settings;
    looked for in weights/<run>/ and the -2, -3, ... folders training makes beside a taken name."""
    parent, run = Path(settings["WEIGHTS_DIR"]), settings["RUN_NAME"]
    folders = [parent / run] + sorted(parent.glob(f"{run}-*"), key=lambda path: path.name)
    wanted = experiment(settings, scoring=False)
    final = last = None
    for folder in folders:
        for file_name in ("final.pth", "last.pth"):
            path = folder / file_name
            if not path.is_file() or (final if file_name == "final.pth" else last) is not None:
                continue
            recorded = recorded_settings(path)
            if recorded is not None and tables.same_settings(experiment(recorded, scoring=False), wanted):
                final, last = (path, last) if file_name == "final.pth" else (final, path)
    return final, last


def fold_state(records, fold, settings):
    """What fold `fold` needs: "recorded", "score" (trained), "resume" or "train"; and its record or checkpoint."""
    record = next((record for record in records if record["fold"] == fold), None)
    if record is not None and tables.same_settings(record["settings"], experiment(settings)):
        return "recorded", record
    final, last = trained_run(settings)
    if final is not None:
        return "score", final
    return ("resume", last) if last is not None else ("train", None)


def run_fold(fold, settings, given, state, found, out):
    """Train (or continue, or reuse) and score one fold; returns its record."""
    if state in ("train", "resume"):
        run_dir = training.train({**settings, "RESUME": str(found) if state == "resume" else ""}, given)
        found = run_dir / "final.pth"
    summary, eval_dir, seconds = evaluation.evaluate(found, settings, given, out_dir=out / f"fold{fold}")
    scored = json.loads((eval_dir / "metrics.json").read_text())
    checkpoint = torch.load(found, map_location="cpu", weights_only=True)
    return {"fold": fold, "run": found.parent.name, "checkpoint": str(found), "eval_dir": str(eval_dir),
            "summary": {name: tables.finite(value["mean"]) for name, value in summary.items()},
            "per_image": scored["per_image"], "protocol": scored["protocol"],
            "train_seconds": checkpoint.get("train_seconds"), "eval_seconds": round(seconds, 1),
            "git_commit": checkpoint.get("git_commit"), "machine": checkpoint.get("machine"),
            "settings": experiment(settings), "finished": datetime.datetime.now().isoformat(timespec="seconds")}


# --- aggregation ---------------------------------------------------------------------------------------

def render_markdown(table, folds, records, totals, command):
    done = ", ".join(str(fold) for fold in totals["folds"])
    lines = [f"# {table}: {len(records)} of {folds} folds cross-validated", "",
             f"Folds done: {done or 'none'}; {totals['images']} test images in all. `{command}`", ""]
    if records:
        protocol = records[0]["protocol"]
        lines += [protocol["evaluation"], ""]
        if protocol.get("postprocess"):
            lines += [f"Post-processing: {protocol['postprocess']}", ""]
    headers = ["metric", f"mean ± std over folds (n={len(records)})",
               f"mean ± std over images (n={totals['images']})"]
    headers += [f"fold {record['fold']}" for record in records]
    body = []
    for name, over_folds in totals["over_folds"].items():
        over_images = totals["over_images"].get(name, {"mean": math.nan, "std": math.nan})
        body.append([name, mean_std(over_folds), mean_std(over_images)]
                    + [tables.number(record["summary"].get(name)) for record in records])
    return "\n".join(lines) + "\n" + report.markdown_table(headers, body)


def mean_std(stat):
    if stat["mean"] is None or math.isnan(stat["mean"]):
        return "n/a"
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}"


def write_outputs(out_root, table, folds, records, command):
    records = sorted(records, key=lambda record: record["fold"])
    totals = tables.aggregate_folds(records)
    report.write_json(out_root / f"{table}.json", {"table": table, "folds": folds, "command": command,
                                                   "aggregate": totals, "records": records})
    report.write_text(out_root / f"{table}.md", render_markdown(table, folds, records, totals, command))
    return totals


def load_records(path):
    if not path.is_file():
        return []
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is not readable JSON ({error}); move it away to start the table again")
    if not isinstance(previous, dict) or not isinstance(previous.get("records"), list):
        raise UserError(f"{path} was not written by crossval.py; move it away or choose another --table")
    return previous["records"]


def table_command(argv):
    """The command that rebuilds the whole table: --only picks the folds that run now, not the folds the table
    holds, so a table finished by `--only 1,3,4` after `--only 0,2` is not credited to its last call."""
    kept, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg == "--only":
            skip_value = True
        elif not arg.startswith("--only="):
            kept.append(arg)
    return "python crossval.py " + shlex.join(kept)


# --- main ------------------------------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    args, base, given = parse_args(argv)
    chosen = check_args(args, given)
    table = args.table or args.name
    out_root = Path(base["RESULTS_DIR"])
    json_path = out_root / f"{table}.json"
    records = load_records(json_path)
    command = table_command(argv)
    plan = []
    for fold in range(args.folds):
        settings = fold_settings(base, given, args.name, fold, args.folds)
        state, found = fold_state(records, fold, settings)
        if fold not in chosen and state != "recorded":
            state = "left out (--only)"
        plan.append((fold, settings, state, found))
        print(f"fold {fold}: {state}" + (f" ({found})" if state in ("score", "resume") else ""), flush=True)
    # The table aggregates one experiment: folds recorded with other settings (or beyond --folds) leave it.
    kept = [found for _, _, state, found in plan if state == "recorded"]
    if len(kept) < len(records):
        print(f"notice: {len(records) - len(kept)} folds recorded in {json_path} were made with other settings; "
              f"the table drops them when this run writes its first fold", file=sys.stderr)
    records = kept
    if args.dry_run:
        return
    for fold, settings, state, found in plan:
        if state not in ("train", "resume", "score"):
            continue
        record = run_fold(fold, settings, given, state, found, out_root / table)
        records = [old for old in records if old["fold"] != fold] + [record]
        totals = write_outputs(out_root, table, args.folds, records, command)
        print(f"fold {fold} done: " + ", ".join(f"{name} {tables.number(record['summary'].get(name))}"
                                                for name in list(record["summary"])[:4]), flush=True)
    totals = write_outputs(out_root, table, args.folds, records, command)
    for name, stat in list(totals["over_folds"].items())[:6]:
        print(f"{name:<20} {mean_std(stat)} over folds, {mean_std(totals['over_images'][name])} over images")
    print(f"wrote {json_path} and {out_root / f'{table}.md'} ({len(records)} of {args.folds} folds)")


if __name__ == "__main__":
    cli.run(main)
