"""The paper's five tasks: one module per task holds its readers and its scoring, and `DATASETS`
maps each dataset name to them. Adding a dataset means one module and one line here.

Every reader returns a list of `Sample`s at native resolution: an RGB uint8 image, an integer class
map (0 = background; 1 = foreground for binary tasks; 0..K-1 for multi-class) and, where the dataset
ships one, a field-of-view mask. docs/datasets.md gives each dataset's layout and source.
"""
from pathlib import Path

from errors import UserError
from tasks.drive import DRIVE
from tasks.em_cells import ISBI2012
from tasks.glas import GLAS
from tasks.lung import LUNG
from tasks.oct import OCT
from tasks.optic_disc import MESSIDOR, ORIGA, RIMONE
from tasks.sample import Dataset, Sample
from tasks.splits import SplitOptions

DATASETS = {
    "drive": DRIVE,
    "origa": ORIGA,
    "messidor": MESSIDOR,
    "rimone": RIMONE,
    "lung": LUNG,
    "isbi2012": ISBI2012,
    "oct": OCT,
    "glas": GLAS,
}

__all__ = ["DATASETS", "Dataset", "Sample", "SplitOptions", "dataset", "load_split"]


def dataset(name):
    """The registry entry of dataset `name`, or one clear error listing the known names."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def load_split(name, root, split, options):
    """Read the `split` ("train" or "test") of dataset `name` under `root`, with clear errors."""
    spec = dataset(name)
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"dataset root {root} does not exist. Download it from {spec.source} and unpack it "
                        f"there, or pass --data-root PATH")
    samples = spec.reader(root, split, options)
    if not samples:
        raise UserError(f"no {split} images found under {root}")
    return samples
