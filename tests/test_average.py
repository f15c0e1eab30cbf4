"""average.py: the mean of a run's snapshots, against hand-computed means; the BatchNorm statistics measured
again on the training images; the record it keeps; and one-line refusals of what cannot be averaged."""
import json

import pytest
import torch

import devices
import framework
import inference
import main
import tasks
import training
from conftest import TINY, module_folder, run_in_process
from errors import UserError


def test_the_mean_is_taken_per_tensor_in_its_own_dtype_and_counters_come_from_the_last():
    first = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([0.5], dtype=torch.float16),
             "n": torch.tensor(3)}
    second = {"w": torch.tensor([3.0, 6.0]), "h": torch.tensor([1.5], dtype=torch.float16),
              "n": torch.tensor(7)}
    third = {"w": torch.tensor([2.0, 1.0]), "h": torch.tensor([1.0], dtype=torch.float16),
             "n": torch.tensor(9)}
    mean = framework.average_state_dicts([first, second, third], ["a", "b", "c"])
    assert torch.equal(mean["w"], torch.tensor([2.0, 3.0]))
    assert mean["h"].dtype == torch.float16 and mean["h"].item() == 1.0
    assert mean["n"].item() == 9 and mean["n"].dtype == torch.int64
    assert first["w"].tolist() == [1.0, 2.0]  # the inputs are left as they were


def test_dicts_of_different_architectures_are_refused():
    with pytest.raises(UserError, match="b and a hold different tensors .e.g. extra"):
        framework.average_state_dicts([{"w": torch.zeros(2)}, {"w": torch.zeros(2), "extra": torch.zeros(1)}],
                                      ["a", "b"])
    with pytest.raises(UserError, match="e.g. w"):
        framework.average_state_dicts([{"w": torch.zeros(2)}, {"w": torch.zeros(3)}], ["a", "b"])
    with pytest.raises(UserError, match="at least two"):
        framework.average_state_dicts([{"w": torch.zeros(2)}], ["a"])


@pytest.fixture(scope="module")
def snapshots(small_drive, tmp_path_factory):
    """A 4-step CE-Net run on two DRIVE images with snapshots at steps 1 to 3, and its final.pth (step 4)."""
    with module_folder(tmp_path_factory, "average_weights") as weights:
        yield training.train(*main.parse_settings([*TINY, "--data-root", str(small_drive), "--weights-dir",
                                                   str(weights), "--run-name", "run", "--epochs", "4",
                                                   "--snapshot-every", "1", "--checkpoint-every", "0"]))


def loaded(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_kept_statistics_give_exactly_the_mean_of_the_snapshots(snapshots, tmp_path):
    paths = [snapshots / "step_2.pth", snapshots / "final.pth", snapshots / "step_3.pth"]
    out = tmp_path / "mean.pth"
    result = run_in_process("average.py", *paths, "--out", out, "--bn", "keep")
    assert result.returncode == 0, result.stderr
    assert "the mean of 3 checkpoints (steps 2, 3, 4)" in result.stdout
    averaged = loaded(out)
    sources = [loaded(path) for path in paths]
    for key, value in averaged["state_dict"].items():
        if value.is_floating_point():
            expected = sum(source["state_dict"][key].double() for source in sources) / 3
            torch.testing.assert_close(value, expected.float(), rtol=0, atol=1e-7)
        else:
            assert torch.equal(value, sources[1]["state_dict"][key]), key
    final = sources[1]
    assert averaged["format"] == framework.CHECKPOINT_FORMAT and averaged["step"] == 4
    assert averaged["settings"] == final["settings"] and averaged["model"] == final["model"]
    assert [entry["step"] for entry in averaged["averaged_from"]] == [2, 3, 4]
    assert averaged["averaged_from"][0]["checkpoint"] == str(paths[0])
    assert "mean of the averaged checkpoints' own" in averaged["batchnorm"]


def test_remeasured_statistics_are_those_of_the_training_images(snapshots, tmp_path):
    paths = [snapshots / "step_1.pth", snapshots / "step_3.pth"]
    kept, measured = tmp_path / "kept.pth", tmp_path / "measured.pth"
    assert run_in_process("average.py", *paths, "--out", kept, "--bn", "keep").returncode == 0
    result = run_in_process("average.py", *paths, "--out", measured)
    assert result.returncode == 0, result.stderr
    assert "measured again on 2 drive training images" in result.stderr

    # The same measurement made by hand on the kept checkpoint's model.
    payload = loaded(kept)
    settings = payload["settings"]
    model = framework.model_from_state_dict(payload["model"], payload["num_classes"], payload["state_dict"], kept)
    samples = tasks.load_split("drive", settings["DATA_ROOT"], "train", tasks.SplitOptions.from_settings(settings))
    cpu = torch.device("cpu")
    fmt = devices.inference_memory_format(cpu, settings["CHANNELS_LAST"])
    inference.adapt_batchnorm(model.to(memory_format=fmt), samples, cpu, amp=settings["AMP"], fmt=fmt,
                              preprocess=settings["PREPROCESS"], image_size=settings["IMAGE_SIZE"])
    by_hand = model.state_dict()
    remeasured = loaded(measured)["state_dict"]
    changed = 0
    for key, value in remeasured.items():
        if key.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(value, by_hand[key], rtol=1e-3, atol=1e-4)  # bf16 kernels
            changed += not torch.allclose(value, payload["state_dict"][key])
        elif value.is_floating_point():
            assert torch.equal(value, payload["state_dict"][key]), key  # learned weights stay the mean
    assert changed > 0


def test_the_averaged_checkpoint_is_scored_by_test_py(snapshots, tmp_path):
    out = tmp_path / "mean.pth"
    assert run_in_process("average.py", snapshots / "step_1.pth", snapshots / "final.pth", "--out", out,
                          "--bn", "keep").returncode == 0
    result = run_in_process("test.py", "--checkpoint", out, "--device", "cpu", "--tta", "false",
                            "--out", tmp_path / "scored")
    assert result.returncode == 0, result.stderr
    scored = json.loads((tmp_path / "scored" / "metrics.json").read_text())
    assert scored["protocol"]["checkpoint"] == str(out) and scored["protocol"]["train_steps"] == 4
    assert set(scored["per_image"]) == {"01", "02"} and 0 <= scored["summary"]["FOV AUC"]["mean"] <= 1


def test_what_cannot_be_averaged_is_one_line(snapshots, tmp_path, small_drive):
    step_1, final = snapshots / "step_1.pth", snapshots / "final.pth"
    taken = tmp_path / "taken.pth"
    taken.write_bytes(b"keep me")
    resume_point = tmp_path / "last.pth"
    torch.save({"format": framework.RESUME_FORMAT, "state_dict": {}}, resume_point)
    other = tmp_path / "other.pth"
    payload = loaded(final)
    torch.save({**payload, "model": "unet"}, other)
    cases = [
        ((step_1, "--out", tmp_path / "a.pth"), "at least two checkpoints"),
        ((step_1, step_1, "--out", tmp_path / "a.pth"), "named twice"),
        ((step_1, final, "--out", taken), "already exists; refusing to overwrite"),
        ((step_1, resume_point, "--out", tmp_path / "a.pth"), "is a resume point"),
        ((step_1, other, "--out", tmp_path / "a.pth"), "has model 'unet' but"),
        ((step_1, tmp_path / "missing.pth", "--out", tmp_path / "a.pth"), "not found"),
        ((step_1, final, "--out", tmp_path / "a.pth", "--data-root", tmp_path / "nowhere"), "does not exist"),
    ]
    for args, message in cases:
        result = run_in_process("average.py", *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert taken.read_bytes() == b"keep me"
    assert not (tmp_path / "a.pth").exists()


def test_only_real_differences_between_the_runs_are_named(snapshots, tmp_path):
    final = loaded(snapshots / "final.pth")
    older = dict(final, settings={key: value for key, value in final["settings"].items() if key != "LABEL_THRESHOLD"})
    other_lr = dict(final, settings=dict(final["settings"], LR=1.0, SEED=5, RUN_NAME="other"))
    torch.save(older, tmp_path / "older.pth")  # written before LABEL_THRESHOLD existed: its default, 0, applies
    torch.save(other_lr, tmp_path / "other_lr.pth")
    same = run_in_process("average.py", snapshots / "step_1.pth", tmp_path / "older.pth", "--out", tmp_path / "a.pth",
                          "--bn", "keep")
    assert same.returncode == 0 and "notice" not in same.stderr, same.stderr
    differing = run_in_process("average.py", snapshots / "step_1.pth", tmp_path / "other_lr.pth",
                               "--out", tmp_path / "b.pth", "--bn", "keep")
    assert differing.returncode == 0
    assert "notice: these checkpoints were trained with different LR, SEED; averaging them anyway" in differing.stderr
