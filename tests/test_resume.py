"""A run stopped by a signal saves itself and resumes bit for bit; outputs that cannot be written are one line."""
import os
import signal

import pytest
import torch

import framework
import main
import training
from conftest import TINY, run_script
from errors import UserError


def settings(small_drive, weights, name, *extra):
    return main.parse_settings([*TINY, "--data-root", str(small_drive), "--weights-dir", str(weights),
                                "--run-name", name, "--epochs", "10", *extra])


def test_a_stopped_run_resumes_to_the_same_weights_as_an_uninterrupted_one(small_drive, tmp_path, monkeypatch,
                                                                            capsys):
    straight = training.train(*settings(small_drive, tmp_path, "straight", "--checkpoint-every", "0"))

    real_step = framework.Trainer.step

    def step_then_sigterm(self):
        loss = real_step(self)
        if self.step_count == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # what a cluster's time limit sends
        return loss

    monkeypatch.setattr(framework.Trainer, "step", step_then_sigterm)
    with pytest.raises(SystemExit) as stopped:
        training.train(*settings(small_drive, tmp_path, "cut", "--checkpoint-every", "3"))
    monkeypatch.undo()
    assert stopped.value.code == 128 + signal.SIGTERM
    last = tmp_path / "cut" / "last.pth"
    said = capsys.readouterr().err
    assert f"stopped at step 5 of 10; saved {last}; continue with: python main.py --resume {last}" in said
    assert torch.load(last, weights_only=True)["step"] == 5 and not (tmp_path / "cut" / "final.pth").exists()

    resumed = training.train(*main.parse_settings(["--resume", str(last)]))
    assert resumed == tmp_path / "cut" and not last.exists()
    expected = torch.load(straight / "final.pth", weights_only=True)
    got = torch.load(resumed / "final.pth", weights_only=True)
    assert got["step"] == 10
    for key, value in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key
    assert (resumed / "train_log.csv").read_text() == (straight / "train_log.csv").read_text()


@pytest.mark.parametrize("min_seconds, saved_at", [("0", [3, 6, 9]), ("3600", [])])
def test_resume_points_come_every_checkpoint_every_steps_but_no_closer_than_the_minimum_time(
        small_drive, tmp_path, monkeypatch, min_seconds, saved_at):
    steps = []
    real_save = framework.save_resume_point

    def recording_save(path, trainer, *args, **kwargs):
        steps.append(trainer.step_count)
        return real_save(path, trainer, *args, **kwargs)

    monkeypatch.setattr(framework, "save_resume_point", recording_save)
    training.train(*settings(small_drive, tmp_path, "run", "--checkpoint-every", "3",
                             "--checkpoint-min-seconds", min_seconds))
    assert steps == saved_at  # none at the last step: final.pth holds it


def test_resume_refuses_a_file_that_is_not_a_resume_point(tmp_path):
    path = tmp_path / "final.pth"
    torch.save({"format": framework.CHECKPOINT_FORMAT, "state_dict": {}}, path)
    with pytest.raises(UserError, match="is not a resume point"):
        framework.read_resume_point(path)


def test_a_failed_write_leaves_the_previous_file_and_no_partial(tmp_path, monkeypatch):
    path = framework.write_atomically({"step": 1}, tmp_path / "last.pth")

    def disk_full(payload, target):
        with open(target, "wb") as handle:
            handle.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match=r"No space left on device.*previous resume point there is intact"):
        framework.write_atomically({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [item.name for item in tmp_path.iterdir()] == ["last.pth"]


def test_unwritable_weights_dir_is_one_line(small_drive, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_script("main.py", *TINY, "--data-root", small_drive, "--weights-dir", blocker)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: cannot write to" in result.stderr and "--weights-dir" in result.stderr


def test_an_empty_checkpoint_file_is_one_line(tmp_path):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    result = run_script("test.py", "--checkpoint", path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is not a readable PyTorch checkpoint" in result.stderr


def test_snapshots_hold_the_weights_of_their_step_and_survive_a_resume(small_drive, tmp_path, monkeypatch):
    straight = training.train(*settings(small_drive, tmp_path, "straight", "--snapshot-every", "4",
                                        "--checkpoint-every", "0"))
    assert sorted(path.name for path in straight.glob("step_*.pth")) == ["step_4.pth", "step_8.pth"]

    real_step = framework.Trainer.step

    def step_then_sigterm(self):
        loss = real_step(self)
        if self.step_count == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(framework.Trainer, "step", step_then_sigterm)
    with pytest.raises(SystemExit):
        training.train(*settings(small_drive, tmp_path, "cut", "--snapshot-every", "4", "--checkpoint-every", "0"))
    monkeypatch.undo()
    resume_point = torch.load(tmp_path / "cut" / "last.pth", weights_only=True)
    assert resume_point["step"] == 4
    for name in ("step_4.pth", "step_8.pth"):
        snapshot = torch.load(straight / name, weights_only=True)
        assert snapshot["step"] == int(name[5:-4]) and snapshot["format"] == framework.CHECKPOINT_FORMAT
    snapshot = torch.load(straight / "step_4.pth", weights_only=True)
    for key, value in resume_point["state_dict"].items():
        assert torch.equal(snapshot["state_dict"][key], value), key
    final = torch.load(straight / "final.pth", weights_only=True)
    assert any(not torch.equal(final["state_dict"][key], value) for key, value in snapshot["state_dict"].items())

    resumed = training.train(*main.parse_settings(["--resume", str(tmp_path / "cut" / "last.pth")]))
    assert sorted(path.name for path in resumed.glob("step_*.pth")) == ["step_4.pth", "step_8.pth"]
    again = torch.load(resumed / "step_8.pth", weights_only=True)
    for key, value in torch.load(straight / "step_8.pth", weights_only=True)["state_dict"].items():
        assert torch.equal(again["state_dict"][key], value), key
