"""CHASE_DB1 retinal vessels (Fraz et al., IEEE TBME 2012): reader, and DRIVE's scoring with a human baseline.

28 fundus photographs (999 x 960, both eyes of 14 children), in one flat folder as distributed:
`Image_01L.jpg` with the first annotator's vessels `Image_01L_1stHO.png` and the second's
`Image_01L_2ndHO.png` (1-bit PNGs), ... up to `Image_14R`. The set ships no field-of-view masks, so
every sample's FOV is estimated from its image (fov.estimate_fov) and the notes say so.
"""
import numpy as np

import fov
from errors import UserError
from metrics import threshold_metrics
from tasks.drive import f1_by_threshold_in_fov, score_vessels
from tasks.files import check_same_size, read_image, read_mask, require_dir
from tasks.sample import Dataset, Sample

# CHASE_DB1 has no official split. Most vessel papers train on the first 20 images (children 1-10,
# both eyes) and test on the last 8 (children 11-14): both eyes of a child stay on one side.
TRAIN_IMAGES = tuple(f"{child:02d}{eye}" for child in range(1, 11) for eye in "LR")
TEST_IMAGES = tuple(f"{child:02d}{eye}" for child in range(11, 15) for eye in "LR")
SPLITS = {"train": TRAIN_IMAGES, "test": TEST_IMAGES}

REFERENCE_SUFFIX = "_1stHO.png"   # the first annotator: the ground truth, as in the literature
SECOND_SUFFIX = "_2ndHO.png"      # the second annotator: scored as the human baseline

# Median FOV diameter of the 28 images under fov.estimate_fov (886 to 917 px): the size --eval-scale auto
# brings other images to for a model trained on CHASE_DB1, as fov.DRIVE_FOV_DIAMETER is for DRIVE.
CHASE_FOV_DIAMETER = 915


def image_path(root, name):
    path = root / f"Image_{name}.jpg"
    if not path.is_file():
        raise UserError(f"CHASE_DB1 image {path} missing: expected Image_{name}.jpg (Image_01L.jpg ... "
                        f"Image_14R.jpg, all in one folder as distributed)")
    return path


def annotation(root, name, suffix, image, image_file):
    path = root / f"Image_{name}{suffix}"
    if not path.is_file():
        raise UserError(f"annotation {path} missing for image {image_file}: CHASE_DB1 names it "
                        f"Image_{name}{suffix}")
    mask = read_mask(path)
    check_same_size(image, mask, image_file, path)
    return mask


def read_chase(root, split, options):
    """The images of `split` (TRAIN_IMAGES or TEST_IMAGES), each with the first annotator as its label,
    both annotators in `experts` (the second only when the folder has any _2ndHO file: a copy without
    them still trains and scores, just without the human-baseline row) and its estimated FOV."""
    root = require_dir(root, "CHASE_DB1")
    with_second = any(root.glob(f"Image_*{SECOND_SUFFIX}"))
    samples = []
    for name in SPLITS[split]:
        path = image_path(root, name)
        image = read_image(path)
        first = annotation(root, name, REFERENCE_SUFFIX, image, path)
        experts = [first]
        if with_second:
            experts.append(annotation(root, name, SECOND_SUFFIX, image, path))
        samples.append(Sample(name, image, first.astype(np.uint8), fov.estimate_fov(image),
                              experts=np.stack(experts)))
    return samples


def score_chase(prob, sample, threshold):
    """DRIVE's scoring (tasks.drive.score_vessels) against the first annotator, plus the second annotator's
    own mask scored the same way inside the same FOV: the agreement a human reaches, beside the model's."""
    row, curve = score_vessels(prob, sample, threshold)
    if sample.experts is not None and len(sample.experts) > 1:
        fov_mask = sample.fov if sample.fov is not None else np.ones(sample.label.shape, bool)
        human = threshold_metrics(sample.experts[1].astype(np.float32), sample.label > 0, fov_mask, 0.5)
        row.update({f"2nd annotator FOV {key}": value for key, value in human.items()})
    return row, curve


NOTES = ("CHASE_DB1: metrics at the original resolution (999 x 960) against the 1st annotator (_1stHO), probability "
         "threshold for Acc/Sen/Spe/F1 as stated; 'whole' counts every pixel, 'FOV' only pixels inside the field "
         "of view. CHASE_DB1 ships no FOV masks: the FOV is ESTIMATED from each image (fov.estimate_fov: red "
         "channel threshold, largest component), so FOV figures are not strictly comparable with papers that drew "
         "their own masks. '2nd annotator FOV ...' scores the 2nd annotator (_2ndHO) against the 1st inside the "
         "same FOV: the human baseline.")

CHASE = Dataset(read_chase, num_classes=1, score=score_chase, notes=NOTES, family="fundus vessels",
                f1_by_threshold=f1_by_threshold_in_fov,
                fov_diameter=CHASE_FOV_DIAMETER, field_degrees=30,
                source="CHASE_DB1, https://blogs.kingston.ac.uk/retinal/chasedb1/ (free download)")
