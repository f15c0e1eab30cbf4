"""The machine a run uses: device choice, seeding, torchrun/DDP set-up, CUDA speed switches, timing."""
import contextlib
import os
import platform
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from errors import UserError


def select_device(name):
    """'auto' takes CUDA when torch can use it and says loudly why not when it cannot; 'cuda' insists."""
    if name not in ("auto", "cuda", "cpu") and not name.startswith("cuda:"):
        raise UserError(f"device {name!r} not understood; use auto, cuda, cuda:N or cpu")
    if name == "cpu":
        return torch.device("cpu")
    processes = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        if name in ("auto", "cuda"):  # under torchrun each process takes its own GPU
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if processes > 1:
            raise UserError(f"--device {name} under torchrun would put every process on one GPU; use --device cuda "
                            f"(each process takes GPU LOCAL_RANK) and CUDA_VISIBLE_DEVICES to choose the GPUs")
        return torch.device(name)
    reason = cuda_unusable_reason()
    if name != "auto":
        raise UserError(f"--device {name} was asked for but CUDA is not available on this machine ({reason}); "
                        f"use --device cpu or --device auto")
    if processes > 1:
        raise UserError(f"torchrun started {processes} processes but CUDA is not usable ({reason}); fix the "
                        f"install (see the README), or pass --device cpu to train on CPU processes on purpose")
    print(f"WARNING: CUDA is not available ({reason}): running on the CPU, which is slow (fine for tests and "
          f"tiny runs). {CUDA_HINT}", file=sys.stderr)
    return torch.device("cpu")


CUDA_HINT = ("For a GPU, install the torch build that matches its driver (see requirements.txt), or pass "
             "--device cpu to silence this.")


def cuda_unusable_reason():
    """Torch's own words for why it cannot use CUDA: a CPU-only build, no driver, a driver too old for the
    build's CUDA version, no visible device."""
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"this torch {torch.__version__} is a CPU-only build"
    try:
        torch.cuda.init()
    except Exception as error:  # torch words each cause differently, in a RuntimeError or an AssertionError
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return f"torch {torch.__version__} built for CUDA {torch.version.cuda}: {first_line[:200]}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return f"no CUDA device visible with CUDA_VISIBLE_DEVICES={visible!r}"
    return "torch sees no CUDA device"



def seed_everything(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)



def distributed_context(device=None):
    """(rank, world_size) from torchrun's environment, initialising the process group once.

    NCCL for processes on GPUs, gloo for CPU processes (also on a machine that has GPUs: --device cpu)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1
    if not dist.is_initialized():
        on_gpu = device.type == "cuda" if device is not None else torch.cuda.is_available()
        if on_gpu and device is not None:
            # Before the process group: on torch 2.4-2.5 a group bound to a device_id while the current
            # device is still GPU 0 makes every rank open a context there.
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if on_gpu else "gloo", device_id=device if on_gpu else None)
    return dist.get_rank(), world_size



def close_distributed(finished=True):
    """Leave the process group. After a run that finished on every rank, meet at a barrier first:
    a rank that tears its connections down while a peer is still in the last collective can make
    gloo abort that peer. After an error no barrier (the failed peer would never arrive)."""
    if not dist.is_initialized():
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()



def configure_speed(device, deterministic=False):
    """cudnn autotuning and TF32 on CUDA: free speed for fixed-size inputs, but runs then differ slightly
    (autotuning may pick other kernels, TF32 rounds matmuls, some backward kernels add in any order).
    `deterministic` trades that speed for bit-identical reruns on the same machine and software: fixed
    cuDNN algorithms, no TF32, and torch's deterministic kernels (an error names any operation that has
    none; the models and losses here avoid those). CPU runs are deterministic either way."""
    if deterministic:
        # cuBLAS reads this when it starts, i.e. at the first matmul, which has not happened yet.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic
        torch.cuda.set_device(device)



# What torch reports of the CPU, strongest first: (torch.cpu query, its name in start-up lines, native bf16).
# AMX tiles and AVX-512 BF16 compute bf16 dot products in hardware, and oneDNN's bf16 convolutions then run
# several times faster than fp32 (CE-Net's training step on 2 cores of an AMD EPYC with AVX-512 BF16: 0.80 s
# against 1.80 s in fp32 NCHW). Without them torch still accepts bf16 on AVX-512 and AVX2, but is far slower than
# in fp32 (the same step under bf16 autocast on a 2-core AMD EPYC with AVX2 only: 58.8 s against 2.09 s); there
# AMP stays fp32.
CPU_CAPABILITIES = (
    ("_is_amx_tile_supported", "AMX", True),
    ("_is_avx512_bf16_supported", "AVX-512 BF16", True),
    ("_is_avx512_supported", "AVX-512 without BF16", False),
    ("_is_avx2_supported", "AVX2", False),
)


def cpu_capability(query=None):
    """(name, native bf16) of this CPU's strongest instruction set among CPU_CAPABILITIES, from torch's own
    queries (torch.cpu._is_..._supported, what oneDNN dispatches on); `query(name) -> bool` replaces them
    in tests. A torch without the queries, or another architecture, reports (machine, False)."""
    if query is None:
        query = lambda name: bool(getattr(torch.cpu, name, lambda: False)())
    for name, label, native_bf16 in CPU_CAPABILITIES:
        if query(name):
            return label, native_bf16
    return platform.machine() or "unknown CPU", False


def amp_dtype(device, enabled):
    """The autocast precision of AMP on `device`: bf16 on GPUs of compute capability 8.0 or newer (A100,
    RTX 30xx and later), fp16 on older ones (V100, T4, RTX 20xx), where bf16 convolutions are emulated
    and slower than fp32; bf16 on a CPU that computes it natively (cpu_capability), fp32 (None) on other
    CPUs and when AMP is off."""
    if not enabled:
        return None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_capability()[1] else None
    if device.type != "cuda":
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def precision_name(device, enabled):
    """How a run computes, for start-up lines, checkpoints and metrics.json: 'bf16 autocast',
    'fp16 autocast + loss scaling (...)', 'fp32', with the reason where the choice was the machine's."""
    dtype = amp_dtype(device, enabled)
    if dtype == torch.float16:
        major, minor = torch.cuda.get_device_capability(device)
        return f"fp16 autocast + loss scaling (compute capability {major}.{minor} has no fast bf16)"
    if dtype == torch.bfloat16:
        return "bf16 autocast"
    if enabled and device.type == "cpu":
        return f"fp32 (no native bf16: {cpu_capability()[0]})"
    return "fp32"


def compute_description(device, enabled, channels_last, training=True):
    """The start-up line's account of how the work runs: 'cpu (AMD EPYC, AVX-512 BF16): bf16 autocast,
    channels-last'."""
    layout = memory_format(device, channels_last, enabled) if training \
        else inference_memory_format(device, channels_last)
    layout_name = "channels-last" if layout == torch.channels_last else "NCHW"
    where = str(device)
    if device.type == "cpu":
        where = f"cpu ({cpu_model()}, {cpu_capability()[0]})"
    return f"{where}: {precision_name(device, enabled)}, {layout_name}"


def autocast(device, enabled):
    """Autocast in amp_dtype on `device` (CUDA, or a CPU with native bf16) when enabled; a no-op where AMP
    means fp32 (such CPU runs stay exact)."""
    dtype = amp_dtype(device, enabled)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)



def inference_memory_format(device, channels_last):
    """channels_last for prediction when asked for, on CUDA and on the CPU alike (CE-Net, 16 images of
    608 x 608 on a 2-core AMD EPYC with AVX2: 19.5 s against 25.2 s in NCHW; 8 such images in bf16 on an
    AMD EPYC with AVX-512 BF16: 2.2 s against 3.5 s)."""
    return torch.channels_last if channels_last else torch.contiguous_format


def memory_format(device, channels_last, amp=False):
    """The training layout: channels_last on CUDA when asked for; NCHW on the CPU, in fp32 and bf16 alike.
    On a 2-core AMD EPYC with AVX-512 BF16, channels_last made CE-Net's bf16 step 16 % faster (0.73 s against
    0.87 s) but FullNet's bf16 backward pass in channels_last crashed (a segmentation fault inside oneDNN) in
    most short runs, where NCHW never did; in fp32 it gained 4 % there and was slower on an AVX2 AMD EPYC.
    NCHW is the layout that never crashed, and it keeps fp32 runs bit for bit those of earlier releases.
    `amp` is accepted for the day the crash is isolated and bf16 training can take channels_last."""
    if channels_last and device.type == "cuda":
        return torch.channels_last
    return torch.contiguous_format



def to_device(tensor, device):
    """Host -> device copy that does not stall the host: pinned (page-locked) memory and an asynchronous
    copy on CUDA. A copy from ordinary memory makes PyTorch wait until the whole stream has drained."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)



def timed(device=None):
    """A monotonic clock that first waits for the work queued on `device` (a CUDA device), so timings
    are real. Other devices are left alone: a CPU run never touches a GPU it does not use."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()



def machine_name(device):
    """The hardware a figure was measured on, in words: the GPU's name, or the CPU's model and cores."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"CPU {cpu_model()} ({cpu_capability()[0]}), {os.cpu_count()} cores (torch {torch.__version__})"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
