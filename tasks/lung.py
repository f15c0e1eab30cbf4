"""Lung CT (paper, Table III): the Kaggle "Finding and Measuring Lungs in CT Data" reader and scoring."""
from metrics import as_device_tensor, foreground_mask, overlap_error, threshold_metrics
from tasks.files import MASK_SUFFIXES, TIFF_SUFFIXES, files_by_stem, image_files, read_binary_label, read_pairs, \
    read_scan, require_dir
from tasks.sample import Dataset
from tasks.splits import fold_names


def read_lung(root, split, options):
    """Kaggle "Finding and Measuring Lungs in CT Data": 2d_images/*.tif and same-name 2d_masks/*.tif;
    k-fold (FOLD picks which fifth is the test set)."""
    image_dir = require_dir(root / "2d_images", "lung CT images")
    mask_dir = require_dir(root / "2d_masks", "lung masks")
    images = image_files(image_dir, TIFF_SUFFIXES)
    names = fold_names(list(images), split, options)
    masks = files_by_stem(mask_dir, MASK_SUFFIXES)
    return read_pairs(names, images, masks, mask_dir, read_scan, read_binary_label)


def score_lung(prob, sample, threshold):
    """Lung CT (paper, Table III): overlap error E, accuracy and sensitivity over the whole slice."""
    predicted, truth = foreground_mask(prob, threshold), sample.label > 0
    counts = threshold_metrics(prob[0].float(), as_device_tensor(truth, prob.device), None, threshold)
    return {"E": overlap_error(predicted, truth), "Acc": counts["Acc"], "Sen": counts["Sen"]}, None


NOTES = 'Lung CT (paper Table III): overlap error E, accuracy and sensitivity of the thresholded prediction over every pixel of the slice at its original resolution.'

LUNG = Dataset(read_lung, num_classes=1, score=score_lung, notes=NOTES,
               source="Kaggle, https://www.kaggle.com/datasets/kmader/finding-lungs-in-ct-data")
