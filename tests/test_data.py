import math

import numpy as np
import pytest
import torch
from PIL import Image

import data
import tasks
from errors import UserError


def drive_split(root, split):
    return tasks.load_split("drive", root, split, tasks.SplitOptions())


def test_drive_reader_real_files(drive_root):
    train = drive_split(drive_root, "train")
    test = drive_split(drive_root, "test")
    assert len(train) == 20 and len(test) == 20
    sample = test[0]
    assert sample.name == "01"
    assert sample.image.shape == (584, 565, 3) and sample.image.dtype == np.uint8
    assert sample.label.shape == (584, 565) and set(np.unique(sample.label)) == {0, 1}
    # Vessels cover roughly a tenth of a DRIVE image; the FOV mask about two thirds.
    assert 0.05 < sample.label.mean() < 0.2
    assert 0.5 < sample.fov.mean() < 0.8
    assert train[0].fov is None


def test_stack_resizes_and_keeps_labels_binary(small_drive):
    samples = drive_split(small_drive, "train")
    images, labels = data.stack_samples(samples, 96, num_classes=1)
    assert images.shape == (2, 3, 96, 96) and images.dtype == torch.uint8
    assert labels.shape == (2, 96, 96) and set(labels.unique().tolist()) == {0, 1}


def test_multiclass_labels_resize_with_nearest():
    label = np.zeros((64, 64), np.uint8)
    label[16:, :] = 5
    label[40:, :] = 10
    resized = data.resize_label(label, 32, num_classes=11)
    assert set(resized.unique().tolist()) == {0, 5, 10}
    assert resized[7, 0] == 0 and resized[8, 0] == 5 and resized[20, 0] == 10


@pytest.mark.parametrize("size", [0, 100, 450])
def test_image_size_must_be_multiple_of_32(size):
    with pytest.raises(UserError, match="multiple of 32"):
        data.check_image_size(size)


def test_dihedral_has_eight_distinct_invertible_variants():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    variants = [data.dihedral(x, k) for k in range(8)]
    assert len({tuple(v.flatten().tolist()) for v in variants}) == 8
    for k, view in enumerate(variants):
        assert torch.equal(data.undo_dihedral(view, k), x)
    # Bit 2 is the diagonal flip, bit 0 left-right: variant 5 = transpose then mirror.
    assert torch.equal(variants[5], x.transpose(-1, -2).flip(-1))


def test_affine_dihedral_matrices_match_tensor_flips():
    """With scale 1 and no shift, the resampling augmentation reproduces each tensor flip exactly."""
    x = torch.rand(1, 1, 8, 8)
    for k in range(8):
        theta = torch.cat([data.DIHEDRAL_MATRICES[k], torch.zeros(2, 1)], 1)[None]
        grid = torch.nn.functional.affine_grid(theta, [1, 1, 8, 8], align_corners=False)
        out = torch.nn.functional.grid_sample(x, grid, mode="nearest", align_corners=False)
        assert any(torch.equal(out, data.dihedral(x, j)) for j in range(8)), k


def test_hsv_round_trip_and_known_colours():
    rgb = torch.rand(2, 3, 5, 7)
    assert torch.allclose(data.hsv_to_rgb(data.rgb_to_hsv(rgb)), rgb, atol=1e-5)
    pure = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.5, 0.5, 0.5]]).T.reshape(1, 3, 1, 4)
    hsv = data.rgb_to_hsv(pure)[0, :, 0]
    assert torch.allclose(hsv[0], torch.tensor([0.0, 1 / 3, 2 / 3, 0.0]), atol=1e-6)  # hue
    assert torch.allclose(hsv[1], torch.tensor([1.0, 1.0, 1.0, 0.0]))                # saturation
    assert torch.allclose(hsv[2], torch.tensor([1.0, 1.0, 1.0, 0.5]))                # value


def test_augmentation_moves_label_with_image():
    """A white square painted in the image and the label ends up at the same place after augmenting."""
    images = torch.zeros(16, 3, 64, 64)
    labels = torch.zeros(16, 64, 64, dtype=torch.uint8)
    images[:, :, 10:20, 30:42] = 1.0
    labels[:, 10:20, 30:42] = 1
    generator = torch.Generator().manual_seed(3)
    out_images, out_labels = data.augment(images, labels, generator, mode="flips")
    assert out_labels.dtype == torch.uint8 and set(out_labels.unique().tolist()) <= {0, 1}
    moved_somewhere = False
    for image, label in zip(out_images, out_labels):
        painted = image.mean(0) > 0.5
        overlap = (painted & (label == 1)).sum() / (painted | (label == 1)).sum()
        assert overlap > 0.8
        moved_somewhere |= not bool(label[10:20, 30:42].all())
    assert moved_somewhere


def test_augmentation_is_seeded_and_keeps_range(small_drive):
    samples = drive_split(small_drive, "train")
    images, labels = data.stack_samples(samples, 64, num_classes=1)
    images = images.float() / 255
    first = data.augment(images, labels, torch.Generator().manual_seed(7))
    second = data.augment(images, labels, torch.Generator().manual_seed(7))
    third = data.augment(images, labels, torch.Generator().manual_seed(8))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], third[0])
    assert 0 <= float(first[0].min()) and float(first[0].max()) <= 1
    assert set(first[1].unique().tolist()) <= {0, 1}


def test_multiclass_labels_survive_augmentation():
    labels = torch.arange(11, dtype=torch.uint8).repeat_interleave(6)[:64].view(64, 1).expand(64, 64)[None]
    labels = labels.repeat(4, 1, 1).contiguous()
    _, out = data.augment(torch.rand(4, 3, 64, 64), labels, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) <= set(range(11))


def test_batch_stream_covers_every_image_each_epoch():
    stream = data.BatchStream(num_items=5, batch_size=2, seed=0)
    drawn = torch.cat([stream.next() for _ in range(5)]).tolist()  # 10 indices = 2 epochs
    assert sorted(drawn[:5]) == [0, 1, 2, 3, 4] and sorted(drawn[5:]) == [0, 1, 2, 3, 4]
    shards = [data.BatchStream(6, 3, seed=1, rank=r, world_size=2).next().tolist() for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(6))
    assert data.steps_for(20, 8, 300) == 900


# --- bad input: each one clear UserError naming the problem ---------------------------------

def test_missing_root_names_source(tmp_path):
    with pytest.raises(UserError, match="does not exist.*drive.grand-challenge"):
        drive_split(tmp_path / "nowhere", "train")


def test_wrong_layout_names_missing_folder(tmp_path):
    (tmp_path / "training" / "images").mkdir(parents=True)
    with pytest.raises(UserError, match="1st_manual"):
        drive_split(tmp_path, "train")


def test_missing_label_names_file(small_drive, tmp_path):
    import shutil
    root = tmp_path / "d"
    shutil.copytree(small_drive, root)
    (root / "training" / "1st_manual" / "22_manual1.gif").unlink()
    with pytest.raises(UserError, match="22_manual1.gif"):
        drive_split(root, "train")


def test_truncated_image(small_drive, tmp_path):
    import shutil
    root = tmp_path / "d"
    shutil.copytree(small_drive, root)
    path = root / "training" / "images" / "21_training.tif"
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(UserError, match="cannot read image .*21_training.tif"):
        drive_split(root, "train")


def test_size_mismatch(small_drive, tmp_path):
    import shutil
    root = tmp_path / "d"
    shutil.copytree(small_drive, root)
    Image.new("L", (100, 100)).save(root / "training" / "1st_manual" / "21_manual1.gif")
    with pytest.raises(UserError, match="size mismatch"):
        drive_split(root, "train")


# --- augmentation that a silent bug would switch off ------------------------------------------

def test_the_augmentation_draws_every_flip_and_every_colour_shift():
    """A sampler stuck on variant 0 (no flips) or with the colour jitter off fails here."""
    theta, hsv = data.draw_augmentation(400, torch.Generator().manual_seed(0))
    linear = theta[:, :, :2]
    unit = linear / linear.abs().amax(dim=(1, 2), keepdim=True)  # undo the scale: a signed permutation
    drawn = {k for k in range(8) for matrix in unit if torch.allclose(matrix, data.DIHEDRAL_MATRICES[k])}
    assert drawn == set(range(8))
    scales = 1 / linear.abs().amax(dim=(1, 2))
    assert 0.9 <= float(scales.min()) < 0.92 and 1.08 < float(scales.max()) <= 1.1
    limits = torch.tensor([data.HUE_SHIFT, data.SATURATION_SHIFT, data.VALUE_SHIFT])
    assert bool((hsv.abs() <= limits).all()) and bool((hsv.abs().amax(0) > 0.9 * limits).all())


def test_augmentation_modes_switch_their_parts():
    """flips: exact dihedral copies, no colour; none: the identity; authors_code: each transform on about
    half the samples, with different scales per axis; an unknown mode is one clear error."""
    theta, hsv = data.draw_augmentation(2000, torch.Generator().manual_seed(0), "flips")
    unit = theta[:, :, :2]
    assert all(any(torch.equal(m, data.DIHEDRAL_MATRICES[k]) for k in range(8)) for m in unit[:50])
    assert not theta[:, :, 2].any() and not hsv.any()
    theta, hsv = data.draw_augmentation(20, torch.Generator().manual_seed(0), "none")
    assert torch.equal(theta[:, :, :2], data.DIHEDRAL_MATRICES[0].expand(20, 2, 2)) and not hsv.any()

    theta, hsv = data.draw_augmentation(4000, torch.Generator().manual_seed(0), "authors_code")
    column_scales = theta[:, :, :2].abs().amax(dim=1)          # 1 / (per-axis scale), per output axis
    warped = (column_scales - 1).abs().amax(dim=1) > 1e-6
    assert 0.45 < float(warped.float().mean()) < 0.55          # scale/aspect/shift on about half
    assert bool((theta[~warped][:, :, 2] == 0).all())          # ... and no shift where there is no warp
    aspect = column_scales[warped, 0] / column_scales[warped, 1]
    assert float(aspect.min()) < 0.93 and float(aspect.max()) > 1.07   # the +-10 % aspect jitter
    coloured = hsv.abs().amax(dim=1) > 0
    assert 0.45 < float(coloured.float().mean()) < 0.55
    with pytest.raises(UserError, match="unknown augmentation"):
        data.draw_augmentation(2, torch.Generator(), "paper_v2")
    assert [data.augmentation_mode(value) for value in (True, False, "camera")] == [
        "paper", "none", "camera"]   # settings saved when AUGMENT was on/off


def test_camera_augmentation_scales_log_uniformly_and_leaves_the_other_draws_alone():
    """camera: scales log-uniform over [1/1.5, 1.5] (as many zoomed in as out, each third of the log range about a
    third of the draws); flips, shifts and colour shifts are the very draws of paper for the same seed."""
    camera_theta, camera_hsv = data.draw_augmentation(3000, torch.Generator().manual_seed(0), "camera")
    paper_theta, paper_hsv = data.draw_augmentation(3000, torch.Generator().manual_seed(0), "paper")
    scales = 1 / camera_theta[:, :, :2].abs().amax(dim=(1, 2))
    factor = data.CAMERA_SCALE_FACTOR
    assert 1 / factor <= float(scales.min()) < 1 / factor + 0.01 and factor - 0.01 < float(scales.max()) <= factor
    thirds = torch.bucketize(scales.log(), torch.tensor([-1 / 3, 1 / 3]) * math.log(factor))
    assert all(abs(float((thirds == k).float().mean()) - 1 / 3) < 0.04 for k in range(3))
    unit = lambda theta: (theta[:, :, :2] / theta[:, :, :2].abs().amax(dim=(1, 2), keepdim=True)).round()
    assert torch.equal(unit(camera_theta), unit(paper_theta))
    assert torch.equal(camera_theta[:, :, 2], paper_theta[:, :, 2]) and torch.equal(camera_hsv, paper_hsv)


def test_photometric_draws_span_their_ranges_and_leave_the_camera_draws_alone():
    """camera_photometric: gamma log-uniform within [1/1.5, 1.5], contrast and blur uniform within their ranges;
    the affine and colour draws before them are camera's own for the same seed."""
    parameters = data.draw_photometric(4000, torch.Generator().manual_seed(0))
    gammas, contrasts, sigmas = parameters.unbind(1)
    factor = data.GAMMA_FACTOR
    assert 1 / factor <= float(gammas.min()) < 1 / factor + 0.01 and factor - 0.01 < float(gammas.max()) <= factor
    assert abs(float((gammas > 1).float().mean()) - 0.5) < 0.03          # as many darkening as brightening
    low, high = data.CONTRAST_RANGE
    assert low <= float(contrasts.min()) < low + 0.01 and high - 0.01 < float(contrasts.max()) <= high
    assert 0 <= float(sigmas.min()) < 0.01 and data.BLUR_SIGMA_MAX - 0.01 < float(sigmas.max()) <= data.BLUR_SIGMA_MAX
    first = data.draw_augmentation(50, torch.Generator().manual_seed(3), "camera_photometric")
    second = data.draw_augmentation(50, torch.Generator().manual_seed(3), "camera")
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_photometric_jitter_against_hand_computed_values():
    """Gamma 2 squares a flat image; contrast 0.5 halves each pixel's distance from the mean grey; blur keeps a
    flat image flat, keeps the total of a single bright pixel (inside the frame) and spreads it as exp(-d^2/2s^2);
    sigma 0 is the identity."""
    flat = torch.full((1, 3, 9, 9), 0.6)
    torch.testing.assert_close(data.jitter_photometric(flat, torch.tensor([[2.0, 1.0, 0.0]])), flat ** 2)
    torch.testing.assert_close(data.jitter_photometric(flat, torch.tensor([[1.0, 1.0, 1.2]])), flat)
    halves = torch.zeros(1, 3, 4, 4)
    halves[..., 2:] = 1.0                                             # mean grey 0.5
    contrasted = data.jitter_photometric(halves, torch.tensor([[1.0, 0.5, 0.0]]))
    assert torch.allclose(contrasted[..., :2], torch.tensor(0.25)) and torch.allclose(contrasted[..., 2:],
                                                                                        torch.tensor(0.75))
    dot = torch.zeros(2, 3, 21, 21)
    dot[:, :, 10, 10] = 1.0
    blurred = data.gaussian_blur(dot, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(blurred[1], dot[1])                    # sigma 0: untouched
    torch.testing.assert_close(blurred[0].sum(dim=(1, 2)), torch.ones(3))
    ratio = float(blurred[0, 0, 10, 11] / blurred[0, 0, 10, 10])
    assert abs(ratio - math.exp(-1 / 2)) < 1e-5
    assert abs(float(blurred[0, 0, 11, 11] / blurred[0, 0, 10, 10]) - math.exp(-1)) < 1e-5


def test_photometric_augmentation_changes_only_the_image():
    """Through `augment`, camera_photometric moves the label exactly as camera does (same seed, same draws)
    and keeps the image in [0, 1]; the images differ by the photometric jitter alone."""
    images = torch.rand(4, 3, 32, 32)
    labels = (torch.rand(4, 32, 32) > 0.5).to(torch.uint8)
    plain_images, plain_labels = data.augment(images, labels, torch.Generator().manual_seed(5), "camera")
    jittered, moved = data.augment(images, labels, torch.Generator().manual_seed(5), "camera_photometric")
    assert torch.equal(moved, plain_labels)
    assert float(jittered.min()) >= 0 and float(jittered.max()) <= 1
    assert not torch.allclose(jittered, plain_images)


def test_a_photometric_run_sees_the_camera_runs_crops_with_its_own_jitter():
    """In training, camera_photometric draws its jitter after everything else: the same seed gives the crops,
    flips and labels of a camera run, and images that differ from them by exactly `jitter_photometric`."""
    import framework
    images = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8)
    labels = (torch.rand(3, 48, 48) > 0.5).to(torch.uint8)
    model = torch.nn.Conv2d(3, 1, 3, padding=1)
    model.num_classes = 1

    def trainer(augment):
        config = framework.TrainConfig(batch_size=2, epochs=2, amp=False, loss="bce", augment=augment, patch_size=32)
        return framework.Trainer(model, images, labels, config, torch.device("cpu"))

    camera, jittered = trainer("camera"), trainer("camera_photometric")
    assert "photometric" not in camera.plan and jittered.plan["photometric"].shape == (jittered.total_steps, 2, 3)
    camera_images, camera_labels = camera.batch()
    jittered_images, jittered_labels = jittered.batch()
    assert torch.equal(camera_labels, jittered_labels)
    mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1)
    unnormalised = camera_images * std + mean
    expected = data.normalize(data.jitter_photometric(unnormalised, jittered.plan["photometric"][0]))
    torch.testing.assert_close(jittered_images, expected, atol=1e-5, rtol=1e-5)


def test_colour_first_keeps_the_moved_in_border_black():
    """The authors' order (colour, then warp) leaves the zero padding black; ours jitters it."""
    image = torch.full((1, 3, 16, 16), 0.5)
    label = torch.zeros(1, 16, 16, dtype=torch.uint8)
    shift_right = torch.tensor([[[1.0, 0.0, -0.5], [0.0, 1.0, 0.0]]])   # a quarter of the width moves in
    brighter = torch.tensor([[0.0, 0.0, 0.05]])
    theirs, _ = data.apply_augmentation(image, label, shift_right, brighter, colour_first=True)
    ours, _ = data.apply_augmentation(image, label, shift_right, brighter)
    assert float(theirs[..., :3].max()) == 0.0 and float(ours[..., :3].min()) > 0.04
    torch.testing.assert_close(theirs[..., 5:], ours[..., 5:])


def test_a_flip_in_the_plan_flips_image_and_label():
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, 4:12, 2:6] = 1.0                      # a bar near the left edge
    label = (image[:, 0] > 0.5).to(torch.uint8)
    theta = torch.cat([data.DIHEDRAL_MATRICES[1:2], torch.zeros(1, 2, 1)], dim=2)  # variant 1: left-right
    moved, moved_label = data.apply_augmentation(image, label, theta, torch.zeros(1, 3))
    assert torch.equal(moved, image.flip(-1)) and torch.equal(moved_label, label.flip(-1))


def test_the_trainer_jitters_colour_and_crops_where_the_plan_says():
    """Trainer.batch applies the plan's colour shifts (an all-zero jitter would go unnoticed otherwise) and
    cuts PATCH_SIZE crops at native resolution from the planned centres."""
    import framework
    torch.manual_seed(0)
    images = torch.randint(30, 220, (2, 3, 40, 50), dtype=torch.uint8)
    labels = (torch.rand(2, 40, 50) > 0.5).to(torch.uint8)
    model = torch.nn.Conv2d(3, 1, 1)
    model.num_classes = 1
    config = framework.TrainConfig(batch_size=2, epochs=1, patch_size=32, amp=False, loss="bce")
    trainer = framework.Trainer(model, images, labels, config, torch.device("cpu"))
    jittered, crop_labels = trainer.batch()
    assert jittered.shape == (2, 3, 32, 32) and crop_labels.shape == (2, 32, 32)
    trainer.plan["hsv"].zero_()
    plain, same_labels = trainer.batch()
    assert torch.equal(crop_labels, same_labels) and (jittered - plain).abs().max() > 0.01
    assert set(crop_labels.unique().tolist()) <= {0, 1}


def test_crop_affine_cuts_the_window_at_its_centre():
    """With the identity transform, the crop centred at (x, y) is exactly the pixels around it."""
    image = torch.arange(40 * 50, dtype=torch.float32).view(1, 1, 40, 50).expand(1, 3, 40, 50).contiguous()
    label = torch.zeros(1, 40, 50, dtype=torch.uint8)
    identity = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    theta = data.crop_affine(identity, torch.tensor([[20.0, 16.0]]), 16, 40, 50)
    crop, _ = data.apply_augmentation(image / 2000, label, theta, torch.zeros(1, 3), out_size=16)
    torch.testing.assert_close(crop[0, 0] * 2000, image[0, 0, 8:24, 12:28], rtol=0, atol=1e-2)


def test_native_stacking_pads_smaller_images_with_background():
    big = tasks.Sample("a", np.full((6, 5, 3), 200, np.uint8), np.ones((6, 5), np.uint8))
    small = tasks.Sample("b", np.full((4, 3, 3), 100, np.uint8), np.ones((4, 3), np.uint8))
    images, labels = data.stack_native([big, small], 1)
    assert images.shape == (2, 3, 6, 5) and int(images[1, :, 4:].max()) == 0 and int(labels[1, :, 3:].max()) == 0
    assert data.padded_side(584, 565) == 608 and data.pad_to_square(images, 32).shape == (2, 3, 32, 32)


def test_patch_scale_resizes_images_and_labels_before_stacking():
    """PATCH_SCALE 2: a 6 x 5 sample becomes 12 x 10, its label stays a binary map covering the same
    region, and the smaller sample is still padded with black background."""
    label = np.zeros((6, 5), np.uint8)
    label[2:4, 1:4] = 1
    big = tasks.Sample("a", np.full((6, 5, 3), 200, np.uint8), label)
    small = tasks.Sample("b", np.full((4, 3, 3), 100, np.uint8), np.ones((4, 3), np.uint8))
    images, labels = data.stack_native([big, small], 1, scale=2.0)
    assert images.shape == (2, 3, 12, 10) and labels.shape == (2, 12, 10)
    assert set(labels.unique().tolist()) == {0, 1} and int(labels[0].sum()) == 4 * int(label.sum())
    assert int(images[0].min()) == 200 and int(images[1, :, 8:].max()) == 0 and int(labels[1, :, 6:].max()) == 0
    assert data.scaled_shape((584, 565), 1.5) == (876, 848)


def test_clahe_raises_local_contrast_and_leaves_other_preprocessings_alone():
    """A faint vertical stripe (contrast 6 grey levels) comes out of CLAHE with a larger contrast; "ours"
    and "authors" do nothing per image."""
    image = np.full((64, 64, 3), 120, np.uint8)
    image[:, 30:34] = 114
    enhanced = data.enhance(image, "clahe")
    assert enhanced.dtype == np.uint8 and enhanced.shape == image.shape
    stripe, around = enhanced[:, 30:34].astype(float).mean(), enhanced[:, :20].astype(float).mean()
    assert around - stripe > 6
    assert data.enhance(image, "ours") is image and data.enhance(image, "authors") is image
    torch.testing.assert_close(data.normalize(torch.from_numpy(image).permute(2, 0, 1)[None], "clahe"),
                               data.normalize(torch.from_numpy(image).permute(2, 0, 1)[None], "ours"))


def test_one_binary_rule_for_every_reader(small_drive, tmp_path):
    """A DRIVE label stored as 0/1 instead of 0/255 is read the same, not as an empty mask."""
    import shutil
    root = tmp_path / "DRIVE"
    shutil.copytree(small_drive, root)
    path = root / "training" / "1st_manual" / "21_manual1.gif"
    original = np.asarray(Image.open(path).convert("L")) > 0
    Image.fromarray(original.astype(np.uint8)).save(path)  # values 0 and 1
    reread = drive_split(root, "train")[0].label
    assert np.array_equal(reread, original.astype(np.uint8)) and reread.any()


def test_hidden_resource_forks_are_not_images(small_drive, tmp_path):
    import shutil
    root = tmp_path / "DRIVE"
    shutil.copytree(small_drive, root)
    (root / "training" / "images" / "._21_training.tif").write_bytes(b"\x00\x05\x16\x07 macOS metadata")
    assert [sample.name for sample in drive_split(root, "train")] == ["21", "22"]


def test_training_masks_are_read_when_present_and_estimated_for_scoring_when_not(small_drive, tmp_path):
    """The official DRIVE has training/mask/21_training_mask.gif; some copies leave it out. Scoring the
    training images (--split train) counts FOV pixels inside the mask, else inside the estimated FOV."""
    import shutil

    import fov
    import metrics
    from tasks.drive import score_vessels
    root = tmp_path / "DRIVE"
    shutil.copytree(small_drive, root)
    without = drive_split(root, "train")
    assert all(sample.fov is None for sample in without)

    (root / "training" / "mask").mkdir()
    drawn = np.zeros(without[0].label.shape, bool)
    drawn[100:400, 50:500] = True
    for sample in without:
        path = root / "training" / "mask" / f"{sample.name}_training_mask.gif"
        Image.fromarray(drawn.astype(np.uint8) * 255).save(path)
    with_masks = drive_split(root, "train")
    assert all(np.array_equal(sample.fov, drawn) for sample in with_masks)

    prob = torch.rand(1, *drawn.shape, generator=torch.Generator().manual_seed(0))
    label = without[0].label > 0
    row, _ = score_vessels(prob, without[0], 0.5)
    estimated = fov.estimate_fov(without[0].image)
    assert 0.5 < estimated.mean() < 0.9  # a real FOV, not the whole image
    assert row["FOV F1"] == metrics.threshold_metrics(prob[0], label, estimated, 0.5)["F1"]
    row, _ = score_vessels(prob, with_masks[0], 0.5)
    assert row["FOV F1"] == metrics.threshold_metrics(prob[0], label, drawn, 0.5)["F1"]

    (root / "training" / "mask" / "22_training_mask.gif").unlink()
    with pytest.raises(UserError, match="22_training_mask.gif missing"):
        drive_split(root, "train")
