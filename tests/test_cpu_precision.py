"""AMP on the CPU: bf16 autocast where the processor computes bf16 natively, fp32 elsewhere; training in NCHW,
prediction in channels_last; the choice named at start-up and recorded in checkpoints and metrics.json."""
import json

import pytest
import torch

import devices
import framework
import networks
from conftest import run_script

CPU = torch.device("cpu")
NATIVE_BF16 = devices.cpu_capability()[1]

QUERIES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported", "_is_avx512_supported", "_is_avx2_supported")


@pytest.mark.parametrize("reported, expected", [
    ({"_is_amx_tile_supported", "_is_avx512_bf16_supported", "_is_avx512_supported", "_is_avx2_supported"},
     ("AMX", True)),  # Intel Xeon from Sapphire Rapids on
    ({"_is_avx512_bf16_supported", "_is_avx512_supported", "_is_avx2_supported"},
     ("AVX-512 BF16", True)),  # AMD Zen 4 and later, Intel Cooper Lake
    ({"_is_avx512_supported", "_is_avx2_supported"}, ("AVX-512 without BF16", False)),  # Skylake-X, Ice Lake
    ({"_is_avx2_supported"}, ("AVX2", False)),  # AMD Zen 2 / 3, Intel Haswell to Comet Lake
])
def test_capability_decision_table(reported, expected):
    assert devices.cpu_capability(lambda name: name in reported) == expected


def test_a_cpu_torch_reports_nothing_for_is_fp32():
    name, native = devices.cpu_capability(lambda name: False)
    assert not native and name  # the machine's architecture, e.g. aarch64


def test_the_real_queries_exist_in_this_torch():
    """The decision reads these; a torch that renamed them would silently fall back to fp32."""
    assert all(callable(getattr(torch.cpu, name, None)) for name in QUERIES)


@pytest.mark.parametrize("native, amp, channels_last, dtype, layout, precision", [
    (True, True, True, torch.bfloat16, torch.contiguous_format, "bf16 autocast"),
    (True, True, False, torch.bfloat16, torch.contiguous_format, "bf16 autocast"),
    (True, False, True, None, torch.contiguous_format, "fp32"),
    (False, True, True, None, torch.contiguous_format, "fp32 (no native bf16: test CPU)"),
    (False, False, True, None, torch.contiguous_format, "fp32"),
])
def test_precision_and_training_layout_follow_the_capability(native, amp, channels_last, dtype, layout, precision,
                                                             monkeypatch):
    monkeypatch.setattr(devices, "cpu_capability", lambda query=None: ("test CPU", native))
    assert devices.amp_dtype(CPU, amp) == dtype
    assert devices.memory_format(CPU, channels_last, amp) == layout
    assert devices.precision_name(CPU, amp) == precision
    # Prediction follows CHANNELS_LAST alone (measured faster in fp32 too).
    assert devices.inference_memory_format(CPU, channels_last) == (
        torch.channels_last if channels_last else torch.contiguous_format)
    autocasting = devices.autocast(CPU, amp)
    with autocasting:
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert product.dtype == (dtype or torch.float32)


def test_startup_description_names_the_processor_and_the_choice(monkeypatch):
    monkeypatch.setattr(devices, "cpu_capability", lambda query=None: ("AVX-512 BF16", True))
    monkeypatch.setattr(devices, "cpu_model", lambda: "AMD EPYC")
    assert devices.compute_description(CPU, True, True) == "cpu (AMD EPYC, AVX-512 BF16): bf16 autocast, NCHW"
    monkeypatch.setattr(devices, "cpu_capability", lambda query=None: ("AVX2", False))
    assert devices.compute_description(CPU, True, True) == "cpu (AMD EPYC, AVX2): fp32 (no native bf16: AVX2), NCHW"
    assert devices.compute_description(CPU, True, True, training=False).endswith("channels-last")


def small_trainer(amp):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=generator)
    labels = (torch.rand(4, 64, 64, generator=generator) > 0.8).to(torch.uint8)
    config = framework.TrainConfig(batch_size=2, epochs=4, loss="dice_bce", optimizer="adamw", lr=1e-3,
                                   augment="none", amp=amp)
    torch.manual_seed(0)
    return framework.Trainer(networks.build_model("cenet"), images, labels, config, CPU)


@pytest.mark.skipif(not NATIVE_BF16, reason=f"this CPU has no native bf16 ({devices.cpu_capability()[0]})")
def test_a_bf16_step_keeps_weights_statistics_and_loss_in_fp32():
    trainer = small_trainer(amp=True)
    assert trainer.format == torch.contiguous_format  # see devices.memory_format
    seen = []
    trainer.model.head.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    before = {name: value.clone() for name, value in trainer.model.state_dict().items()}
    loss = trainer.step()
    assert seen == [torch.bfloat16]  # the network computed in bf16
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    state = trainer.model.state_dict()
    assert {value.dtype for value in state.values() if value.is_floating_point()} == {torch.float32}
    assert not torch.equal(state["encoder.bn1.running_mean"], before["encoder.bn1.running_mean"])
    assert not torch.equal(state["head.4.weight"], before["head.4.weight"])
    for moments in trainer.optimizer.state.values():
        assert moments["exp_avg"].dtype == torch.float32


@pytest.mark.skipif(not NATIVE_BF16, reason=f"this CPU has no native bf16 ({devices.cpu_capability()[0]})")
def test_bf16_and_fp32_losses_agree_on_the_same_weights():
    """Same weights, same batch: bf16's 8-bit mantissa moves the loss by well under 1 %."""
    losses = [small_trainer(amp).step().item() for amp in (True, False)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-2)


def test_checkpoint_and_metrics_record_the_precision(small_drive, tmp_path):
    weights, results = tmp_path / "weights", tmp_path / "results"
    trained = run_script("main.py", "--data-root", small_drive, "--device", "cpu", "--image-size", "64",
                         "--epochs", "1", "--batch-size", "2", "--pretrained", "none", "--visdom", "false",
                         "--weights-dir", weights, "--run-name", "run")
    assert trained.returncode == 0, trained.stderr
    expected = devices.precision_name(CPU, True)
    assert f"on {devices.compute_description(CPU, True, True)}" in trained.stderr
    payload = torch.load(weights / "run" / "final.pth", weights_only=True)
    assert payload["precision"] == expected and payload["precisions"] == [expected]
    for amp, precision in (("true", expected), ("false", "fp32")):
        out = results / amp
        tested = run_script("test.py", "--checkpoint", weights / "run" / "final.pth", "--data-root", small_drive,
                            "--device", "cpu", "--tta", "false", "--amp", amp, "--out", out)
        assert tested.returncode == 0, tested.stderr
        protocol = json.loads((out / "metrics.json").read_text())["protocol"]
        assert protocol["precision"] == precision and protocol["amp"] == (not precision.startswith("fp32"))
