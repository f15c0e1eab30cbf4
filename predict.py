"""Segment any images with a released or trained model.

    python predict.py photo.jpg scans/ -o predictions/          # the released DRIVE CE-Net
    python predict.py fundus/ -o out/ --scale auto               # large fundus photographs, DRIVE-sized
    python predict.py DRIVE/test/images -o out/ --fov DRIVE/test/mask --save-float
    python predict.py slices/ -o out/ --checkpoint weights/RUN/final.pth --tta false

Writes, per image, <name>_prob.png, <name>_mask.png and <name>_overlay.png (multi-class models:
<name>_classes.png and <name>_overlay.png), with --save-float also <name>_prob.tif, and predictions.csv
(input, size, field of view and scale used, foreground fraction, seconds). The model sees every image
as test.py shows a test image. Fundus models (DRIVE, CHASE) mask out everything outside the field of
view, estimated from the image (--fov auto) or read from a folder of masks. OUT must be new or empty
unless --overwrite. Files that cannot be read are skipped with a warning, and the exit status is then 1.
prediction.py's docstring gives the details (image formats, --fov, --scale).
"""
import argparse
import sys

import cli
import prediction


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and folders of images")
    parser.add_argument("-o", "--out", required=True, help="output folder (new or empty, unless --overwrite)")
    parser.add_argument("--checkpoint", default=str(prediction.DEFAULT_CHECKPOINT),
                        help="model to predict with (default: %(default)s)")
    parser.add_argument("--fov", default=None, metavar="auto|none|DIR",
                        help="field of view: estimated (auto, the default for DRIVE and CHASE models), the whole "
                             "image (none, the default for others), or a folder of masks named by image stem")
    parser.add_argument("--scale", default="1", metavar="auto|FACTOR",
                        help="resize factor before prediction; auto: bring the field of view to DRIVE's "
                             "diameter (default: 1, the image's own size)")
    parser.add_argument("--save-float", action="store_true", help="also write float32 <name>_prob.tif")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT, replacing "
                                                                  "same-named files")
    cli.add_constant_flags(parser)  # --tta, --threshold, --device, --amp, --channels-last, ...
    args = parser.parse_args(argv)
    settings, given = cli.settings_from(args)
    return args, settings, given


def main(argv=None):
    """Returns the exit status: 0, or 1 when some inputs could not be read."""
    args, settings, given = parse_args(argv)
    rows, skipped, out = prediction.predict_files(args.inputs, args.out, args.checkpoint, settings, given,
                                                  fov_text=args.fov, scale_text=args.scale,
                                                  save_float=args.save_float, overwrite=args.overwrite)
    print(f"wrote {len(rows)} image{'s' if len(rows) != 1 else ''} to {out} (predictions.csv lists them)")
    if skipped:
        print(f"{len(skipped)} input{'s' if len(skipped) != 1 else ''} could not be read and "
              f"{'were' if len(skipped) != 1 else 'was'} skipped (see the warnings above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run(lambda: sys.exit(main()))
