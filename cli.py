"""Command-line overrides of constants.py, range checks, and the one-line error convention of every script.

Settings resolve in this order: constants.py, then the named RECIPE's overrides (recipes.py), then the
flags given on the command line. A script reads them once, at its top, and passes them inward.
"""
import argparse
import sys

import constants
import recipes
from fov import FOV_SCALE_RULES
from data import AUGMENTATIONS, PREPROCESSINGS
from errors import UserError
from loss import BORDER_CELLS
from tasks.em_cells import POSTPROCESSINGS


def _parse_bool(text):
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def constant_names():
    return [name for name in vars(constants) if name.isupper()]


def default_settings():
    """Every constant as constants.py sets it, before a recipe or the command line."""
    return {name: getattr(constants, name) for name in constant_names()}


def flag(name):
    return "--" + name.lower().replace("_", "-")


def add_constant_flags(parser):
    """One flag per constant: IMAGE_SIZE becomes --image-size, typed like its default."""
    group = parser.add_argument_group("constants (defaults from constants.py)")
    for name in constant_names():
        default = getattr(constants, name)
        kind = _parse_bool if isinstance(default, bool) else type(default)
        group.add_argument(flag(name), dest=name, type=kind, default=None,
                           metavar=type(default).__name__.upper(), help=f"default: {default!r}")
    return parser


def settings_from(args):
    """(settings, given): every constant as a plain dict after the recipe and the command line, and the
    set of names the command line gave explicitly."""
    settings = default_settings()
    given = {name for name in settings if getattr(args, name, None) is not None}
    for name in given:
        settings[name] = getattr(args, name)
    recipe = settings["RECIPE"]
    if recipe:
        if recipe not in recipes.RECIPES:
            raise UserError(f"unknown recipe {recipe!r}; choose one of: {', '.join(recipes.RECIPES)}")
        for name, value in recipes.RECIPES[recipe].items():
            if name not in given:
                settings[name] = value
    check_ranges(settings)
    return settings, frozenset(given)


ADAPT_BN_CHOICES = ("none", "train", "scored")


def _scale_factor(text):
    """EVAL_SCALE as a number in PATCH_SCALE's range, or None."""
    try:
        factor = float(text)
    except ValueError:
        return None
    return factor if 0.25 <= factor <= 4 else None


# name -> (test, what the value must be); checked before any data is read.
RANGES = {
    "BATCH_SIZE": (lambda value: value >= 1, "at least 1"),
    "EPOCHS": (lambda value: value >= 1, "at least 1"),
    "LR": (lambda value: value > 0, "greater than 0"),
    "MOMENTUM": (lambda value: 0 <= value < 1, "in [0, 1)"),
    "WEIGHT_DECAY": (lambda value: value >= 0, "at least 0"),
    "POLY_POWER": (lambda value: value >= 0, "at least 0"),
    "WARMUP_STEPS": (lambda value: value >= 0, "at least 0"),
    "LOG_EVERY": (lambda value: value >= 1, "at least 1"),
    "CHECKPOINT_EVERY": (lambda value: value >= 0, "at least 0 (0: only when stopped)"),
    "CHECKPOINT_MIN_SECONDS": (lambda value: value >= 0, "at least 0"),
    "SNAPSHOT_EVERY": (lambda value: value >= 0, "at least 0 (0: no snapshots)"),
    "THRESHOLD": (lambda value: 0 < value < 1, "strictly between 0 and 1"),
    "IMAGE_SIZE": (lambda value: value > 0 and value % 32 == 0, "a positive multiple of 32, e.g. 448"),
    "PATCH_SIZE": (lambda value: value >= 0 and value % 32 == 0, "0 or a positive multiple of 32, e.g. 256"),
    "PATCH_SCALE": (lambda value: 0.25 <= value <= 4, "in [0.25, 4], e.g. 1.5"),
    "NUM_FOLDS": (lambda value: value >= 2, "at least 2"),
    "CROP_SIZE": (lambda value: value > 0, "greater than 0"),
    "VISDOM_PORT": (lambda value: 0 < value < 65536, "a port number"),
    "AUGMENT": (lambda value: value in AUGMENTATIONS, " or ".join(AUGMENTATIONS)),
    "PREPROCESS": (lambda value: value in PREPROCESSINGS, " or ".join(PREPROCESSINGS)),
    "ELASTIC_ALPHA": (lambda value: value >= 0, "at least 0 (0: no deformation)"),
    "ELASTIC_SPACING": (lambda value: value >= 8, "at least 8 px"),
    "BORDER_W0": (lambda value: value >= 0, "at least 0 (0: class balance only)"),
    "BORDER_SIGMA": (lambda value: value > 0, "greater than 0"),
    "BORDER_CELLS": (lambda value: value in BORDER_CELLS, " or ".join(BORDER_CELLS)),
    "POSTPROCESS": (lambda value: value in POSTPROCESSINGS, " or ".join(POSTPROCESSINGS)),
    "WATERSHED_SEED": (lambda value: 0 < value < 1, "strictly between 0 and 1"),
    "PROTOCOL": (lambda value: value in ("ours", "authors"), "ours or authors"),
    "SPLIT": (lambda value: value in ("test", "train", "all"), "test, train or all"),
    "ADAPT_BN": (lambda value: value in ADAPT_BN_CHOICES, " or ".join(ADAPT_BN_CHOICES)),
    "EVAL_SCALE": (lambda value: value in FOV_SCALE_RULES or _scale_factor(value) is not None,
                   "auto, field or a number in [0.25, 4], e.g. 1"),
}


def check_ranges(settings):
    """One UserError for the first setting out of its range, naming the flag."""
    for name, (valid, what) in RANGES.items():
        if name in settings and not valid(settings[name]):
            raise UserError(f"{flag(name)} {settings[name]} is out of range: it must be {what}")
    if any(separator in settings.get("RUN_NAME", "") for separator in ("/", "\\")) \
            or settings.get("RUN_NAME") in (".", ".."):
        raise UserError(f"--run-name {settings['RUN_NAME']!r} must be a plain folder name, without / or \\")


def run(main_function):
    """Call main_function(); a UserError or Ctrl-C becomes one line on stderr and a non-zero exit."""
    try:
        main_function()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
