"""The paper's five tasks: one module per task holds its readers and its scoring, and `DATASETS`
maps each dataset name to them. Adding a dataset means one module and one line here.

Every reader returns a list of `Sample`s at native resolution: an RGB uint8 image, an integer class
map (0 = background; 1 = foreground for binary tasks; 0..K-1 for multi-class) and, where the dataset
ships one, a field-of-view mask. docs/datasets.md gives each dataset's layout and source.
"""
from pathlib import Path

from errors import UserError
from tasks.chase import CHASE
from tasks.drishti import DRISHTI, DRISHTI_CUP
from tasks.drive import DRIVE
from tasks.em_cells import ISBI2012, ISBI2012_STACK
from tasks.folder import FOLDER
from tasks.glas import GLAS
from tasks.lung import LUNG
from tasks.monuseg import MONUSEG, MONUSEG_CONTOUR
from tasks.oct import OCT
from tasks.optic_disc import MESSIDOR, ORIGA, RIMONE
from tasks.sample import Dataset, Sample
from tasks.splits import SplitOptions

DATASETS = {
    "drive": DRIVE,
    "chase": CHASE,
    "origa": ORIGA,
    "messidor": MESSIDOR,
    "rimone": RIMONE,
    "drishti": DRISHTI,
    "drishti_cup": DRISHTI_CUP,
    "lung": LUNG,
    "isbi2012": ISBI2012,
    "isbi2012_stack": ISBI2012_STACK,
    "oct": OCT,
    "glas": GLAS,
    "monuseg": MONUSEG,
    "monuseg_contour": MONUSEG_CONTOUR,
    "folder": FOLDER,
}

__all__ = ["DATASETS", "Dataset", "Sample", "SplitOptions", "dataset", "load_split"]


def fundus_datasets():
    """The datasets of fundus photographs: those whose field-of-view diameter is known."""
    return [name for name, spec in DATASETS.items() if spec.fov_diameter is not None]


def dataset(name):
    """The registry entry of dataset `name`, or one clear error listing the known names."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


SPLITS = ("train", "test", "all")  # "all": the training images then the test images (test.py --split all)


def load_split(name, root, split, options):
    """Read the `split` ("train", "test" or "all") of dataset `name` under `root`, with clear errors."""
    spec = dataset(name)
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"dataset root {root} does not exist. Download it from {spec.source} and unpack it "
                        f"there, or pass --data-root PATH")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if split == "all":  # every reader knows its train and test halves; "all" is their union, in that order
        samples = spec.reader(root, "train", options) + spec.reader(root, "test", options)
    else:
        samples = spec.reader(root, split, options)
    if not samples:
        raise UserError(f"no {split} images found under {root}")
    return samples
