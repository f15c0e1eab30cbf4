"""Retinal OCT layers (paper, Table V): reader of PNG label maps and boundary-error scoring."""
import numpy as np

from metrics import boundary_mae, nanmean_rows
from tasks.files import IMAGE_SUFFIXES, MASK_SUFFIXES, check_class_range, files_by_stem, image_files, \
    read_class_map, read_image, read_pairs, require_dir
from tasks.sample import Dataset
from tasks.splits import split_names

OCT_CLASSES = 11  # 10 layer boundaries, ILM to BM, separate 11 regions


def read_oct_label(path):
    label = read_class_map(path)
    check_class_range(label, path, "oct", OCT_CLASSES)
    return label.astype(np.uint8)


def read_oct(root, split, options):
    """Retinal OCT layers: images/<name>.png (grey B-scan), labels/<name>.png (0 above the ILM ...
    10 below the BM); train.txt/test.txt if present, else k-fold."""
    image_dir = require_dir(root / "images", "OCT images")
    label_dir = require_dir(root / "labels", "OCT labels")
    images = image_files(image_dir, IMAGE_SUFFIXES)
    names = split_names(root, split, options, images, image_dir, ("train.txt", "test.txt"))
    labels = files_by_stem(label_dir, MASK_SUFFIXES)
    return read_pairs(names, images, labels, label_dir, read_image, read_oct_label)


def score_layers(prob, sample, threshold):
    """Retinal OCT layers (paper, Table V): mean absolute error in pixels of each of the K - 1 layer
    boundaries of the predicted class map (argmax), and their mean. The threshold plays no part."""
    predicted = prob.argmax(0).cpu().numpy()
    errors = boundary_mae(predicted, sample.label, prob.shape[0])
    row = {f"MAE b{number}": float(error) for number, error in enumerate(errors, start=1)}
    row["MAE mean"] = float(nanmean_rows(errors[None])[0])
    return row, None


NOTES = "Retinal OCT layers (paper Table V): mean absolute error in pixels of the row of each layer boundary per column, b1 = ILM (top) ... b10 = BM/choroid (bottom), from the argmax class map; 'MAE mean' averages the boundaries."

OCT = Dataset(read_oct, num_classes=OCT_CLASSES, score=score_layers, notes=NOTES,
              source="a retinal OCT layer set exported as PNG label maps (see docs/datasets.md)")
