"""predict.py: test.py's probabilities on DRIVE, and any image a user may hand it (sizes, depths, pages,
formats, damaged files), with tiny untrained checkpoints where only the plumbing is under test."""
import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import cli
import devices
import evaluation
import fov
import framework
import inference
import networks
import predict
import prediction
import tasks
from conftest import module_folder, run_script
from fixtures import disc_mask, fundus

CPU = ["--device", "cpu", "--tta", "false"]


def tiny_checkpoint(path, dataset="drive", num_classes=1, **overrides):
    """An untrained CE-Net saved as main.py saves one: its outputs are noise, its plumbing real."""
    torch.manual_seed(0)
    model = networks.build_model("cenet", num_classes=num_classes)
    settings = cli.default_settings()
    settings.update({"DATASET": dataset, "IMAGE_SIZE": 64, "PATCH_SIZE": 0, "PREPROCESS": "ours", **overrides})
    return framework.save_checkpoint(path, model, settings)


@pytest.fixture(scope="module")
def resized(tmp_path_factory):
    """Whole images resized to 64 px: the fastest path, for everything but the size handling."""
    with module_folder(tmp_path_factory, "models") as folder:
        yield tiny_checkpoint(folder / "resized.pth")


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """Crop-trained (PATCH_SIZE 32): whole images at native resolution, padded, like the released model."""
    with module_folder(tmp_path_factory, "models") as folder:
        yield tiny_checkpoint(folder / "native.pth", PATCH_SIZE=32)


def run(*argv):
    """predict.py's exit status, run in this process through cli.run as the script runs it (output: capsys)."""
    try:
        cli.run(lambda: predict.main([str(arg) for arg in argv]))
    except SystemExit as exit_:
        return exit_.code
    return 0


def rows_of(out):
    with open(out / "predictions.csv", newline="") as table:
        return list(csv.DictReader(table))


def test_drive_images_get_test_py_probabilities(small_drive, tmp_path):
    checkpoint = prediction.DEFAULT_CHECKPOINT
    _, settings, given = predict.parse_args(["x", "-o", "y", *CPU])
    model, merged, _ = evaluation.load_model(checkpoint, settings, given)
    device = devices.select_device("cpu")
    fmt = devices.inference_memory_format(device, merged["CHANNELS_LAST"])
    samples = tasks.load_split("drive", small_drive, "test", tasks.SplitOptions.from_settings(merged))
    expected = inference.predict_samples(model.to(device, memory_format=fmt), samples, device,
                                         image_size=merged["IMAGE_SIZE"], patch_size=merged["PATCH_SIZE"],
                                         tta=False, amp=merged["AMP"], fmt=fmt, preprocess=merged["PREPROCESS"],
                                         patch_scale=merged["PATCH_SCALE"])
    out = tmp_path / "out"
    assert predict.main([str(small_drive / "test" / "images"), "-o", str(out), "--fov", "none", "--save-float",
                         *CPU]) == 0
    for sample, prob in zip(samples, expected):
        ours = tifffile.imread(out / f"{sample.name}_test_prob.tif")
        assert ours.shape == (584, 565)
        difference = np.abs(ours - prob[0].numpy()).max()
        print(f"image {sample.name}: largest difference from test.py's probabilities {difference:.2e}")
        assert difference <= 1e-6
        assert (np.array(Image.open(out / f"{sample.name}_test_mask.png")) > 0).sum() == (prob[0] > 0.5).sum()
    assert [row["name"] for row in rows_of(out)] == ["01_test", "02_test"]


def test_formats_depths_and_pages(resized, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    image, _ = fundus(611, 397, (300, 200), 30, seed=1)
    Image.fromarray(image).save(folder / "odd.png")
    Image.fromarray(image).save(folder / "photo.jpg", quality=90)
    Image.fromarray(image[:50, :70, 1]).save(folder / "grey.png")
    Image.fromarray(np.dstack([image[:40, :60], np.full((40, 60), 255, np.uint8)])).save(folder / "rgba.png")
    Image.fromarray(image[:30, :30]).convert("P").save(folder / "palette.gif")
    Image.fromarray(image[:30, :40]).save(folder / "pixels.ppm")
    Image.fromarray(image[:20, :40]).save(folder / "bitmap.bmp")
    tifffile.imwrite(folder / "deep.tif", (np.arange(48 * 64).reshape(48, 64) % 2000 + 1000).astype(np.uint16))
    tifffile.imwrite(folder / "stack.tif", np.zeros((3, 32, 48), np.uint8), photometric="minisblack")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert run(folder, "-o", out, "--checkpoint", resized, *CPU) == 0
    expected = {"bitmap": (40, 20), "deep": (64, 48), "grey": (70, 50), "odd": (397, 611), "palette": (30, 30),
                "photo": (397, 611), "pixels": (40, 30), "rgba": (60, 40), "stack_p1": (48, 32),
                "stack_p2": (48, 32), "stack_p3": (48, 32)}
    rows = rows_of(out)
    assert {row["name"]: (int(row["width"]), int(row["height"])) for row in rows} == expected
    for name, size in expected.items():
        for ending in ("prob", "mask", "overlay"):
            assert Image.open(out / f"{name}_{ending}.png").size == size, (name, ending)
    assert all(row["fov"] == "auto" and row["scale"] == "1.0000" for row in rows)  # a DRIVE model's defaults
    assert "wrote 11 images" in capsys.readouterr().out


def test_formats_of_one_stem_are_refused(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    for suffix in (".png", ".bmp"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "in" / f"a{suffix}")
    assert run(tmp_path / "in", "-o", tmp_path / "out", *CPU) == 2
    assert "would both be written as a_*" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- reading ------------------------------------------------------------------------------------------

def test_deep_pixels_use_their_own_range(tmp_path):
    ramp = np.linspace(1000, 3000, 40 * 50).reshape(40, 50).astype(np.uint16)  # 12-bit data in 16 bits
    tifffile.imwrite(tmp_path / "deep.tif", ramp)
    [(name, image)] = prediction.read_pages(tmp_path / "deep.tif")
    assert name == "deep" and image.shape == (40, 50, 3) and image.dtype == np.uint8
    assert image.min() == 0 and image.max() == 255          # stretched, not clipped to white
    assert (np.diff(image[..., 0].ravel().astype(int)) >= 0).all()
    Image.fromarray(ramp).save(tmp_path / "grey16.png")          # a 16-bit grey PNG: PIL reads all 16 bits
    [(_, grey)] = prediction.read_pages(tmp_path / "grey16.png")
    assert np.array_equal(grey, image)
    import cv2
    deep = np.zeros((10, 20, 3), np.uint16)
    deep[..., 0] = np.linspace(0, 4000, 200).reshape(10, 20)  # a 12-bit red ramp
    deep[0, 0, 2] = 60000                                     # and one hot blue pixel, which does not set the range
    cv2.imwrite(str(tmp_path / "deep.png"), deep[..., ::-1])  # OpenCV writes BGR
    [(_, image)] = prediction.read_pages(tmp_path / "deep.png")
    assert image[0, 0, 2] == 255 and image[..., 0].max() == 255 and image[5, 5, 1] == 0
    assert (np.diff(image[..., 0].ravel().astype(int)) >= 0).all() and len(np.unique(image[..., 0])) > 150
    colour = np.zeros((10, 12, 3), np.float32)
    colour[..., 0] = np.linspace(0.0, 1.0, 120).reshape(10, 12)
    colour[1, 1, 2] = np.nan
    tifffile.imwrite(tmp_path / "float.tif", colour, photometric="rgb")
    [(_, image)] = prediction.read_pages(tmp_path / "float.tif")
    assert image[1, 1, 2] == 0 and image[0, 0, 0] == 0 and image[-1, -1, 0] == 255  # NaN as the bottom


def test_sparse_and_opaque_deep_images_are_not_blackened(tmp_path):
    sparse = np.zeros((40, 50), np.uint16)
    sparse[:2, :3] = 3000                                     # 0.3 % of the pixels: both percentiles are 0
    tifffile.imwrite(tmp_path / "sparse.tif", sparse)
    [(_, image)] = prediction.read_pages(tmp_path / "sparse.tif")
    assert (image[:2, :3] == 255).all() and image.sum() == 255 * 6 * 3
    import cv2
    rgba = np.full((8, 9, 4), 65535, np.uint16)               # 16-bit RGBA, evenly opaque
    rgba[..., :3] = np.arange(8 * 9 * 3).reshape(8, 9, 3) * 300
    cv2.imwrite(str(tmp_path / "opaque.png"), rgba[..., [2, 1, 0, 3]])
    [(_, image)] = prediction.read_pages(tmp_path / "opaque.png")
    assert image.max() == 255 and image[0, 0, 0] == 0 and (np.diff(image.ravel().astype(int)) >= 0).all()


def test_alpha_palette_and_pages(tmp_path):
    rgba = np.full((6, 8, 4), 200, np.uint8)
    rgba[..., 3] = 255
    rgba[:3, :, 3] = 0                                        # transparent top half
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    [(_, image)] = prediction.read_pages(tmp_path / "rgba.png")
    assert (image[:3] == 0).all() and (image[3:] == 200).all()
    Image.fromarray(np.full((5, 5), 77, np.uint8)).convert("P").save(tmp_path / "palette.gif")
    [(_, image)] = prediction.read_pages(tmp_path / "palette.gif")
    assert image.shape == (5, 5, 3) and (image == 77).all()
    pages = np.stack([np.full((4, 6, 3), value, np.uint8) for value in (10, 20)])
    tifffile.imwrite(tmp_path / "stack.tif", pages)
    read = prediction.read_pages(tmp_path / "stack.tif")
    assert [name for name, _ in read] == ["stack_p1", "stack_p2"]
    assert [int(image.mean()) for _, image in read] == [10, 20]


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((20, 30, 3), np.uint8)
    stored[0, 0] = 255                                        # a marker in the stored top-left corner
    picture = Image.fromarray(stored)
    tags = picture.getexif()
    tags[0x0112] = 6                                          # Orientation 6: shown turned 90 degrees clockwise
    picture.save(tmp_path / "camera.png", exif=tags)
    [(_, image)] = prediction.read_pages(tmp_path / "camera.png")
    assert image.shape == (30, 20, 3)                         # as a viewer shows it: portrait
    assert (image == np.rot90(stored, k=-1)).all() and image[0, 19].tolist() == [255, 255, 255]


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n broken", b"II*\x00 not a tiff"])
def test_damaged_file_is_unreadable(tmp_path, content):
    path = tmp_path / ("bad.tif" if content.startswith(b"II") else "bad.png")
    path.write_bytes(content)
    with pytest.raises(prediction.UnreadableImage, match="cannot read .*bad"):
        prediction.read_pages(path)


# --- files, folders and failures ------------------------------------------------------------------------

def test_damaged_file_is_skipped_and_the_rest_written(resized, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "c"):
        Image.fromarray(np.full((24, 32, 3), 90, np.uint8)).save(folder / f"{name}.png")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = run_script("predict.py", folder, "-o", tmp_path / "out", "--checkpoint", resized, *CPU)
    assert result.returncode == 1, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 1 and "b.png" in warnings[0]
    assert "1 input could not be read" in result.stderr and "Traceback" not in result.stderr
    assert [row["name"] for row in rows_of(tmp_path / "out")] == ["a", "c"]
    assert sorted(path.name for path in (tmp_path / "out").glob("*_mask.png")) == ["a_mask.png", "c_mask.png"]


def test_folder_without_images_is_one_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no pictures here")
    assert run(tmp_path / "empty", "-o", tmp_path / "out", *CPU) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: no images ({', '.join(prediction.INPUT_SUFFIXES)}) in folder {tmp_path / 'empty'}"]
    assert not (tmp_path / "out").exists()


def test_subfolders_and_other_files_are_named_not_read(resized, tmp_path, capsys):
    folder = tmp_path / "in"
    (folder / "more").mkdir(parents=True)
    for path in (folder / "top.png", folder / "more" / "inner.png"):
        Image.fromarray(np.full((24, 32, 3), 90, np.uint8)).save(path)
    (folder / "scan.dcm").write_bytes(b"DICM")
    (folder / ".DS_Store").write_bytes(b"\0")
    assert run(folder, "-o", tmp_path / "out", "--checkpoint", resized, *CPU) == 0
    assert [row["name"] for row in rows_of(tmp_path / "out")] == ["top"]
    notices = [line for line in capsys.readouterr().err.splitlines() if line.startswith("notice:")]
    assert notices == [f"notice: in {folder}, not read: subfolders more (name them as inputs); "
                       f"files of other types scan.dcm"]
    (folder / "top.png").unlink()
    assert run(folder, "-o", tmp_path / "out2", "--checkpoint", resized, *CPU) == 2
    assert "its subfolders (more) are not searched: name them as inputs" in capsys.readouterr().err


def test_masks_without_foreground_are_warned_about(resized, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    ramp = np.linspace(0, 200, 32, dtype=np.uint8)
    for name, levels in (("ramp", ramp), ("dim", ramp // 8)):
        Image.fromarray(np.broadcast_to(levels[None, :, None], (24, 32, 3)).copy()).save(folder / f"{name}.png")
    # No probability reaches 0.9999 for this untrained model, so every mask is empty.
    assert run(folder, "-o", tmp_path / "out", "--checkpoint", resized, "--threshold", "0.9999", *CPU) == 0
    assert all(float(row["foreground_fraction"]) == 0 for row in rows_of(tmp_path / "out"))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 2 of 2 masks have no foreground at threshold "
                                                         "0.9999 (dim, ramp)")


def test_single_colour_images_are_warned_about(resized, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    noisy_black = rng.integers(0, 3, (24, 32, 3)).astype(np.uint8)  # JPEG-like noise of 2 grey levels
    faint_line = np.full((24, 32, 3), 90, np.uint8)
    faint_line[12] = 93  # 3 grey levels of structure: an image, however faint
    for name, image in (("black", noisy_black), ("grey", np.full((24, 32, 3), (90, 60, 30), np.uint8)),
                        ("line", faint_line)):
        Image.fromarray(image).save(folder / f"{name}.png")
    assert run(folder, "-o", tmp_path / "out", "--checkpoint", resized, *CPU) == 0
    assert len(rows_of(tmp_path / "out")) == 3  # still predicted and written: the warning only says what they are
    warnings = [line for line in capsys.readouterr().err.splitlines() if "single colour" in line]
    assert warnings == ["warning: 2 of 3 images are a single colour (black, grey): there is nothing in them to "
                        "segment, so their masks mean nothing; check that these are the right files"]


def test_missing_input_is_one_error(tmp_path, capsys):
    assert run(tmp_path / "nothing.png", "-o", tmp_path / "out", *CPU) == 2
    assert capsys.readouterr().err.strip() == f"error: input {tmp_path / 'nothing.png'} not found"


def test_non_empty_output_is_refused_unless_overwrite(resized, tmp_path, capsys):
    Image.fromarray(np.full((24, 32, 3), 90, np.uint8)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_mask.png").write_bytes(b"the user's own file")
    assert run(tmp_path / "a.png", "-o", out, "--checkpoint", resized, *CPU) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not empty" in err[0] and "--overwrite" in err[0]
    assert [path.name for path in out.iterdir()] == ["a_mask.png"]
    assert (out / "a_mask.png").read_bytes() == b"the user's own file"
    assert run(tmp_path / "a.png", "-o", out, "--checkpoint", resized, "--overwrite", *CPU) == 0
    assert Image.open(out / "a_mask.png").size == (32, 24)


# --- field of view, scale, classes -----------------------------------------------------------------------

def test_fov_masks_from_a_folder(resized, tmp_path, capsys):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    image, _ = fundus(60, 80, (30, 40), 8, seed=3)
    for stem in ("01_test", "02_test"):
        Image.fromarray(image).save(images / f"{stem}.tif")
    inside = disc_mask(60, 80, (30, 40), 20)
    Image.fromarray(inside.astype(np.uint8) * 255).save(masks / "01_test_mask.gif")
    Image.fromarray(inside.astype(np.uint8)).save(masks / "02_test.png")
    out = tmp_path / "out"
    assert run(images, "-o", out, "--checkpoint", resized, "--fov", masks, "--save-float", *CPU) == 0
    rows = rows_of(out)
    assert [row["fov"] for row in rows] == ["01_test_mask.gif", "02_test.png"]
    assert float(rows[0]["fov_fraction"]) == pytest.approx(inside.mean(), abs=1e-4)
    prob = tifffile.imread(out / "01_test_prob.tif")
    assert (prob[~inside] == 0).all() and (prob[inside] > 0).all()
    assert (np.array(Image.open(out / "01_test_mask.png"))[~inside] == 0).all()
    (masks / "02_test.png").unlink()
    capsys.readouterr()
    assert run(images, "-o", tmp_path / "again", "--checkpoint", resized, "--fov", masks, *CPU) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"expected {masks / '02_test'}.png or 02_test_mask.png" in err[0]
    assert not (tmp_path / "again").exists()


def test_scale_auto_brings_the_fov_to_drive_size(native, tmp_path):
    image, _ = fundus(300, 280, (150, 100), 20, seed=4)  # a FOV disc 0.96 x 280 px across
    Image.fromarray(image).save(tmp_path / "small.png")
    out = tmp_path / "out"
    assert run(tmp_path / "small.png", "-o", out, "--checkpoint", native, "--scale", "auto", "--save-float",
               *CPU) == 0
    [row] = rows_of(out)
    expected = fov.scale_to_match(fov.estimate_fov(image), fov.DRIVE_FOV_DIAMETER)
    assert 1.9 < expected < 2.1 and float(row["scale"]) == pytest.approx(expected, abs=1e-4)
    assert tifffile.imread(out / "small_prob.tif").shape == (300, 280)  # back at the native size
    assert run(tmp_path / "small.png", "-o", tmp_path / "half", "--checkpoint", native, "--scale", "0.5",
               "--fov", "none", *CPU) == 0
    assert rows_of(tmp_path / "half")[0]["scale"] == "0.5000"
    assert Image.open(tmp_path / "half" / "small_prob.png").size == (280, 300)


def test_odd_size_at_native_resolution(native, tmp_path):
    image, _ = fundus(611, 397, (300, 200), 30, seed=5)
    Image.fromarray(image).save(tmp_path / "odd.png")
    assert run(tmp_path / "odd.png", "-o", tmp_path / "out", "--checkpoint", native, "--save-float", *CPU) == 0
    prob = tifffile.imread(tmp_path / "out" / "odd_prob.tif")
    assert prob.shape == (611, 397) and prob.dtype == np.float32 and np.isfinite(prob).all()


def test_scale_is_ignored_by_a_resizing_model(resized, tmp_path, capsys):
    Image.fromarray(np.full((24, 32, 3), 90, np.uint8)).save(tmp_path / "a.png")
    assert run(tmp_path / "a.png", "-o", tmp_path / "out", "--checkpoint", resized, "--scale", "2", *CPU) == 0
    assert "--scale 2 ignored" in capsys.readouterr().err
    assert rows_of(tmp_path / "out")[0]["scale"] == "1.0000"
    assert run(tmp_path / "a.png", "-o", tmp_path / "bad", "--scale", "50", *CPU) == 2
    assert "--scale 50 is out of range" in capsys.readouterr().err


def test_multi_class_model_writes_classes(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "oct.pth", dataset="oct", num_classes=11)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56), dtype=np.uint8)).save(tmp_path / "scan.png")
    out = tmp_path / "out"
    assert run(tmp_path / "scan.png", "-o", out, "--checkpoint", checkpoint, "--save-float", *CPU) == 0
    classes = np.array(Image.open(out / "scan_classes.png"))
    assert classes.shape == (40, 56) and classes.max() < 11
    assert np.array(Image.open(out / "scan_overlay.png")).shape == (40, 56, 3)
    assert tifffile.imread(out / "scan_prob.tif").shape == (11, 40, 56)
    assert not (out / "scan_prob.png").exists()
    [row] = rows_of(out)
    assert row["fov"] == "none" and row["fov_fraction"] == "1.0000"    # not a fundus model


def test_scale_auto_needs_a_fundus_model():
    assert prediction.reference_diameter("auto", "drive") == fov.DRIVE_FOV_DIAMETER
    assert prediction.reference_diameter(0.5, "oct") is None
    with pytest.raises(prediction.UserError, match="trained on 'oct'"):
        prediction.reference_diameter("auto", "oct")


def test_an_isbi_model_writes_the_membrane_map_test_py_scores(tmp_path):
    """predict.py's mask of an isbi2012 model is em_cells.membrane_map of its own probabilities under
    --postprocess, as test.py scores it: probability above the threshold without one, the closed map with
    closing, the watershed lines with watershed. This untrained model's output lies within 0.01 of 0.51, so
    the threshold is its median and the seed level its 70th percentile (at 0.5 and 0.2 every map is trivial)."""
    from tasks.em_cells import membrane_map
    checkpoint = tiny_checkpoint(tmp_path / "isbi.pth", dataset="isbi2012", PATCH_SIZE=32)
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 40), dtype=np.uint8)).save(tmp_path / "em.png")
    assert run(tmp_path / "em.png", "-o", tmp_path / "probe", "--checkpoint", checkpoint, "--save-float", *CPU) == 0
    prob = tifffile.imread(tmp_path / "probe" / "em_prob.tif")
    threshold, seed = float(f"{np.median(prob):.6f}"), float(f"{np.quantile(prob, 0.7):.6f}")
    masks = {}
    for postprocess in ("none", "closing", "watershed"):
        out = tmp_path / postprocess
        assert run(tmp_path / "em.png", "-o", out, "--checkpoint", checkpoint, "--postprocess", postprocess,
                   "--threshold", threshold, "--watershed-seed", seed, *CPU) == 0
        masks[postprocess] = np.array(Image.open(out / "em_mask.png")) > 0
        expected = membrane_map(torch.from_numpy(prob)[None], threshold, postprocess, seed)
        np.testing.assert_array_equal(masks[postprocess], expected)
    for postprocess, mask in masks.items():
        assert mask.any() and not mask.all(), postprocess
    assert (masks["closing"] != masks["none"]).any() and (masks["watershed"] != masks["none"]).any()


def test_postprocess_is_refused_for_a_model_of_another_dataset(resized, tmp_path, capsys):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "a.png")
    assert run(tmp_path / "a.png", "-o", tmp_path / "out", "--checkpoint", resized, "--postprocess", "watershed",
               *CPU) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --postprocess watershed applies to the scoring of isbi2012, isbi2012_stack, monuseg, monuseg_contour only")
    assert not (tmp_path / "out").exists()


def grey_page(value, shape=(4, 5)):
    return np.full((*shape, 3), value, np.uint8)


def slice_entry(file_name, name, image):
    """One entry as prediction.distinct_pages yields it: (path, name, image, network input, read seconds)."""
    return Path(file_name), name, image, image, 0.0


def test_stacked_inputs_take_their_neighbours_within_each_stack(capsys):
    """Two single files (a stack of two), a three-page file (its own stack), a colour image (skipped, and no
    one's neighbour), a single file (a stack of one: the three-page file parted it from the first two) and two
    larger single files (a new stack: a slice of another size is no neighbour): red = the slice before, blue =
    the slice after, the slice itself at the end of a stack."""
    red = grey_page(0)
    red[..., 0] = 255
    entries = [slice_entry("a.png", "a", grey_page(10)), slice_entry("b.png", "b", grey_page(20)),
               *[slice_entry("stack.tif", f"stack_p{n}", grey_page(n)) for n in (1, 2, 3)],
               slice_entry("colour.png", "colour", red), slice_entry("c.png", "c", grey_page(30)),
               slice_entry("d.png", "d", grey_page(40, (6, 5))), slice_entry("e.png", "e", grey_page(50, (6, 5)))]
    skipped = []
    inputs = {name: network_input[0, 0].tolist()
              for _, name, _, network_input, _ in prediction.between_neighbours(iter(entries), skipped)}
    assert inputs == {"a": [10, 10, 20], "b": [10, 20, 20], "stack_p1": [1, 1, 2], "stack_p2": [1, 2, 3],
                      "stack_p3": [2, 3, 3], "c": [30, 30, 30], "d": [40, 40, 50], "e": [40, 50, 50]}
    assert len(skipped) == 1 and "colour.png: colour is a colour image" in skipped[0]
    assert "warning: skipped colour of colour.png" in capsys.readouterr().err


def test_a_stack_model_sees_the_same_slices_from_pages_or_files(tmp_path):
    """An isbi2012_stack model: a three-page TIFF and the same pages as three files give the same
    probabilities, and the middle slice's differ from those of that slice predicted alone (its own neighbours)."""
    checkpoint = tiny_checkpoint(tmp_path / "stack.pth", dataset="isbi2012_stack", PATCH_SIZE=32)
    pages = np.random.default_rng(2).integers(0, 255, (3, 40, 48), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "volume.tif", pages, photometric="minisblack")
    (tmp_path / "files").mkdir()
    for index, page in enumerate(pages, start=1):
        Image.fromarray(page).save(tmp_path / "files" / f"volume_p{index}.png")
    (tmp_path / "alone").mkdir()
    Image.fromarray(pages[1]).save(tmp_path / "alone" / "volume_p2.png")
    for source in ("volume.tif", "files", "alone"):
        assert run(tmp_path / source, "-o", tmp_path / f"out_{source}", "--checkpoint", checkpoint, "--save-float",
                   *CPU) == 0
    prob = {source: {index: tifffile.imread(tmp_path / f"out_{source}" / f"volume_p{index}_prob.tif")
                     for index in ((1, 2, 3) if source != "alone" else (2,))}
            for source in ("volume.tif", "files", "alone")}
    for index in (1, 2, 3):
        np.testing.assert_array_equal(prob["volume.tif"][index], prob["files"][index])
    assert np.abs(prob["volume.tif"][2] - prob["alone"][2]).max() > 1e-4
