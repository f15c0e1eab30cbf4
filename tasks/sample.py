"""What every reader returns, and what the registry knows of each dataset."""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np


@dataclass
class Sample:
    name: str
    image: np.ndarray                 # (H, W, 3) uint8
    label: np.ndarray                 # (H, W) uint8 class map
    fov: Optional[np.ndarray] = None  # (H, W) bool, True inside the field of view
    experts: Optional[np.ndarray] = None  # (E, H, W) bool, each expert's own mask (RIM-ONE; CHASE_DB1: both annotators)
    instances: Optional[np.ndarray] = None  # (H, W) int instance ids, 0 = none (GlaS)



@dataclass(frozen=True)
class Dataset:
    reader: Callable        # reader(root: Path, split: "train" | "test", options: SplitOptions) -> list[Sample]
    num_classes: int        # model output channels: 1 = binary (sigmoid), K >= 2 softmax; 0 = label_values decides
    score: Callable         # score(prob (K, H, W) at native size, sample, threshold) -> (row, ROC curve or None)
    notes: str              # how score() measures, written beside every results table
    source: str             # where a user gets the data (printed when it is missing)
    # The authors' evaluation protocol (--protocol authors), where their code has one for this dataset:
    # authors_score(prob (K, S, S) at the network's size, sample, threshold) -> (row, prob at native size).
    authors_score: Optional[Callable] = None
    authors_notes: str = ""
    # Datasets of one family ("fundus vessels") segment the same thing in the same kind of image, so a model
    # trained on one may be evaluated on another (test.py --dataset, no retraining). "": its own family only.
    family: str = ""
    # Fundus datasets: the field-of-view diameter (px) of their images at native resolution, which
    # --eval-scale auto (test.py) and --scale auto (predict.py) bring other photographs to for this
    # dataset's models. None: not a fundus dataset (those options then refuse with one line).
    fov_diameter: Optional[float] = None
    # The camera's field angle (degrees across the FOV) where the dataset's paper states it: with fov_diameter
    # it gives pixels per degree of retina, which --eval-scale field matches between two datasets.
    field_degrees: Optional[float] = None
    # A dataset whose labels decide its classes (folder) has num_classes 0 and this instead:
    # label_values(root: Path, options: SplitOptions) -> the stored label values of classes 0..K-1. It is asked
    # once, before training; the run's settings record the answer as CLASS_VALUES (settings.json and the
    # checkpoint), and the reader reads every label with them, so test.py maps values as training did.
    label_values: Optional[Callable] = None
    # Settings that score() also takes, as keyword arguments named in lower case (isbi2012: POSTPROCESS ->
    # postprocess=...); evaluation passes them and records them in metrics.json. A dataset without one refuses
    # such a setting given on the command line.
    score_settings: tuple = ()
    # The POSTPROCESS values this dataset's scoring knows (with "POSTPROCESS" in score_settings), checked before
    # anything is predicted.
    postprocessings: tuple = ("none",)
    # Pictures beyond probability / mask / overlay that evaluation saves per image as <name>_<key>.png:
    # extra_pictures(prob (K, H, W) tensor, sample, threshold, **score settings) -> {key: (H, W, 3) uint8}.
    extra_pictures: Optional[Callable] = None
    # Binary datasets whose headline F1 counts pixels above the threshold: that F1 at each of a grid of thresholds,
    # f1_by_threshold(prob (1, H, W) tensor, sample, thresholds) -> (its key in score()'s row, 1-D tensor), so
    # test.py can say which threshold serves these images best (to be chosen on training images, --split train).
    f1_by_threshold: Optional[Callable] = None
    # Binary datasets whose predicted mask is more than probability above the threshold (isbi2012's
    # POSTPROCESS): predicted_mask(prob (1, H, W) tensor, threshold, **score settings) -> (H, W) bool. predict.py
    # writes this mask, so it matches what test.py scores. None: probability above the threshold.
    predicted_mask: Optional[Callable] = None
    # Another dataset whose test images and reference this one scores in the same way, only with other training
    # labels (monuseg_contour: monuseg), so compare.py pairs their runs image by image. "": none.
    scores_like: str = ""
    # Datasets of serial sections whose images are each slice with its two neighbours as red and blue
    # (isbi2012_stack): predict.py then builds its inputs the same way from the pages or files it is given.
    stacks_slices: bool = False
    # The paper's figures for this dataset, where it reports some, for results tables to print beside ours:
    # {"source": where and in which setting they were measured, "figures": {model: {metric: value}}}.
    paper: Optional[dict] = None

    def with_classes(self, settings):
        """`settings` with CLASS_VALUES decided, for a dataset whose labels decide its classes and settings that
        do not hold them yet (a new run, or a bare state dict); otherwise `settings` themselves."""
        if self.label_values is None or settings.get("CLASS_VALUES"):
            return settings
        from tasks.splits import SplitOptions  # tasks.splits imports this module
        values = self.label_values(Path(settings["DATA_ROOT"]), SplitOptions.from_settings(settings))
        return {**settings, "CLASS_VALUES": list(values)}

    def outputs(self, settings):
        """Model output channels for a run with `settings`: num_classes, or from CLASS_VALUES 1 for two classes
        (binary, sigmoid) and K for K >= 3 (softmax)."""
        if self.label_values is None:
            return self.num_classes
        count = len(self.with_classes(settings)["CLASS_VALUES"])
        return 1 if count == 2 else count
