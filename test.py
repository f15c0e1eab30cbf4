"""Evaluate a checkpoint on its dataset's test split, the paper's way.

    python test.py                                   # newest weights/*/final.pth
    python test.py --checkpoint weights/released/cenet_drive_cpu.pth --data-root ../DRIVE
    # a DRIVE model scored on CHASE_DB1, without retraining (docs/datasets.md):
    python test.py --checkpoint weights/released/cenet_drive_cpu_clahe.pth --dataset chase --data-root ../CHASEDB1 --eval-scale field

Predicts every test image with 8-way flip test-time augmentation at the checkpoint's input size (or whole,
at native resolution, for a model trained on crops), scores the probabilities at the original resolution
with the task's metrics (DRIVE: AUC, Acc, Sen, Spe, F1 over the whole image and inside the field-of-view
mask) and writes to results/<run>/: probability maps, binary masks and overlays as PNG, a ROC plot,
metrics.json and metrics.md. Model settings come from the checkpoint; device, threshold, TTA and
folders from constants.py and the flags given here. --dataset may name another dataset of the checkpoint's
family (drive <-> chase), --eval-scale auto brings its images to the training set's field-of-view size,
--eval-scale field also to its pixels per degree of retina, --adapt-bn train measures the model's BatchNorm
statistics again on that dataset's training images (labels unused) before predicting, and --split all scores
training and test images (docs/datasets.md).
"""
import argparse
import sys
from pathlib import Path

import cli
import evaluation
import framework


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="a final.pth from main.py (default: the newest one)")
    parser.add_argument("--out", default=None, help="output folder (default: results/<run name>, never reused)")
    cli.add_constant_flags(parser)
    args = parser.parse_args(argv)
    settings, given = cli.settings_from(args)
    return args, settings, given


def main(argv=None):
    args, settings, given = parse_args(argv)
    checkpoint = Path(args.checkpoint) if args.checkpoint else framework.latest_checkpoint(settings["WEIGHTS_DIR"])
    if not args.checkpoint:
        print(f"evaluating the newest checkpoint, {checkpoint}", file=sys.stderr)
    summary, out, seconds = evaluation.evaluate(checkpoint, settings, given, args.out)
    width = max(len(key) for key in summary)
    for key, value in summary.items():
        print(f"{key:<{width}}  {value['mean']:.4f} ± {value['std']:.4f}")
    print(f"wrote {out} ({seconds:.2f}s after loading the model)")


if __name__ == "__main__":
    cli.run(main)
