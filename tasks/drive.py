"""DRIVE retinal vessels (paper, Table II): reader and scoring."""
from pathlib import Path

import numpy as np
import torch

import data
import fov
from errors import UserError

from metrics import (as_device_tensor, binary_metrics, binary_metrics_and_roc, f1_by_threshold, roc_auc, thin_curve,
                     threshold_metrics)
from tasks.files import check_same_size, read_image, read_mask, require_dir
from tasks.sample import Dataset, Sample


def read_drive(root, split, options):
    """DRIVE: training/{images,1st_manual} and test/{images,1st_manual,mask}.

    Image `21_training.tif` pairs with `1st_manual/21_manual1.gif`; test image `01_test.tif` with
    `1st_manual/01_manual1.gif` and the field-of-view mask `mask/01_test_mask.gif`. The test split is
    scored against the first annotator, as in the paper. Training masks (`training/mask/21_training_mask.gif`)
    are read when that folder is there; without them (some copies leave them out) scoring the training images
    (--split train) estimates each one's field of view from the image.
    """
    split = {"train": "training", "test": "test"}[split]
    folder = require_dir(Path(root) / split, f"DRIVE {split}")
    image_dir = require_dir(folder / "images", f"DRIVE {split} images")
    label_dir = require_dir(folder / "1st_manual", f"DRIVE {split} labels")
    mask_dir = folder / "mask"
    if split == "test":
        require_dir(mask_dir, "DRIVE test field-of-view mask")
    # Hidden files (macOS "._01_test.tif" resource forks) are not images.
    image_paths = sorted(path for path in image_dir.glob(f"*_{split}.tif") if not path.name.startswith("."))
    if not image_paths:
        raise UserError(f"no *_{split}.tif images in {image_dir}")
    samples = []
    for image_path in image_paths:
        number = image_path.name.split("_")[0]
        label_path = label_dir / f"{number}_manual1.gif"
        if not label_path.is_file():
            raise UserError(f"label {label_path} missing for image {image_path}")
        image, label = read_image(image_path), read_mask(label_path)
        check_same_size(image, label, image_path, label_path)
        field = None  # scoring estimates it when there is no mask (score_vessels)
        if mask_dir.is_dir():
            mask_path = mask_dir / f"{number}_{split}_mask.gif"
            if not mask_path.is_file():
                raise UserError(f"field-of-view mask {mask_path} missing for image {image_path}")
            field = read_mask(mask_path)
            check_same_size(image, field, image_path, mask_path)
        samples.append(Sample(number, image, label.astype(np.uint8), field))
    return samples



def field_of_view(sample, device):
    """The sample's FOV mask, or one estimated from its image (DRIVE training images without training/mask)."""
    field = sample.fov if sample.fov is not None else fov.estimate_fov(sample.image)
    return as_device_tensor(field, device)


def f1_by_threshold_in_fov(prob, sample, thresholds):
    """score_vessels' FOV F1 at each of `thresholds` (Dataset.f1_by_threshold)."""
    foreground = prob[0].float()
    label = as_device_tensor(sample.label > 0, foreground.device)
    return "FOV F1", f1_by_threshold(foreground, label, field_of_view(sample, foreground.device), thresholds)


def score_vessels(prob, sample, threshold):
    """DRIVE-style scoring: AUC, Acc, Sen, Spe, F1 over the whole image and inside the FOV mask.

    The FOV figures are the field's standard; whole-image figures count the easy black border
    as true negatives and run higher. Returns the row and the inside-FOV ROC curve for plotting.
    """
    foreground = prob[0].float()
    label = as_device_tensor(sample.label > 0, foreground.device)
    row = {f"whole {key}": value for key, value in binary_metrics(foreground, label, None, threshold).items()}
    inside, (fpr, tpr) = binary_metrics_and_roc(foreground, label, field_of_view(sample, foreground.device),
                                                threshold)
    row.update({f"FOV {key}": value for key, value in inside.items()})
    return row, (*thin_curve(fpr, tpr), row["FOV AUC"])



def authors_vessel_mask(prob, shape, threshold=0.5):
    """The binary mask of the authors' test_cenet.py from a (1, S, S) probability map at the network's size:
    thresholded there, scaled to 0/255, resized to the native `shape` by OpenCV's cv2.resize (INTER_LINEAR) and
    kept where above 20. Their mask is float32 (the network's output), so OpenCV resizes it in float and nothing
    is rounded to 8 bits. Every pixel within about a pixel of a vessel passes, so vessels come out thicker than
    a threshold at native resolution gives."""
    binary = ((prob[0].float() > threshold).float() * 255).cpu().numpy()
    return torch.from_numpy(data.opencv_resize(binary, tuple(shape)) > 20).to(prob.device)


def authors_native_probabilities(prob, shape):
    """A (1, S, S) probability map resized to the native `shape` as test_cenet.py resizes its float32 map for the
    AUC: cv2.resize, INTER_LINEAR, unrounded. (Theirs is the sum of the 8 TTA views, divided by 8 after resizing;
    resizing is linear and dividing by 8 exact in binary floating point, so the mean gives the same numbers.)"""
    return torch.from_numpy(data.opencv_resize(prob[0].float().cpu().numpy(), tuple(shape)))[None].to(prob.device)


def score_vessels_as_authors(prob, sample, threshold):
    """The authors' figures (test_cenet.py) from a (1, S, S) probability map at the network's size: whole-image
    AUC of the probabilities resized to native size, and Acc and Sen of their thickened mask
    (authors_vessel_mask), over the whole image, 1st annotator. Returns (row, native-size probabilities)."""
    shape = sample.label.shape
    prob_native = authors_native_probabilities(prob, shape)
    mask = authors_vessel_mask(prob, shape, threshold)
    label = as_device_tensor(sample.label > 0, prob_native.device)
    row = {"whole AUC": roc_auc(prob_native[0].float().flatten(), label.flatten())}
    counted = threshold_metrics(mask.float(), label, None, 0.5)
    row.update({"whole Acc": counted["Acc"], "whole Sen": counted["Sen"]})
    return row, prob_native


NOTES = ("Metrics at the original resolution against the 1st annotator, probability threshold for Acc/Sen/Spe/F1 as "
         "stated; 'whole' counts every pixel, 'FOV' only pixels inside the field-of-view mask (the field's standard; "
         "for training images without training/mask, the FOV estimated from the image).")

AUTHORS_NOTES = ("The authors' protocol (their test_cenet.py): whole image against the 1st annotator; 8-way TTA "
                 "averaged at the network's size; AUC of those probabilities resized to native size; Acc and Sen "
                 "of the mask thresholded at the network's size, resized to native size and kept above 20/255 "
                 "(which thickens vessels).")

DRIVE = Dataset(read_drive, num_classes=1, score=score_vessels, notes=NOTES, fov_diameter=fov.DRIVE_FOV_DIAMETER,
                field_degrees=45, f1_by_threshold=f1_by_threshold_in_fov,
                authors_score=score_vessels_as_authors, authors_notes=AUTHORS_NOTES, family="fundus vessels",
                source="DRIVE, https://drive.grand-challenge.org (registration required)")
