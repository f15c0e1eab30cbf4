"""Which images are training and which are test: split lists, or a seeded k-fold split."""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from errors import UserError
from tasks.files import IMAGE_SUFFIXES, natural_key


@dataclass(frozen=True)
class SplitOptions:
    """The settings that decide which images a split holds, how they are cut and how their labels read."""
    fold: int = 0            # FOLD: which fold is the test set, for datasets evaluated by k-fold
    num_folds: int = 5       # NUM_FOLDS
    crop_size: int = 800     # CROP_SIZE: optic disc crop side (ORIGA, Messidor)
    folder_classes: int = 0  # FOLDER_CLASSES: --dataset folder's declared class count (0: its labels decide)
    class_values: tuple = ()  # CLASS_VALUES: stored label values of classes 0..K-1, as a run recorded them
    label_threshold: int = 0  # LABEL_THRESHOLD: --dataset folder reads binary masks as value >= it (0: as stored)

    @classmethod
    def from_settings(cls, settings):
        return cls(fold=settings["FOLD"], num_folds=settings["NUM_FOLDS"], crop_size=settings["CROP_SIZE"],
                   folder_classes=settings.get("FOLDER_CLASSES", 0),
                   class_values=tuple(settings.get("CLASS_VALUES") or ()),
                   label_threshold=settings.get("LABEL_THRESHOLD", 0))


SPLIT_SEED = 2019


def read_id_list(path):
    """Ids of a split list, one per line. A folder or an image suffix on a line is dropped (so
    `001`, `001.jpg` and `images/001.jpg` all name image 001); later columns and #-comments are
    ignored."""
    ids = []
    for line in path.read_text().splitlines():
        fields = line.split("#")[0].split()
        if not fields:
            continue
        entry = Path(fields[0].replace("\\", "/")).name
        if Path(entry).suffix.lower() in IMAGE_SUFFIXES:
            entry = Path(entry).stem
        if entry not in ids:
            ids.append(entry)
    return ids


def listed_names(list_path, available, image_dir):
    """The ids of a split list, each of which must be an image in `image_dir`."""
    names = read_id_list(list_path)
    if not names:
        raise UserError(f"split list {list_path} names no images; put one image id per line")
    missing = [name for name in names if name not in available]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"split list {list_path} names {missing[0]!r}{more}, but {image_dir} has no such "
                        f"image; restore the file or remove the line")
    return names


def check_folds(fold, folds, count):
    if folds < 2:
        raise UserError(f"NUM_FOLDS is {folds}, but a k-fold split needs at least 2 (e.g. --num-folds 5)")
    if not 0 <= fold < folds:
        raise UserError(f"FOLD {fold} is outside 0..{folds - 1}; pass --fold between 0 and {folds - 1}")
    if folds > count:
        raise UserError(f"{count} images cannot be split into {folds} folds; lower --num-folds")


def fold_names(names, split, options, groups=None, contiguous=False):
    """The names in one split of a k-fold cross-validation: fold FOLD of NUM_FOLDS is the test set,
    the other folds the training set.

    Names are shuffled with SPLIT_SEED and dealt round-robin into the folds, one group after the
    other (`groups`: name -> group, e.g. RIM-ONE's diagnosis), so every fold gets the same mix and
    sizes differ by at most one. `contiguous` cuts the natural order into blocks instead: neighbouring
    slices of one volume are near-duplicates and must not sit on both sides of the split.
    """
    fold, folds = options.fold, options.num_folds
    check_folds(fold, folds, len(names))
    names = sorted(names, key=natural_key)
    if contiguous:
        fold_of = {name: index * folds // len(names) for index, name in enumerate(names)}
    else:
        groups = groups or {}
        generator = np.random.default_rng(SPLIT_SEED)
        order = []
        for group in sorted({groups.get(name, "") for name in names}):
            members = [name for name in names if groups.get(name, "") == group]
            order.extend(members[index] for index in generator.permutation(len(members)))
        fold_of = {name: index % folds for index, name in enumerate(order)}
    in_test = split == "test"
    return [name for name in names if (fold_of[name] == fold) == in_test]


def split_names(root, split, options, images, image_dir, list_files):
    """Names of `split`: from the dataset's train/test lists when both are there, else k-fold."""
    present = [root / name for name in list_files if (root / name).is_file()]
    if len(present) == len(list_files):
        return listed_names(present[0] if split == "train" else present[1], images, image_dir)
    if present:
        missing = next(name for name in list_files if not (root / name).is_file())
        raise UserError(f"found {present[0]} but not {root / missing}; give both split lists, or neither "
                        f"to use the k-fold split (FOLD, NUM_FOLDS)")
    return fold_names(list(images), split, options)

