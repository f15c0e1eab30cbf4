"""--dataset folder: your own images and labels in the layout of docs/folder_dataset.md. Real main.py -> test.py
round trips (binary with masks and a test folder; three classes by k-fold), the classes decided from the labels
and recorded in the checkpoint, the scoring by hand, and one clear error (one line, exit 2) for each mismatch."""
import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import cli
import tasks
from conftest import TINY, script_main
from errors import UserError
from fixtures import save
from tasks.folder import decide_classes, image_named_before, read_picture, score_folder
from tasks.splits import SplitOptions, fold_names


TRAIN, TEST = script_main("main"), script_main("test")


def run(script, *argv):
    return script([str(arg) for arg in argv])
ROUND_TRIP = [*TINY, "--epochs", "1", "--patch-size", "0", "--model", "cenet", "--tta", "false"]


def shapes(index, size=64):
    """An RGB picture of a pale disc and a green square on dark noise, and its class map (1 disc, 2 square)."""
    rows, columns = np.mgrid[:size, :size]
    classes = np.zeros((size, size), np.uint8)
    centre = (18 + (3 * index) % 12, 20 + (5 * index) % 16)
    classes[(rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 < 70] = 1
    classes[42:54, 6 + 2 * index:18 + 2 * index] = 2
    image = 30 + np.random.default_rng(index).integers(0, 20, (size, size, 3))
    image[classes == 1] = (230, 200, 150)
    image[classes == 2] = (90, 170, 60)
    return image.astype(np.uint8), classes


def write_split(root, split, names, values, masks=False, suffix=".png", first=0):
    """ROOT/<split>/images, labels (each class c stored as values[c]) and, with `masks`, a square region each."""
    for index, name in enumerate(names, start=first):
        image, classes = shapes(index)
        save(image, root / split / "images" / f"{name}{suffix}")
        save(np.asarray(values, np.uint8)[classes], root / split / "labels" / f"{name}.png")
        if masks:
            region = np.zeros(classes.shape, np.uint8)
            region[4:60, 4:60] = 255
            save(region, root / split / "masks" / f"{name}.png")
    return root


def write_binary(root):
    """Four training and two test images, 0/255 labels (disc and square both foreground), masks everywhere; the
    test images are JPEG, as photographs often are (labels may not be)."""
    write_split(root, "train", [f"case{n}" for n in range(1, 5)], (0, 255, 255), masks=True)
    return write_split(root, "test", ["case5", "case6"], (0, 255, 255), masks=True, suffix=".jpg", first=4)


def write_three_classes(root, count=6):
    """`count` training images, no test folder (k-fold), labels stored as 0 / 128 / 255."""
    return write_split(root, "train", [f"scan{n:02d}" for n in range(count)], (0, 128, 255))


def read_json(path):
    return json.loads(path.read_text())


def check_summary(summary, keys):
    assert list(summary) == keys
    for key in keys:
        mean = summary[key]["mean"]
        assert mean is not None and 0.0 <= mean <= 1.0, (key, mean)


# --- round trips: main.py then test.py, which takes dataset, root and classes from the checkpoint --------------

BINARY_KEYS = [f"{where} {name}" for where in ("whole", "ROI")
               for name in ("AUC", "Acc", "Sen", "Spe", "F1", "Dice", "IoU")]


def test_binary_round_trip_with_masks_and_a_test_folder(tmp_path, capsys):
    root = write_binary(tmp_path / "mine")
    run(TRAIN, "--dataset", "folder", "--data-root", root, "--weights-dir", tmp_path / "w", "--run-name", "bin",
        *ROUND_TRIP)
    assert "folder dataset: 2 classes (binary: 0 is background, any other value foreground)" in capsys.readouterr().err
    checkpoint = tmp_path / "w" / "bin" / "final.pth"
    payload = torch.load(checkpoint, weights_only=True)
    assert payload["num_classes"] == 1 and payload["settings"]["CLASS_VALUES"] == [0, 255]
    assert read_json(tmp_path / "w" / "bin" / "settings.json")["CLASS_VALUES"] == [0, 255]

    out = tmp_path / "results"
    run(TEST, "--checkpoint", checkpoint, "--out", out, "--device", "cpu", "--tta", "false")
    report = read_json(out / "metrics.json")
    assert report["protocol"]["dataset"] == "folder"
    assert report["protocol"]["evaluation"] == tasks.dataset("folder").notes
    assert set(report["per_image"]) == {"case5", "case6"}
    check_summary(report["summary"], BINARY_KEYS)
    for row in report["per_image"].values():  # Dice is F1 of the thresholded mask whenever both are defined
        if row["ROI F1"] is not None:
            assert row["ROI Dice"] == pytest.approx(row["ROI F1"])
    assert (out / "roc.png").is_file() and (out / "case5_overlay.png").stat().st_size > 0


CLASS_KEYS = ["Dice 1", "Dice 2", "mean Dice", "IoU 1", "IoU 2", "mean IoU"]


def test_three_class_round_trip_by_kfold_uses_the_recorded_classes(tmp_path, capsys):
    root = write_three_classes(tmp_path / "mine")
    run(TRAIN, "--dataset", "folder", "--data-root", root, "--weights-dir", tmp_path / "w", "--run-name", "k3",
        "--num-folds", "3", "--fold", "1", *ROUND_TRIP)
    assert "3 classes of the stored label values (0 -> 0, 128 -> 1, 255 -> 2)" in capsys.readouterr().err
    checkpoint = tmp_path / "w" / "k3" / "final.pth"
    payload = torch.load(checkpoint, weights_only=True)
    assert payload["num_classes"] == 3 and payload["settings"]["CLASS_VALUES"] == [0, 128, 255]

    # A training label that gains a value after training changes what the labels would decide (4 classes),
    # not what the checkpoint recorded: test.py still reads the test fold with the model's 3 classes.
    names = [f"scan{n:02d}" for n in range(6)]
    test_names = fold_names(names, "test", SplitOptions(fold=1, num_folds=3))
    changed = next(name for name in names if name not in test_names)
    label = np.zeros((64, 64), np.uint8)
    label[:8] = 64
    save(label, root / "train" / "labels" / f"{changed}.png")
    out = tmp_path / "results"
    run(TEST, "--checkpoint", checkpoint, "--out", out, "--device", "cpu", "--tta", "false")
    report = read_json(out / "metrics.json")
    assert set(report["per_image"]) == set(test_names) and len(test_names) == 2
    check_summary(report["summary"], CLASS_KEYS)
    assert not (out / "roc.png").exists()


def test_a_bare_state_dict_is_evaluated_with_the_classes_its_labels_decide(tmp_path, capsys):
    """Weights without a record of their training: the classes come from the folder's training labels."""
    import networks
    root = write_three_classes(tmp_path / "mine")
    write_split(root, "test", ["t1"], (0, 128, 255), first=7)
    path = tmp_path / "bare.pth"
    torch.save(networks.build_model("backbone", num_classes=3).state_dict(), path)
    out = tmp_path / "results"
    run(TEST, "--checkpoint", path, "--dataset", "folder", "--data-root", root, "--model", "backbone",
        "--image-size", "64", "--out", out, "--device", "cpu", "--tta", "false")
    assert "3 classes of the stored label values" in capsys.readouterr().err
    assert list(read_json(out / "metrics.json")["per_image"]) == ["t1"]
    torch.save(networks.build_model("backbone", num_classes=1).state_dict(), path)
    line = one_line_error(TEST, ["--checkpoint", path, "--dataset", "folder", "--data-root", root, "--model",
                                 "backbone", "--device", "cpu"], capsys)
    assert "does not fit architecture 'backbone'" in line


# --- the classes ------------------------------------------------------------------------------------------------

def labels_with(tmp_path, *stored, dtype=np.uint8, suffix=".png"):
    """A root whose training labels hold the given values (one label per tuple of values)."""
    root = tmp_path / "values"
    for index, values in enumerate(stored):
        save(np.zeros((8, 8, 3), np.uint8), root / "train" / "images" / f"i{index}.png")
        label = np.zeros((8, 8), dtype)
        label.flat[:len(values)] = values
        path = root / "train" / "labels" / f"i{index}{suffix}"
        if suffix == ".tif":
            path.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(path, label)
        else:
            save(label, path)
    return root


@pytest.mark.parametrize("stored, expected", [
    (((0, 1), (0,)), (0, 1)),                # 0/1: binary
    (((0, 255), (0, 255)), (0, 255)),        # 0/255: binary
    (((255,), (255,)), (0, 255)),            # foreground everywhere is still one foreground value
    (((0, 1, 2), (0, 2)), (0, 1, 2)),        # class indices
    (((0, 128), (0, 255)), (0, 128, 255)),   # grey levels, over all the labels together
])
def test_the_training_labels_decide_the_classes(stored, expected, tmp_path):
    assert decide_classes(labels_with(tmp_path, *stored)) == expected


def test_sixteen_bit_labels_and_declared_classes(tmp_path):
    root = labels_with(tmp_path, (0, 1000, 2000), dtype=np.uint16, suffix=".tif")
    assert decide_classes(root) == (0, 1000, 2000)
    assert decide_classes(root, declared=4) == (0, 1, 2, 3)  # declared: labels are 0..K-1, whatever is stored


def test_binary_labels_read_any_nonzero_as_foreground(tmp_path):
    root = write_split(tmp_path / "mine", "train", ["a", "b"], (0, 255, 255))
    save(np.where(shapes(1)[1] > 0, 7, 0).astype(np.uint8), root / "train" / "labels" / "b.png")  # stored as 7
    options = SplitOptions(num_folds=2, class_values=(0, 255))
    samples = sorted(tasks.load_split("folder", root, "train", options) + tasks.load_split("folder", root, "test",
                                                                                           options),
                     key=lambda sample: sample.name)
    assert [sample.name for sample in samples] == ["a", "b"]
    assert np.array_equal(samples[1].label, (shapes(1)[1] > 0).astype(np.uint8))
    assert samples[0].fov is None and samples[0].image.shape == (64, 64, 3)


def add_ending(folder, ending):
    for path in sorted(folder.iterdir()):
        path.rename(path.with_name(f"{path.stem}{ending}{path.suffix}"))


def test_labels_and_masks_that_add_an_ending_to_the_image_name_pair_with_their_image(tmp_path, capsys):
    root = write_binary(tmp_path / "isic")
    for split in ("train", "test"):
        add_ending(root / split / "labels", "_segmentation")
        add_ending(root / split / "masks", "_mask")
    options = SplitOptions(class_values=(0, 255))
    samples = tasks.load_split("folder", root, "train", options) + tasks.load_split("folder", root, "test", options)
    assert [sample.name for sample in samples] == [f"case{n}" for n in range(1, 7)]
    for index, sample in enumerate(samples):
        assert np.array_equal(sample.label, (shapes(index)[1] > 0).astype(np.uint8))
        assert sample.fov.sum() == 56 * 56
    assert f"labels in {root / 'train' / 'labels'} are named <image name>_segmentation" in capsys.readouterr().err
    assert decide_classes(root) == (0, 255)


@pytest.mark.parametrize("stem, names, owner", [
    ("case10_anno", {"case1", "case10"}, "case10"),
    ("case1_anno", {"case1", "case10"}, "case1"),
    ("case10", {"case1"}, None),                       # case1 and case10 are different images
    ("benign (1)_mask", {"benign (1)"}, "benign (1)"),
    ("21_training_mask", {"21_training"}, "21_training"),
])
def test_the_image_a_name_begins_with(stem, names, owner):
    assert image_named_before(stem, names) == owner


def test_sixteen_bit_grey_images_are_windowed_not_clipped(tmp_path):
    path = tmp_path / "scan.png"
    from PIL import Image
    Image.fromarray(np.linspace(0, 4000, 64 * 64).reshape(64, 64).astype(np.uint16)).save(path)
    image = read_picture(path)
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
    assert image.min() == 0 and image.max() == 255 and len(np.unique(image)) > 200


def test_training_images_are_read_as_predict_reads_them(tmp_path):
    import cv2
    import prediction
    from PIL import Image
    rng = np.random.default_rng(3)
    deep = (rng.random((12, 14, 3)) * 4000).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), deep)                       # 16-bit colour
    rgba = (rng.random((12, 14, 4)) * 255).astype(np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")                    # partly transparent
    turned = Image.fromarray((rng.random((12, 14, 3)) * 255).astype(np.uint8))
    tags = turned.getexif()
    tags[0x0112] = 8                                                    # shown turned 90 degrees anticlockwise
    turned.save(tmp_path / "turned.png", exif=tags)
    floats = rng.random((12, 14)).astype(np.float32)
    floats[0, 0] = np.nan
    tifffile.imwrite(tmp_path / "floats.tif", floats)
    for name in ("deep.png", "rgba.png", "turned.png", "floats.tif"):
        [(_, predicted)] = prediction.read_pages(tmp_path / name)
        assert np.array_equal(read_picture(tmp_path / name), predicted), name
    assert read_picture(tmp_path / "turned.png").shape == (14, 12, 3)
    assert np.array_equal(read_picture(tmp_path / "rgba.png"),
                          np.round(rgba[..., :3] * (rgba[..., 3:] / 255.0)).astype(np.uint8))
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(UserError, match="holds 2 pages; a training image is one picture"):
        read_picture(tmp_path / "stack.tif")


# --- scoring by hand --------------------------------------------------------------------------------------------

def test_binary_scores_inside_the_mask_and_whole():
    truth = np.zeros((4, 4), np.uint8)
    truth[:2, :2] = 1                                   # 4 foreground pixels
    prob = torch.full((1, 4, 4), 0.1)
    prob[0, :2, :1] = 0.9                               # 2 of them found
    prob[0, 3, 3] = 0.8                                 # one false positive, outside the mask
    region = np.ones((4, 4), bool)
    region[3] = False
    row, curve = score_folder(prob, tasks.Sample("x", np.zeros((4, 4, 3), np.uint8), truth, region), 0.5)
    assert list(row) == BINARY_KEYS and curve is not None
    assert row["ROI Dice"] == pytest.approx(2 * 2 / (2 + 4)) and row["ROI IoU"] == pytest.approx(2 / 4)
    assert row["whole Dice"] == pytest.approx(2 * 2 / (3 + 4)) and row["whole IoU"] == pytest.approx(2 / 5)
    assert row["ROI Spe"] == 1.0 and row["whole Spe"] == pytest.approx(11 / 12)
    assert row["ROI Dice"] == pytest.approx(row["ROI F1"])
    plain, _ = score_folder(prob, tasks.Sample("x", np.zeros((4, 4, 3), np.uint8), truth), 0.5)
    assert list(plain) == ["AUC", "Acc", "Sen", "Spe", "F1", "Dice", "IoU"]


def test_multiclass_scores_per_class_and_their_mean():
    truth = np.array([[0, 1, 1, 2]] * 2, np.uint8)
    predicted = np.array([[0, 1, 2, 2]] * 2)
    prob = torch.nn.functional.one_hot(torch.from_numpy(predicted), 4).permute(2, 0, 1).float()  # class 3: nowhere
    row, curve = score_folder(prob, tasks.Sample("m", np.zeros((2, 4, 3), np.uint8), truth), 0.5)
    assert curve is None and list(row) == ["Dice 1", "Dice 2", "Dice 3", "mean Dice", "IoU 1", "IoU 2", "IoU 3",
                                           "mean IoU"]
    assert row["Dice 1"] == pytest.approx(2 / 3) and row["Dice 2"] == pytest.approx(2 / 3)
    assert row["IoU 1"] == pytest.approx(1 / 2) and row["IoU 2"] == pytest.approx(1 / 2)
    assert np.isnan(row["Dice 3"]) and np.isnan(row["IoU 3"])  # absent from both: left out of the mean
    assert row["mean Dice"] == pytest.approx(2 / 3) and row["mean IoU"] == pytest.approx(1 / 2)


# --- bad input: one line on stderr, exit code 2, no traceback ---------------------------------------------------

def one_line_error(script, argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.run(lambda: run(script, *argv))
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert stopped.value.code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def train_error(root, capsys, *flags):
    return one_line_error(TRAIN, ["--dataset", "folder", "--data-root", root, "--weights-dir", root.parent / "w",
                                  *TINY, *flags], capsys)


@pytest.fixture
def binary_root(tmp_path):
    return write_binary(tmp_path / "mine")


def test_missing_label_names_the_image_and_the_expected_file(binary_root, capsys):
    (binary_root / "train" / "labels" / "case3.png").unlink()
    line = train_error(binary_root, capsys)
    assert f"label for image {binary_root / 'train' / 'images' / 'case3.png'} missing: expected " \
           f"{binary_root / 'train' / 'labels' / 'case3'} with one of .png" in line


def test_missing_mask_names_the_image(binary_root, capsys):
    (binary_root / "train" / "masks" / "case2.png").unlink()
    line = train_error(binary_root, capsys)
    assert "mask for image " in line and "case2.png missing" in line


def test_label_endings_that_differ_are_refused(binary_root, capsys):
    labels = binary_root / "train" / "labels"
    add_ending(labels, "_mask")
    (labels / "case2_mask.png").rename(labels / "case2_mask_1.png")
    line = train_error(binary_root, capsys)
    assert f"the labels in {labels} add different endings to their image names" in line and "_mask_1" in line


def test_a_missing_label_among_labels_with_an_ending_names_the_expected_file(binary_root, capsys):
    labels = binary_root / "train" / "labels"
    add_ending(labels, "_anno")
    (labels / "case3_anno.png").unlink()
    assert f"expected {labels / 'case3_anno'}.png" in train_error(binary_root, capsys)


def test_label_of_another_size_names_both_sizes(binary_root, capsys):
    save(np.zeros((48, 64), np.uint8), binary_root / "train" / "labels" / "case1.png")
    line = train_error(binary_root, capsys)
    assert "size mismatch" in line and "case1.png is 64x64 but" in line and "case1.png is 64x48" in line


def test_label_values_outside_the_declared_classes(tmp_path, capsys):
    root = write_three_classes(tmp_path / "mine")
    line = train_error(root, capsys, "--folder-classes", "3")
    assert "has value 128, which is none of the 3 classes" in line and "--folder-classes" in line


def test_test_label_with_a_value_training_never_saw(tmp_path):
    root = write_three_classes(tmp_path / "mine")
    write_split(root, "test", ["new"], (0, 128, 200))
    values = decide_classes(root)
    with pytest.raises(UserError, match="new.png has value 200, which is none of the 3 classes"):
        tasks.load_split("folder", root, "test", SplitOptions(class_values=values))


def test_empty_images_folder(binary_root, capsys):
    for path in (binary_root / "train" / "images").iterdir():
        path.unlink()
    assert "no images (.png" in train_error(binary_root, capsys)


@pytest.mark.parametrize("folder, name, message", [
    ("images", "case2.png", "cannot read"),
    ("labels", "case2.png", "cannot read"),
])
def test_unreadable_files(binary_root, capsys, folder, name, message):
    (binary_root / "train" / folder / name).write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    line = train_error(binary_root, capsys)
    assert message in line and name in line and "intact copy" in line


def test_lossy_label_is_refused(binary_root, capsys):
    labels = binary_root / "train" / "labels"
    (labels / "case1.png").rename(labels / "case1.jpg")
    assert f"label {labels / 'case1.jpg'} is a lossy .jpg file" in train_error(binary_root, capsys)


def jpeg_labels(root):
    """Two training and two test images whose 0/255 labels are saved as JPEG (one as an RGB JPEG, as some
    collections store masks); returns {name: (JPEG path, the class map it was made from)}."""
    written = {}
    for split, names, first in (("train", ["a", "b"], 0), ("test", ["c", "d"], 2)):
        for index, name in enumerate(names, start=first):
            image, classes = shapes(index)
            save(image, root / split / "images" / f"{name}.png")
            mask = np.where(classes > 0, 255, 0).astype(np.uint8)
            if name == "b":
                mask = np.repeat(mask[..., None], 3, axis=-1)
            written[name] = (save(mask, root / split / "labels" / f"{name}.jpg"), classes > 0)
    return written


def test_jpeg_binary_masks_read_with_a_label_threshold(tmp_path, capsys):
    root = tmp_path / "polyps"
    written = jpeg_labels(root)
    stored = np.asarray(Image.open(written["a"][0]))
    assert len(np.unique(stored)) > 2    # the compression did smear the edges: values between 0 and 255
    with pytest.raises(UserError, match="--label-threshold 128"):
        decide_classes(root)
    assert decide_classes(root, threshold=128) == (0, 1)
    assert decide_classes(root, declared=2, threshold=128) == (0, 1)
    samples = tasks.load_split("folder", root, "train", SplitOptions(label_threshold=128))
    for sample in samples:
        path, truth = written[sample.name]
        values = np.asarray(Image.open(path))
        values = values.max(axis=-1) if values.ndim == 3 else values
        assert np.array_equal(sample.label, (values >= 128).astype(np.uint8))
        assert (sample.label == truth).mean() > 0.99    # the threshold undoes the smearing


def test_a_label_threshold_is_recorded_and_test_reads_labels_with_it(tmp_path, capsys):
    root = tmp_path / "polyps"
    jpeg_labels(root)
    run(TRAIN, "--dataset", "folder", "--data-root", root, "--weights-dir", tmp_path / "w", "--run-name", "jpg",
        "--label-threshold", "128", *ROUND_TRIP)
    assert "read as binary masks at --label-threshold 128" in capsys.readouterr().err
    checkpoint = tmp_path / "w" / "jpg" / "final.pth"
    settings = torch.load(checkpoint, weights_only=True)["settings"]
    assert settings["CLASS_VALUES"] == [0, 1] and settings["LABEL_THRESHOLD"] == 128
    out = tmp_path / "results"
    run(TEST, "--checkpoint", checkpoint, "--out", out, "--device", "cpu", "--tta", "false")
    report = read_json(out / "metrics.json")
    assert set(report["per_image"]) == {"c", "d"}
    check_summary(report["summary"], [f"{name}" for name in ("AUC", "Acc", "Sen", "Spe", "F1", "Dice", "IoU")])


def test_label_threshold_errors(binary_root, capsys):
    assert "--label-threshold -1 is out of range" in train_error(binary_root, capsys, "--label-threshold", "-1")
    line = train_error(binary_root, capsys, "--label-threshold", "128", "--folder-classes", "3")
    assert "declares 3 classes; drop one of the two" in line
    save(np.zeros((64, 64), np.uint8), binary_root / "train" / "labels" / "case1.png")
    for name in ("case2", "case3", "case4"):    # 0/1 labels: no value reaches 128
        save(shapes(1)[1].clip(0, 1), binary_root / "train" / "labels" / f"{name}.png")
    line = train_error(binary_root, capsys, "--label-threshold", "128")
    assert "is 0 (background only) at --label-threshold 128 (no stored value reaches it)" in line


def test_empty_mask_is_refused(binary_root, capsys):
    save(np.zeros((64, 64), np.uint8), binary_root / "train" / "masks" / "case4.png")
    assert "case4.png has no pixel inside" in train_error(binary_root, capsys)


def test_test_folder_without_labels(binary_root):
    for path in (binary_root / "test" / "labels").iterdir():
        path.unlink()
    (binary_root / "test" / "labels").rmdir()
    with pytest.raises(UserError, match="test labels folder .* not found.*remove ROOT/test to test by k-fold"):
        tasks.load_split("folder", binary_root, "test", SplitOptions())


def test_colour_labels_that_would_merge_classes(tmp_path, capsys):
    root = write_split(tmp_path / "mine", "train", ["a", "b"], (0, 255, 255))
    colour = np.zeros((64, 64, 3), np.uint8)
    colour[:10, :, 0] = 255  # red
    colour[10:20, :, 1] = 255  # green: the same strongest value as red
    save(colour, root / "train" / "labels" / "a.png")
    assert "colours would merge into one class" in train_error(root, capsys)


@pytest.mark.parametrize("flags, message", [
    (("--folder-classes", "1"), "--folder-classes 1 is out of range"),
    ((), "is 0 (background only)"),
])
def test_bad_class_settings(tmp_path, capsys, flags, message):
    root = write_split(tmp_path / "mine", "train", ["a", "b"], (0, 0, 0))
    assert message in train_error(root, capsys, *flags)


def test_missing_root_and_missing_training_folder(tmp_path, capsys):
    assert "folder dataset root" in train_error(tmp_path / "nothing", capsys)
    (tmp_path / "empty").mkdir()
    assert "training folder" in train_error(tmp_path / "empty", capsys)


def test_many_grey_levels_are_not_taken_for_classes(tmp_path, capsys):
    root = labels_with(tmp_path, tuple(range(0, 40)), dtype=np.uint8)
    line = train_error(root, capsys)
    assert "hold 40 distinct values" in line and "--folder-classes 40" in line
