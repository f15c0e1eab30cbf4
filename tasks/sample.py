"""What every reader returns, and what the registry knows of each dataset."""
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np


@dataclass
class Sample:
    name: str
    image: np.ndarray                 # (H, W, 3) uint8
    label: np.ndarray                 # (H, W) uint8 class map
    fov: Optional[np.ndarray] = None  # (H, W) bool, True inside the field of view
    experts: Optional[np.ndarray] = None  # (E, H, W) bool, each expert's own mask (RIM-ONE)
    instances: Optional[np.ndarray] = None  # (H, W) int instance ids, 0 = none (GlaS)



@dataclass(frozen=True)
class Dataset:
    reader: Callable        # reader(root: Path, split: "train" | "test", options: SplitOptions) -> list[Sample]
    num_classes: int        # model output channels: 1 = binary (sigmoid), K >= 2 softmax
    score: Callable         # score(prob (K, H, W) at native size, sample, threshold) -> (row, ROC curve or None)
    notes: str              # how score() measures, written beside every results table
    source: str             # where a user gets the data (printed when it is missing)
    # The authors' evaluation protocol (--protocol authors), where their code has one for this dataset:
    # authors_score(prob (K, S, S) at the network's size, sample, threshold) -> (row, prob at native size).
    authors_score: Optional[Callable] = None
    authors_notes: str = ""
