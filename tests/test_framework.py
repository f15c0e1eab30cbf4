"""Checkpoints, command-line constants and their ranges, recipes, run folders and the LR schedule."""
import argparse
import types

import pytest
import torch

import cli
import constants
import devices
import evaluation
import framework
import networks
import recipes
from errors import UserError


def parsed(**overrides):
    parser = cli.add_constant_flags(argparse.ArgumentParser())
    argv = []
    for key, value in overrides.items():
        argv += ["--" + key.lower().replace("_", "-"), str(value)]
    return cli.settings_from(parser.parse_args(argv))


def settings(**overrides):
    return parsed(**overrides)[0]


def test_every_constant_is_a_flag_with_its_type():
    values, given = parsed(IMAGE_SIZE=576, LR=0.01, AMP="false", MODEL="unet")
    assert values["IMAGE_SIZE"] == 576 and values["LR"] == 0.01 and values["AMP"] is False
    assert values["MODEL"] == "unet" and values["EPOCHS"] == constants.EPOCHS
    assert given == {"AMP", "IMAGE_SIZE", "LR", "MODEL"}
    assert not any(key.startswith("_") for key in values)
    with pytest.raises(SystemExit):
        settings(AMP="maybe")


def test_a_recipe_sits_between_constants_and_flags():
    values, given = parsed(RECIPE="cpu", EPOCHS=7)
    assert values["PATCH_SIZE"] == recipes.RECIPES["cpu"]["PATCH_SIZE"] and values["OPTIMIZER"] == "adamw"
    assert values["EPOCHS"] == 7 and given == {"RECIPE", "EPOCHS"}
    assert settings()["OPTIMIZER"] == constants.OPTIMIZER
    with pytest.raises(UserError, match="unknown recipe 'fast'"):
        settings(RECIPE="fast")


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_every_recipe_sets_real_constants_of_their_type_and_says_why(name):
    for key, value in recipes.RECIPES[name].items():
        assert hasattr(constants, key), f"{name} sets {key}, which constants.py does not have"
        assert isinstance(value, type(getattr(constants, key))), f"{name}: {key}={value!r}"
    assert len(recipes.RECIPE_WHY[name]) > 40
    values, _ = parsed(RECIPE=name)
    assert all(values[key] == value for key, value in recipes.RECIPES[name].items())


def test_disc_recipe_resizes_the_whole_crop():
    values, _ = parsed(RECIPE="cpu_disc", DATASET="drishti")
    assert values["PATCH_SIZE"] == 0 and values["IMAGE_SIZE"] == 320 and values["PRETRAINED"] == "none"
    assert framework.TrainConfig.from_settings(values, sgd_kernel="loop").augment == "paper"


@pytest.mark.parametrize("flag, value, words", [
    ("BATCH_SIZE", 0, "--batch-size 0 is out of range: it must be at least 1"),
    ("EPOCHS", -1, "--epochs -1 is out of range"),
    ("LOG_EVERY", 0, "--log-every 0 is out of range"),
    ("LR", -1, "--lr -1.0 is out of range: it must be greater than 0"),
    ("THRESHOLD", 1.5, "--threshold 1.5 is out of range: it must be strictly between 0 and 1"),
    ("IMAGE_SIZE", 100, "--image-size 100 is out of range: it must be a positive multiple of 32"),
    ("PATCH_SIZE", 50, "--patch-size 50 is out of range"),
    ("PATCH_SCALE", 0.0, "--patch-scale 0.0 is out of range: it must be in [0.25, 4]"),
    ("RUN_NAME", "a/b", "must be a plain folder name"),
])
def test_flags_out_of_range_are_one_user_error(flag, value, words):
    with pytest.raises(UserError) as caught:
        settings(**{flag: value})
    assert words in str(caught.value)


def test_poly_schedule_matches_formula():
    assert framework.poly_lr(4e-3, 0, 100, 0.9) == 4e-3
    assert framework.poly_lr(4e-3, 50, 100, 0.9) == pytest.approx(4e-3 * 0.5 ** 0.9)
    assert framework.poly_lr(4e-3, 100, 100, 0.9) == 0.0


def test_warm_up_ramps_linearly_then_joins_the_poly_decay():
    assert framework.poly_lr(2e-3, 0, 100, 0.9, warmup_steps=10) == pytest.approx(2e-4)
    assert framework.poly_lr(2e-3, 4, 100, 0.9, warmup_steps=10) == pytest.approx(2e-3 * 0.5 * 0.96 ** 0.9)
    assert framework.poly_lr(2e-3, 9, 100, 0.9, warmup_steps=10) == pytest.approx(2e-3 * 0.91 ** 0.9)
    assert framework.poly_lr(2e-3, 50, 100, 0.9, warmup_steps=10) == framework.poly_lr(2e-3, 50, 100, 0.9)


def test_optimizer_choice():
    parameters = [torch.nn.Parameter(torch.zeros(2))]
    cpu = torch.device("cpu")
    adamw = framework.build_optimizer(parameters, framework.TrainConfig(optimizer="adamw", lr=1e-3), cpu)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 1e-4
    sgd = framework.build_optimizer(parameters, framework.TrainConfig(), cpu)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    with pytest.raises(UserError, match="unknown optimizer"):
        framework.build_optimizer(parameters, framework.TrainConfig(optimizer="lion"), cpu)


def test_train_config_reads_the_constants_it_needs():
    config = framework.TrainConfig.from_settings(settings(RECIPE="cpu"), sgd_kernel="loop")
    assert (config.patch_size, config.optimizer, config.loss) == (256, "adamw", "dice_bce")
    assert config.sgd_kernel == "loop" and config.batch_size == recipes.RECIPES["cpu"]["BATCH_SIZE"]
    assert config.augment == recipes.RECIPES["cpu"]["AUGMENT"]


def test_clean_state_dict_strips_any_wrapper_prefix():
    weights = {"module._orig_mod.head.weight": 1, "_orig_mod.module.x": 2, "plain": 3}
    assert framework.clean_state_dict(weights) == {"head.weight": 1, "x": 2, "plain": 3}


@pytest.mark.parametrize("wrap", ["plain", "dataparallel", "compiled-prefix"])
def test_checkpoint_round_trip_whatever_the_wrapper(tmp_path, wrap):
    model = networks.build_model("backbone_rmp")
    with torch.no_grad():
        model.encoder.conv1.weight.fill_(0.25)
    if wrap == "dataparallel":
        saved = torch.nn.DataParallel(model)
    elif wrap == "compiled-prefix":
        saved = torch.nn.Module()
        saved._orig_mod = model  # what torch.compile's OptimizedModule exposes
    else:
        saved = model
    config = settings(MODEL="backbone_rmp", IMAGE_SIZE=64)
    path = framework.save_checkpoint(tmp_path / "final.pth", saved, config, step=3)
    payload = torch.load(path, weights_only=True)
    assert all(not key.startswith(("module.", "_orig_mod.")) for key in payload["state_dict"])
    loaded, merged, _ = evaluation.load_model(path, settings(), frozenset())
    assert type(loaded).__name__ == type(model).__name__ and merged["MODEL"] == "backbone_rmp"
    assert merged["IMAGE_SIZE"] == 64
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_checkpoint_refuses_to_overwrite(tmp_path):
    model = networks.build_model("unet")
    framework.save_checkpoint(tmp_path / "final.pth", model, settings(MODEL="unet"))
    before = (tmp_path / "final.pth").read_bytes()
    with pytest.raises(UserError, match="refusing to overwrite"):
        framework.save_checkpoint(tmp_path / "final.pth", model, settings(MODEL="unet"))
    assert (tmp_path / "final.pth").read_bytes() == before


def test_model_settings_come_from_the_checkpoint_and_evaluation_settings_from_the_user(tmp_path, capsys):
    model = networks.build_model("unet")
    trained = settings(MODEL="unet", IMAGE_SIZE=96, THRESHOLD=0.7, DEVICE="cuda", TTA="false")
    framework.save_checkpoint(tmp_path / "final.pth", model, trained)
    _, merged, _ = evaluation.load_model(tmp_path / "final.pth", *parsed(THRESHOLD=0.3))
    assert merged["MODEL"] == "unet" and merged["IMAGE_SIZE"] == 96
    assert merged["THRESHOLD"] == 0.3 and merged["DEVICE"] == constants.DEVICE and merged["TTA"] is True
    _, merged, _ = evaluation.load_model(tmp_path / "final.pth", *parsed(IMAGE_SIZE=128))
    assert merged["IMAGE_SIZE"] == 128
    assert "evaluating with --image-size 128; the checkpoint was trained with 96" in capsys.readouterr().err
    with pytest.raises(UserError, match="trained as model 'unet'"):
        evaluation.load_model(tmp_path / "final.pth", *parsed(MODEL="cenet"))


def test_new_run_dir_never_reuses(tmp_path):
    first = framework.new_run_dir(tmp_path, "run")
    second = framework.new_run_dir(tmp_path, "run")
    third = framework.new_run_dir(tmp_path, "run")
    assert [first.name, second.name, third.name] == ["run", "run-2", "run-3"]


def test_latest_checkpoint_and_its_absence(tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        framework.latest_checkpoint(tmp_path)
    import os
    for index, name in enumerate(["a", "b"]):
        (tmp_path / name).mkdir()
        (tmp_path / name / "final.pth").write_bytes(b"x")
        os.utime(tmp_path / name / "final.pth", (1000 + index, 1000 + index))
    assert framework.latest_checkpoint(tmp_path).parent.name == "b"


def test_bad_device_names():
    with pytest.raises(UserError, match="not understood"):
        devices.select_device("tpu")
    assert devices.select_device("cpu").type == "cpu"


def test_threshold_scan_finds_the_threshold_that_serves_these_images_best():
    """Image a: vessels at 0.3, background at 0.1 -> F1 1 for 0.10 <= t < 0.30; image b: vessels at 0.25,
    background at 0.2 -> F1 1 for 0.20 <= t < 0.25. Both are 1 only from 0.20 to 0.24: the scan picks 0.20.
    At 0.5 nothing is predicted: F1 0 on both."""
    import numpy as np

    import tasks
    from tasks.sample import Sample
    label = np.zeros((4, 4), np.uint8)
    label[:, :2] = 1
    samples, probs = [], []
    for name, vessel, background in (("a", 0.3, 0.1), ("b", 0.25, 0.2)):
        samples.append(Sample(name, np.zeros((4, 4, 3), np.uint8), label, fov=np.ones((4, 4), bool)))
        probs.append(torch.from_numpy(np.where(label > 0, vessel, background)).float()[None])
    scan = evaluation.threshold_scan(tasks.dataset("drive"), samples, probs, 0.5)
    assert scan == {"metric": "FOV F1", "best_threshold": 0.2, "best": 1.0, "threshold": 0.5, "at_threshold": 0.0}
    assert "pass --threshold 0.2 to score test images" in evaluation.threshold_advice(scan, 2, "train")
    assert "choose it on training images (--split train)" in evaluation.threshold_advice(scan, 2, "test")
    assert evaluation.threshold_scan(tasks.dataset("lung"), samples, probs, 0.5) is None  # no pixel F1 there


def test_a_resume_point_is_evaluated_with_the_settings_of_its_run(tmp_path, capsys):
    model = networks.build_model("backbone_rmp")
    with torch.no_grad():
        model.encoder.conv1.weight.fill_(0.5)
    trainer = types.SimpleNamespace(model=model, step_count=7, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                    scaler=torch.amp.GradScaler("cpu", enabled=False))
    path = framework.save_resume_point(tmp_path / "last.pth", trainer, settings(MODEL="backbone_rmp", IMAGE_SIZE=64),
                                       ["step,loss,lr"])
    loaded, merged, _ = evaluation.load_model(path, settings(), frozenset())
    assert merged["MODEL"] == "backbone_rmp" and merged["IMAGE_SIZE"] == 64
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert f"{path} is a resume point; evaluating the weights of step 7" in capsys.readouterr().err
