"""What the CUDA code paths decide, pinned on the CPU: the torch.compile trial step under DDP (two gloo
processes), which errors count as compile failures, the AMP precision chosen by GPU generation and its
loss scaling, why CUDA is unusable, and the pieces that let DETERMINISTIC runs go through."""
import os
import queue
import socket
import time

import numpy as np

import pytest
import torch
import torch.nn.functional as F

import devices
import framework
import loss as losses
import networks
from errors import UserError
from networks.cenet import bilinear_resize
from test_speed_paths import FailInBackward

DDP_CASES = ("compiled works", "forward fails everywhere", "backward fails part-way everywhere",
             "forward fails in process 1 only", "backward fails part-way in process 1 only")


# --- the compile trial under DDP --------------------------------------------------------------

class FakeCompiled:
    """What torch.compile(DDP(model)) hands back where compilation fails at the first call: in the forward,
    or part-way through the backward, after DDP has seen the gradients of the later layers (the failing
    function sits between the two convolutions), in every process or in one."""

    def __init__(self, ddp, case, rank):
        self.ddp, self.case, self.rank = ddp, case, rank
        self.failing = "everywhere" in case or ("process 1" in case and rank == 1)
        self.armed = False
        ddp.module[1].register_forward_hook(self.fail_in_backward)

    def fail_in_backward(self, module, inputs, output):
        return FailInBackward.apply(output) if self.armed else output

    def __call__(self, images):
        if self.failing and self.case.startswith("forward"):
            raise RuntimeError("InductorError: no working C++ compiler")
        self.armed = self.failing and self.case.startswith("backward")
        try:
            return self.ddp(images)
        finally:
            self.armed = False


def tiny_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 1, 1))
    model.num_classes = 1
    return model


def ddp_worker(rank, port, results):
    """One of two gloo processes: for each case, three training steps of a fresh model and Trainer, the
    first compiled by a FakeCompiled; the weights after them, and whether the run went eager."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=generator)
    labels = (torch.rand(4, 16, 16, generator=generator) > 0.7).to(torch.uint8)
    config = framework.TrainConfig(batch_size=4, epochs=3, loss="dice_bce", lr=0.1, augment="none", amp=False)
    outcome = {}
    for case in ("eager reference",) + DDP_CASES:
        trainer = framework.Trainer(tiny_model(), images, labels, config, torch.device("cpu"), rank, 2)
        if case != "eager reference":
            trainer.forward, trainer.compile_pending = FakeCompiled(trainer.eager_forward, case, rank), True
        for _ in range(3):
            trainer.step()
        # numpy copies: a tensor sent through a queue lives in this process's shared memory, gone once it exits
        outcome[case] = {"state": {name: value.numpy().copy() for name, value in trainer.model.state_dict().items()},
                         "eager": trainer.forward is trainer.eager_forward}
    results.put((rank, outcome))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_compile_trial_under_ddp_agrees_on_every_process_and_never_hangs():
    """Every failure case ends on both processes with the weights of the eager run, bit for bit; a working
    compile is kept. A hang (the bug this guards against) fails the test after the deadline."""
    context = torch.multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    workers = [context.Process(target=ddp_worker, args=(rank, port, results)) for rank in range(2)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 180
    outcomes = {}
    try:
        while len(outcomes) < 2 and time.monotonic() < deadline:
            try:
                rank, outcome = results.get(timeout=5)
                outcomes[rank] = outcome
            except queue.Empty:  # check the workers are still alive
                if any(worker.exitcode not in (None, 0) for worker in workers):
                    break
        assert len(outcomes) == 2, (f"processes hung or died (exit codes {[w.exitcode for w in workers]}); "
                                    f"got results from {sorted(outcomes)}")
        for worker in workers:
            worker.join(timeout=60)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
    # Each process against its own eager run (BatchNorm statistics are per process on gloo); parameters are
    # also the same in both processes.
    for case in DDP_CASES:
        for rank in range(2):
            state, reference = outcomes[rank][case]["state"], outcomes[rank]["eager reference"]["state"]
            for name, value in reference.items():
                assert np.array_equal(state[name], value), (case, rank, name)
            assert outcomes[rank][case]["eager"] == (case != "compiled works"), (case, rank)
        assert np.array_equal(outcomes[0][case]["state"]["0.weight"], outcomes[1][case]["state"]["0.weight"]), case
    # The reference itself trained: the weights moved away from their initial values.
    initial = tiny_model().state_dict()["0.weight"].numpy()
    assert not np.array_equal(outcomes[0]["eager reference"]["state"]["0.weight"], initial)


# --- which errors are compile failures -------------------------------------------------------

def test_out_of_memory_and_cuda_errors_are_not_compile_failures():
    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    assert framework.is_compile_failure(RuntimeError("InductorError: no working C++ compiler"))
    assert not framework.is_compile_failure(out_of_memory("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not framework.is_compile_failure(RuntimeError("CUDA error: device-side assert triggered"))
    try:  # dynamo wraps what the compiled code raised
        try:
            raise out_of_memory("CUDA out of memory")
        except out_of_memory as inner:
            raise RuntimeError("BackendCompilerFailed: backend='inductor' raised") from inner
    except RuntimeError as wrapped:
        assert not framework.is_compile_failure(wrapped)


def test_out_of_memory_at_the_first_compiled_step_surfaces_as_itself(capsys):
    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

    def compiled_that_runs_out_of_memory(images):
        raise out_of_memory("CUDA out of memory. Tried to allocate 2.00 GiB")

    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    labels = torch.zeros(2, 16, 16, dtype=torch.uint8)
    trainer = framework.Trainer(tiny_model(), images, labels, framework.TrainConfig(batch_size=2, amp=False),
                                torch.device("cpu"))
    trainer.forward, trainer.compile_pending = compiled_that_runs_out_of_memory, True
    with pytest.raises(out_of_memory):
        trainer.step()
    assert "torch.compile unavailable" not in capsys.readouterr().err


def test_compile_is_off_under_torchrun_on_gpus_only(capsys):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert framework.compile_useful(True, cuda, 0, 1) and framework.compile_useful(True, cpu, 0, 2)
    assert not framework.compile_useful(True, cuda, 0, 2)
    assert "SyncBatchNorm" in capsys.readouterr().err
    assert not framework.compile_useful(False, cpu, 0, 1)


# --- precision by GPU generation, and loss scaling ---------------------------------------------

@pytest.mark.parametrize("capability, expected", [((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16),
                                                  ((7, 0), torch.float16), ((7, 5), torch.float16)])
def test_amp_precision_follows_the_compute_capability(capability, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda", 0)
    assert devices.amp_dtype(cuda, True) == expected
    assert devices.amp_dtype(cuda, False) is None
    name = devices.precision_name(cuda, True)
    assert name.startswith("bf16") if expected == torch.bfloat16 else ("fp16" in name and "7." in name)


def test_a_loss_scaled_step_is_the_plain_step():
    """With fp16 the trainer scales the loss and unscales the gradients before the optimiser; scaling by a
    power of two is exact, so the weights after a scaled step equal those of an unscaled one."""
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = (torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.7).to(torch.uint8)
    config = framework.TrainConfig(batch_size=2, epochs=2, loss="dice_bce", lr=0.05, augment="none", amp=False)
    plain = framework.Trainer(tiny_model(), images, labels, config, torch.device("cpu"))
    scaled = framework.Trainer(tiny_model(), images, labels, config, torch.device("cpu"))
    scaled.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    for _ in range(2):
        plain.step(), scaled.step()
    assert scaled.scaler.get_scale() == 2.0 ** 12  # no overflow seen, so the scale stayed
    for name, value in plain.model.state_dict().items():
        assert torch.equal(scaled.model.state_dict()[name], value), name


# --- why CUDA is unusable ----------------------------------------------------------------------

def test_the_reason_names_a_cpu_only_build(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert "CPU-only build" in devices.cuda_unusable_reason()


def test_the_reason_is_torchs_own_words(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")

    def old_driver():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 11040).\nmore text")

    monkeypatch.setattr(torch.cuda, "init", old_driver)
    reason = devices.cuda_unusable_reason()
    assert "driver on your system is too old (found version 11040)" in reason and "more text" not in reason


def test_auto_device_warns_loudly_and_torchrun_refuses_cpu_by_accident(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "cuda_unusable_reason", lambda: "the driver is too old")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert devices.select_device("auto") == torch.device("cpu")
    warning = capsys.readouterr().err
    assert warning.startswith("WARNING: CUDA is not available (the driver is too old)") and "--device cpu" in warning
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="torchrun started 2 processes but CUDA is not usable .*--device cpu"):
        devices.select_device("auto")
    assert devices.select_device("cpu") == torch.device("cpu")  # CPU processes on purpose still run


# --- DETERMINISTIC -------------------------------------------------------------------------------

@pytest.mark.parametrize("source, target", [((1, 1), (8, 8)), ((2, 2), (8, 8)), ((4, 3), (19, 17)),
                                            ((6, 6), (14, 14)), ((5, 7), (5, 7))])
def test_bilinear_resize_by_matrices_equals_interpolate(source, target):
    x = torch.randn(2, 3, *source, dtype=torch.float64, requires_grad=True)
    expected = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
    ours = bilinear_resize(x, target)
    torch.testing.assert_close(ours, expected)
    weights = torch.randn_like(expected)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), x)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), x)
    torch.testing.assert_close(grad_ours, grad_expected)


def test_one_hot_cross_entropy_equals_torchs():
    logits = torch.randn(2, 4, 5, 6)
    target = torch.randint(0, 4, (2, 5, 6))
    torch.testing.assert_close(losses.CELoss()(logits, target), F.cross_entropy(logits, target))


def backward_operations(tensor):
    """Names of every autograd node behind `tensor`."""
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("loss_name, classes", [("dice_bce", 1), ("dice_bce", 3), ("ce", 3)])
def test_training_graph_has_no_operation_without_a_deterministic_cuda_kernel(loss_name, classes):
    """Bilinear upsampling and NLLLoss have no deterministic CUDA backward: torch stops a DETERMINISTIC
    run at them. CE-Net's training graph must contain neither."""
    torch.manual_seed(0)
    model = networks.build_model("cenet", classes).train()
    target = torch.randint(0, classes if classes > 1 else 2, (2, 64, 64))
    value = losses.build_loss(loss_name, classes)(model(torch.randn(2, 3, 64, 64)), target)
    operations = backward_operations(value)
    assert "ConvolutionBackward0" in operations  # the walk does see the network
    assert not [name for name in operations if "Upsample" in name or "Nll" in name], operations


def test_deterministic_switch_sets_torchs_global_mode(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # restored after the test
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        devices.configure_speed(torch.device("cpu"), deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8")
    finally:
        torch.use_deterministic_algorithms(False)
