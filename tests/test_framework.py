"""Checkpoints, command-line constants, run folders and the LR schedule."""
import argparse

import pytest
import torch

import cli
import constants
import framework
import networks
from cli import UserError


def settings(**overrides):
    parser = cli.add_constant_flags(argparse.ArgumentParser())
    argv = []
    for key, value in overrides.items():
        argv += ["--" + key.lower().replace("_", "-"), str(value)]
    return cli.settings_from(parser.parse_args(argv))


def test_every_constant_is_a_flag_with_its_type():
    parsed = settings(IMAGE_SIZE=576, LR=0.01, AMP="false", MODEL="unet")
    assert parsed["IMAGE_SIZE"] == 576 and parsed["LR"] == 0.01 and parsed["AMP"] is False
    assert parsed["MODEL"] == "unet" and parsed["EPOCHS"] == constants.EPOCHS
    assert parsed["_OVERRIDDEN"] == ["AMP", "IMAGE_SIZE", "LR", "MODEL"]
    with pytest.raises(SystemExit):
        settings(AMP="maybe")


def test_poly_schedule_matches_formula():
    assert framework.poly_lr(4e-3, 0, 100, 0.9) == 4e-3
    assert framework.poly_lr(4e-3, 50, 100, 0.9) == pytest.approx(4e-3 * 0.5 ** 0.9)
    assert framework.poly_lr(4e-3, 100, 100, 0.9) == 0.0


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
    loaded, merged, _ = framework.model_from_checkpoint(path, settings())
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


def test_overrides_at_test_time_keep_checkpoint_settings(tmp_path):
    model = networks.build_model("unet")
    framework.save_checkpoint(tmp_path / "final.pth", model, settings(MODEL="unet", IMAGE_SIZE=96, SEED=4))
    _, merged, _ = framework.model_from_checkpoint(tmp_path / "final.pth", settings(THRESHOLD=0.3))
    assert merged["IMAGE_SIZE"] == 96 and merged["SEED"] == 4 and merged["THRESHOLD"] == 0.3


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
        framework.select_device("tpu")
    assert framework.select_device("cpu").type == "cpu"
