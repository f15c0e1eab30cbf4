"""--init-weights: fine-tuning starts from every tensor of a checkpoint (here the released DRIVE models), says what
it loaded, warns of another preprocessing, and refuses what does not fit in one line."""
import pytest
import torch

import evaluation
import main
import networks
import training
from conftest import REPO, TINY, run_in_process

RELEASED = REPO / "weights" / "released" / "cenet_drive_cpu.pth"
RELEASED_CLAHE = REPO / "weights" / "released" / "cenet_drive_cpu_clahe.pth"


@pytest.fixture(scope="module")
def released():
    if not RELEASED.is_file():
        pytest.skip(f"{RELEASED} is not in this checkout")
    return RELEASED


def test_the_model_starts_from_every_tensor_of_the_checkpoint(released, small_drive, capsys):
    settings, _ = main.parse_settings([*TINY, "--data-root", str(small_drive), "--init-weights", str(released)])
    model, _, _, status, _ = training.prepare(settings, rank=0)
    recorded = torch.load(released, map_location="cpu", weights_only=True)
    assert status == f"weights: all from {released}, step {recorded['step']} (--init-weights; --pretrained unused)"
    own = model.state_dict()
    assert set(own) == set(recorded["state_dict"])
    for key, value in recorded["state_dict"].items():
        assert torch.equal(own[key], value.to(own[key].dtype)), key
    assert "notice" not in capsys.readouterr().err  # both were trained with the default preprocessing


def test_another_preprocessing_is_named(small_drive, capsys):
    if not RELEASED_CLAHE.is_file():
        pytest.skip(f"{RELEASED_CLAHE} is not in this checkout")
    settings, _ = main.parse_settings([*TINY, "--data-root", str(small_drive), "--init-weights", str(RELEASED_CLAHE)])
    training.prepare(settings, rank=0)
    said = capsys.readouterr().err
    assert "was trained with --preprocess clahe, and this run feeds it --preprocess ours" in said


def test_a_resumed_run_does_not_read_the_file_again(small_drive, tmp_path):
    settings, _ = main.parse_settings([*TINY, "--data-root", str(small_drive),
                                       "--init-weights", str(tmp_path / "moved_away.pth")])
    settings["RESUME"] = str(tmp_path / "run" / "last.pth")  # as training.resumed_settings leaves it
    _, _, _, status, _ = training.prepare(settings, rank=0)
    assert status == "encoder: random initialisation (--pretrained none)"


def test_fine_tuning_runs_and_records_where_it_started(released, small_drive, tmp_path):
    result = run_in_process("main.py", *TINY, "--data-root", small_drive, "--weights-dir", tmp_path,
                            "--run-name", "tuned", "--epochs", "1", "--init-weights", released)
    assert result.returncode == 0, result.stderr
    final = torch.load(tmp_path / "tuned" / "final.pth", weights_only=True)
    assert final["pretrained"].startswith(f"weights: all from {released}")
    assert final["settings"]["INIT_WEIGHTS"] == str(released)
    start = torch.load(released, weights_only=True)["state_dict"]
    moved = [key for key, value in final["state_dict"].items()
             if value.is_floating_point() and not torch.equal(value, start[key].float())]
    assert moved  # one step of training changed the weights it started from


def test_what_does_not_fit_is_one_line(released, small_drive, tmp_path):
    wrong_shape = tmp_path / "wrong_shape.pth"
    state_dict = torch.load(released, weights_only=True)["state_dict"]
    first = next(iter(state_dict))
    torch.save({**state_dict, first: torch.zeros(3)}, wrong_shape)
    cases = [
        (("--model", "unet", "--init-weights", released), "holds a 'cenet' model, but this run trains 'unet'"),
        (("--init-weights", tmp_path / "missing.pth"), "not found"),
        (("--init-weights", wrong_shape), "does not fit architecture 'cenet'"),
    ]
    for args, message in cases:
        result = run_in_process("main.py", *TINY, "--data-root", small_drive, "--weights-dir", tmp_path / "runs",
                                *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_the_common_model_and_optimizer_layout_is_read_by_training_and_test(small_drive, tmp_path):
    """{"model": state dict saved from a DataParallel wrapper, "optimizer": ..., "epoch": N}, the layout many
    training scripts write: --init-weights and test.py both find the weights under "model"."""
    torch.manual_seed(1)
    source = networks.build_model("cenet", num_classes=1)
    wrapped = {f"module.{key}": value for key, value in source.state_dict().items()}
    path = tmp_path / "other_script.pth"
    torch.save({"model": wrapped, "optimizer": {"state": {}}, "epoch": 3}, path)
    settings, given = main.parse_settings([*TINY, "--data-root", str(small_drive), "--init-weights", str(path)])
    tuned, _, _, status, _ = training.prepare(settings, rank=0)
    assert status == f"weights: all from {path} (--init-weights; --pretrained unused)"
    evaluated, _, _ = evaluation.load_model(path, settings, given)
    for key, value in source.state_dict().items():
        assert torch.equal(tuned.state_dict()[key], value), key
        assert torch.equal(evaluated.state_dict()[key], value), key
