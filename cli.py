"""Command-line overrides of constants.py, and the one-line error convention of every script."""
import argparse
import sys

import constants
import recipes


class UserError(Exception):
    """A problem the user can fix (bad path, bad flag, wrong checkpoint). Printed as one line, exit 2."""


def _parse_bool(text):
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def constant_names():
    return [name for name in vars(constants) if name.isupper()]


def add_constant_flags(parser):
    """One flag per constant: IMAGE_SIZE becomes --image-size, typed like its default."""
    group = parser.add_argument_group("constants (defaults from constants.py)")
    for name in constant_names():
        default = getattr(constants, name)
        kind = _parse_bool if isinstance(default, bool) else type(default)
        group.add_argument("--" + name.lower().replace("_", "-"), dest=name, type=kind, default=None,
                           metavar=type(default).__name__.upper(), help=f"default: {default!r}")
    return parser


def settings_from(args):
    """Constants as a plain dict: constants.py, then the named RECIPE's overrides, then the command line."""
    settings = {name: getattr(constants, name) for name in constant_names()}
    overridden = {name for name in settings if getattr(args, name, None) is not None}
    for name in overridden:
        settings[name] = getattr(args, name)
    recipe = settings["RECIPE"]
    if recipe:
        if recipe not in recipes.RECIPES:
            raise UserError(f"unknown recipe {recipe!r}; choose one of: {', '.join(recipes.RECIPES)}")
        for name, value in recipes.RECIPES[recipe].items():
            if name not in overridden:
                settings[name] = value
    settings["_OVERRIDDEN"] = sorted(overridden)
    return settings


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
