"""Put evaluated runs side by side, with a paired per-image comparison of the first against the others.

    python compare.py results/cenet_drive_cpu results/unet_drive_cpu --name drive_cpu \
        --title "DRIVE on a 2-core CPU: CE-Net vs U-Net, cpu recipe"

    python compare.py results/fullnet_drive_cpu --carry results/drive_cpu.json --name drive_cpu
    python compare.py results/new_cenet --carry results/drive_cpu.json --carry-after --name drive_cpu

Each argument is a folder test.py wrote, or a <table>.json crossval.py wrote (one cross-validated run: its
folds' test images together, paired image by image with another table over the same images):

    python compare.py results/isbi_elastic_wmap.json results/isbi_backbone.json --name isbi2012_cpu

--carry puts the runs of a table written before first, or after
the new ones with --carry-after (their per-image numbers are in it, so their checkpoints and folders need
not be on this disk). Writes
<out>/<name>.json and <out>/<name>.md (mean ± std per model, the paired differences with Wilcoxon
signed-rank p-values, wall times, commands, machine) and copies the first run's ROC plot, one overlay
and its training curve to <out>/figures/.
"""
import argparse

import cli
import comparison


def folds_list(text):
    try:
        folds = sorted({int(word) for word in text.split(",") if word.strip()})
    except ValueError:
        folds = []
    if not folds:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of fold numbers, e.g. 0,2")
    return folds


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="test.py output folders or crossval.py <table>.json files; the first is "
                                                    "compared with each other")
    parser.add_argument("--carry", default=None,
                        help="a <name>.json compare.py wrote: its runs come first, so new runs join a table "
                             "whose checkpoints or test.py folders are gone")
    parser.add_argument("--carry-after", action="store_true",
                        help="put the carried runs after the new ones, so the first new run is the reference "
                             "every other run is paired with (and its figures are the table's)")
    parser.add_argument("--name", default="comparison", help="file name of the table (default: comparison)")
    parser.add_argument("--title", default=None,
                        help="the table's heading (default: the --carry table's, else 'Evaluated runs side by side')")
    parser.add_argument("--out", default="results", help="folder for <name>.json, <name>.md and figures/")
    parser.add_argument("--overlay", default="01", help="which test image's overlay to copy (default: 01)")
    parser.add_argument("--folds", type=folds_list, default=None,
                        help="comma-separated folds: only those folds of each crossval.py table (e.g. 0, to set "
                             "a lever measured on fold 0 beside fold 0 of a finished table)")
    parser.add_argument("--note", action="append", default=[],
                        help="a sentence for the table's 'How these were made' list (repeatable)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    json_path, md_path = comparison.write(args.name, args.title, args.runs, args.out, args.overlay,
                                           args.note, carry=args.carry, carry_after=args.carry_after,
                                           folds=args.folds)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    cli.run(main)
