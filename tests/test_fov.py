"""fov.py: the estimated field of view against DRIVE's own masks, and images without a FOV."""
import numpy as np
import pytest

import fov
from errors import UserError
from tasks.files import read_image, read_mask
from fixtures import disc_mask


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_estimate_matches_drive_masks(drive_root):
    scores = []
    for mask_path in sorted((drive_root / "test" / "mask").glob("*_test_mask.gif")):
        number = mask_path.name.split("_")[0]
        truth = read_mask(mask_path)
        estimate = fov.estimate_fov(read_image(drive_root / "test" / "images" / f"{number}_test.tif"))
        scores.append(dice(estimate, truth))
    assert len(scores) == 20
    print(f"DRIVE FOV Dice: min {min(scores):.4f}, mean {np.mean(scores):.4f}")
    assert min(scores) >= 0.98


def test_drive_diameter_is_the_masks(drive_root):
    diameters = [fov.fov_diameter(read_mask(path)) for path in (drive_root / "test" / "mask").glob("*.gif")]
    assert min(diameters) <= fov.DRIVE_FOV_DIAMETER <= max(diameters)
    assert abs(np.median(diameters) - fov.DRIVE_FOV_DIAMETER) <= 1


def test_drawn_disc_is_recovered():
    disc = disc_mask(200, 240, (100, 120), 90)
    image = np.zeros((200, 240, 3), np.uint8)
    image[disc] = (150, 60, 30)
    noise = np.random.default_rng(0).integers(0, 6, image.shape, dtype=np.uint8)
    estimate = fov.estimate_fov(image + noise)
    assert estimate.dtype == bool and estimate.shape == (200, 240)
    assert dice(estimate, disc) > 0.98
    assert abs(fov.fov_diameter(estimate) - 180) <= 3


def test_large_photograph_is_measured_reduced():
    disc = disc_mask(2100, 2300, (1050, 1150), 1000)
    image = np.zeros((2100, 2300, 3), np.uint8)
    image[disc] = (150, 60, 30)
    estimate = fov.estimate_fov(image)
    assert estimate.shape == (2100, 2300) and dice(estimate, disc) > 0.995
    assert abs(fov.fov_diameter(estimate) - 2000) <= 6


@pytest.mark.parametrize("level", [0, 128, 255])
def test_image_without_fov_is_all_inside(level):
    image = np.full((50, 70, 3), level, np.uint8)
    estimate = fov.estimate_fov(image)
    assert estimate.shape == (50, 70) and estimate.all()


def test_diameter_of_a_cut_disc_is_its_width():
    disc = disc_mask(100, 140, (50, 70), 60)   # 120 px across, cut to 100 rows at top and bottom
    assert fov.fov_diameter(disc) == 119       # pixel centres strictly inside radius 60
    assert fov.scale_to_match(disc, 238) == pytest.approx(2.0)


def test_empty_mask_has_no_scale():
    assert fov.fov_diameter(np.zeros((5, 5), bool)) == 0
    with pytest.raises(UserError, match="empty"):
        fov.scale_to_match(np.zeros((5, 5), bool), 540)
