"""Training and inference machinery shared by main.py, test.py, benchmark.py and reproduce.py.

- device choice, seeding, torchrun/DDP set-up;
- checkpoints that record everything test.py needs, and load whatever wrapper saved them;
- `Trainer`: SGD + poly LR on in-memory tensors with batch augmentation on the device;
- `predict`: 8-way dihedral test-time augmentation, all views in one batched forward;
- `VisdomLogger`: optional live curves, silent after one notice when no server answers.
"""
import contextlib
import json
import os
import pickle
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import data
import loss as losses
import networks
from cli import UserError

CHECKPOINT_FORMAT = "cenet-repro/1"
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# --------------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------------

def select_device(name):
    """'auto' takes CUDA when present and says so when it falls back; 'cuda' insists."""
    if name not in ("auto", "cuda", "cpu") and not name.startswith("cuda:"):
        raise UserError(f"device {name!r} not understood; use auto, cuda, cuda:N or cpu")
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        if name in ("auto", "cuda"):  # under torchrun each process takes its own GPU
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device(name)
    if name == "auto":
        print("notice: CUDA is not available, running on the CPU (slow; fine for tests and tiny runs)",
              file=sys.stderr)
        return torch.device("cpu")
    raise UserError(f"--device {name} was asked for but CUDA is not available on this machine; "
                    f"use --device cpu or --device auto")


def seed_everything(seed):
    torch.manual_seed(seed)
    import random

    import numpy as np
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


def configure_speed(device, settings):
    """cudnn autotuning and TF32 on CUDA: free speed for fixed-size inputs."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.set_device(device)


def autocast(device, enabled):
    """bf16 autocast on CUDA when enabled; a no-op elsewhere (CPU runs stay fp32 and exact)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device, settings):
    if settings.get("CHANNELS_LAST") and device.type == "cuda":
        return torch.channels_last
    return torch.contiguous_format


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def unwrap(model):
    """The plain module inside DataParallel / DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def clean_state_dict(state_dict):
    """Strip wrapper prefixes ('module.', '_orig_mod.', in any order) from every key."""
    return {networks.strip_prefixes(key, WRAPPER_PREFIXES): value for key, value in state_dict.items()}


def checkpoint_settings(settings):
    return {key: value for key, value in settings.items() if not key.startswith("_")}


def save_checkpoint(path, model, settings, **extra):
    """Write a checkpoint that test.py can use alone. Refuses to replace an existing file."""
    path = Path(path)
    if path.exists():
        raise UserError(f"{path} already exists; refusing to overwrite it (choose another --run-name)")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": settings["MODEL"],
        "dataset": settings["DATASET"],
        "num_classes": data.dataset_spec(settings["DATASET"]).num_classes,
        "image_size": settings["IMAGE_SIZE"],
        "settings": checkpoint_settings(settings),
        "state_dict": clean_state_dict(unwrap(model).state_dict()),
        **extra,
    }
    temporary = path.with_name(path.name + ".partial")
    torch.save(payload, temporary)
    os.replace(temporary, path)  # a crash mid-write never leaves a truncated checkpoint behind
    return path


def read_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} is not a readable PyTorch checkpoint (not written by torch.save, or it holds "
                        f"Python objects other than tensors and plain data)")
    except Exception as error:  # torch raises several unrelated types for a bad file
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:120]})")
    if not isinstance(payload, dict):
        raise UserError(f"{path} holds a {type(payload).__name__}, not a checkpoint dictionary")
    return payload


def model_from_checkpoint(path, settings):
    """Rebuild the model a checkpoint was trained as, and the settings it was trained with.

    Our checkpoints carry architecture, class count and image size. A bare state dict (for example
    the authors' release) is loaded into the model named by the current settings. Either way a
    mismatch between what the user asked for and what the file holds is one clear error.
    """
    payload = read_checkpoint(path)
    overridden = set(settings.get("_OVERRIDDEN", ()))
    if payload.get("format") == CHECKPOINT_FORMAT:
        trained = dict(payload["settings"])
        for key in ("MODEL", "DATASET"):
            if key in overridden and settings[key] != trained[key]:
                raise UserError(f"checkpoint {path} was trained as {key.lower()} {trained[key]!r}, "
                                f"but --{key.lower()} {settings[key]} was given; drop the flag or pick "
                                f"the matching checkpoint")
        # Settings added after a checkpoint was written take today's defaults.
        merged = {**settings, **trained, **{key: settings[key] for key in overridden},
                  "_OVERRIDDEN": sorted(overridden)}
        state_dict, num_classes = payload["state_dict"], payload["num_classes"]
    else:
        merged = dict(settings)
        state_dict = payload.get("state_dict", payload.get("model", payload))
        num_classes = data.dataset_spec(settings["DATASET"]).num_classes
    expected = data.dataset_spec(merged["DATASET"]).num_classes
    if num_classes != expected:
        raise UserError(f"checkpoint {path} predicts {num_classes} classes but dataset "
                        f"{merged['DATASET']!r} has {expected}")
    model = networks.build_model(merged["MODEL"], num_classes=num_classes)
    load_state_dict_checked(model, clean_state_dict(state_dict), path, merged["MODEL"])
    return model, merged, payload


def load_state_dict_checked(model, state_dict, path, name):
    if not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise UserError(f"{path} does not hold model weights")
    own = model.state_dict()
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own]
    wrong_shape = [key for key in own if key in state_dict and state_dict[key].shape != own[key].shape]
    if missing or unexpected or wrong_shape:
        example = (wrong_shape or missing or unexpected)[0]
        raise UserError(f"checkpoint {path} does not fit architecture {name!r}: {len(missing)} missing, "
                        f"{len(unexpected)} unexpected, {len(wrong_shape)} wrong-shape tensors "
                        f"(e.g. {example}); is it from another model or class count?")
    model.load_state_dict(state_dict)


def new_run_dir(parent, name):
    """A fresh folder for this run's outputs: an existing name gets a -2, -3, ... suffix, never reused."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    candidate, number = parent / name, 1
    while True:
        try:
            candidate.mkdir()
            if number > 1:
                print(f"notice: {parent / name} already exists; writing to {candidate} instead", file=sys.stderr)
            return candidate
        except FileExistsError:
            number += 1
            candidate = parent / f"{name}-{number}"


def latest_checkpoint(weights_dir):
    found = sorted(Path(weights_dir).glob("*/final.pth"), key=lambda path: path.stat().st_mtime)
    if not found:
        raise UserError(f"no checkpoint under {weights_dir}/; train one with main.py or pass --checkpoint PATH")
    return found[-1]


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def poly_lr(base_lr, step, total_steps, power, warmup_steps=0):
    """lr = base_lr * (1 - step / total_steps) ** power, the paper's poly schedule, times a linear
    warm-up factor (step + 1) / warmup_steps over the first warmup_steps steps."""
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return base_lr * warmup * (1 - step / total_steps) ** power


def maybe_compile(model, enabled):
    """torch.compile(model) when enabled. Some failures show here, most only at the first call:
    Trainer.step catches those and goes on eagerly (see Trainer.first_compiled_step)."""
    if not enabled:
        return model
    try:
        return torch.compile(model)
    except Exception as error:  # an unsupported platform raises here rather than at the first call
        compile_notice(error)
        return model


def compile_notice(error):
    first_line = (str(error).strip().splitlines() or [""])[0][:160]
    print(f"notice: torch.compile unavailable ({type(error).__name__}: {first_line}); running eagerly",
          file=sys.stderr)


def to_device(tensor, device):
    """Host -> device copy that does not stall the host: pinned (page-locked) memory and an asynchronous
    copy on CUDA. A copy from ordinary memory makes PyTorch wait until the whole stream has drained."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def build_optimizer(parameters, settings, kernel):
    """SGD with momentum and L2 weight decay (the paper), or AdamW with decoupled weight decay.

    The same SGD in any implementation (`kernel`: fused, foreach or the per-tensor loop); tests check
    they agree. The default is PyTorch's multi-tensor (foreach) path on CUDA and the loop on the CPU;
    benchmark.py --sgd-kernel compares them."""
    name = settings.get("OPTIMIZER", "sgd")
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=settings["LR"], weight_decay=settings["WEIGHT_DECAY"])
    if name != "sgd":
        raise UserError(f"unknown optimizer {name!r}; choose sgd or adamw")
    implementation = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[kernel]
    return torch.optim.SGD(parameters, lr=settings["LR"], momentum=settings["MOMENTUM"],
                           weight_decay=settings["WEIGHT_DECAY"], **implementation)


def sgd_kernel(settings, device):
    return settings.get("_SGD_KERNEL") or ("foreach" if device.type == "cuda" else "loop")


class Trainer:
    """SGD with momentum and weight decay, poly LR, the paper's augmentation, on in-memory tensors.

    `images`/`labels` are uint8 tensors of the whole training set at the training size; they are
    moved to the device once, so a step never waits for a loader. A step never waits for the GPU either:
    the loss comes back as a device tensor, and the caller decides when to read it.
    """

    def __init__(self, model, images, labels, settings, device, rank=0, world_size=1):
        if settings["BATCH_SIZE"] % world_size:
            raise UserError(f"batch size {settings['BATCH_SIZE']} does not split over {world_size} processes")
        self.settings, self.device = settings, device
        self.rank, self.world_size = rank, world_size
        self.num_classes = data.dataset_spec(settings["DATASET"]).num_classes
        self.format = memory_format(device, settings)
        self.model = unwrap(model)
        if world_size > 1 and device.type == "cuda":
            # Each GPU sees BATCH_SIZE / world_size images. Synchronised BatchNorm normalises over the
            # whole global batch, as one GPU holding BATCH_SIZE images does, and keeps the running
            # statistics equal on every GPU. (Gloo/CPU has no SyncBatchNorm: there each process
            # normalises over its own share.)
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model = self.model.to(device, memory_format=self.format)
        self.images = to_device(images, device)
        self.labels = to_device(labels, device)
        self.criterion = losses.build_loss(settings["LOSS"], self.num_classes)
        # The same SGD (momentum, dampening 0, L2 weight decay) in any implementation; tests check they
        # agree. The default is PyTorch's multi-tensor (foreach) path on CUDA and the per-tensor loop on the
        # CPU; benchmark.py --sgd-kernel fused|foreach|loop sets the private _SGD_KERNEL to compare them.
        self.optimizer = build_optimizer(self.model.parameters(), settings, sgd_kernel(settings, device))
        self.patch_size = settings.get("PATCH_SIZE", 0)
        self.total_steps = data.steps_for(len(images), settings["BATCH_SIZE"], settings["EPOCHS"])
        self.plan = self.draw_plan(len(images), settings["BATCH_SIZE"] // world_size)
        self.step_count = 0
        wrapped = self.model
        if world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            wrapped = torch.nn.parallel.DistributedDataParallel(wrapped, device_ids=ids)
        self.eager_forward = wrapped
        self.forward = maybe_compile(wrapped, settings["COMPILE"])
        self.compile_pending = self.forward is not wrapped

    def draw_plan(self, num_images, batch_size):
        """The whole run's randomness, drawn on the CPU from the seed and uploaded once: which images
        each step sees (this rank's shard) and their augmentation parameters. A step then only slices
        device tensors, so it never stalls the host on a host-to-GPU copy, and a seed gives the same run
        on every device."""
        seed, steps = self.settings["SEED"], self.total_steps
        stream = data.BatchStream(num_images, batch_size, seed, self.rank, self.world_size)
        indices = torch.stack([stream.next() for _ in range(steps)])
        generator = torch.Generator().manual_seed(seed * 1000 + self.rank)
        theta, hsv = data.draw_augmentation(steps * batch_size, generator, geometric=self.settings["AUGMENT"],
                                            colour=self.settings["AUGMENT"])
        plan = {"indices": indices, "theta": theta.view(steps, batch_size, 2, 3),
                "hsv": hsv.view(steps, batch_size, 3)}
        if self.patch_size:
            height, width = self.images.shape[-2:]
            centres = data.random_crop_centres(steps * batch_size, self.patch_size, height, width, generator)
            plan["theta"] = data.crop_affine(plan["theta"].view(-1, 2, 3), centres, self.patch_size, height,
                                             width).view(steps, batch_size, 2, 3)
        return {key: to_device(value, self.device) for key, value in plan.items()}

    def batch(self):
        """This step's augmented, normalised batch, assembled on the device."""
        step = self.step_count % self.total_steps
        index = self.plan["indices"][step]
        images = self.images[index].float() / 255
        labels = self.labels[index]
        if self.patch_size:  # the crop is one resampling with the augmentation (identity when it is off)
            images, labels = data.apply_augmentation(images, labels, self.plan["theta"][step],
                                                     self.plan["hsv"][step], out_size=self.patch_size)
        elif self.settings["AUGMENT"]:
            images, labels = data.apply_augmentation(images, labels, self.plan["theta"][step],
                                                     self.plan["hsv"][step])
        images = data.normalize(images).contiguous(memory_format=self.format)
        return images, labels.long()

    def forward_backward(self, forward, images, labels):
        with autocast(self.device, self.settings["AMP"]):
            logits = forward(images)
        loss = self.criterion(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def first_compiled_step(self, images, labels):
        """torch.compile reports most failures (no compiler, unsupported operator) only when the compiled
        model first runs, in its forward or its backward. Then: one notice, undo what the failed attempt
        changed (BatchNorm running statistics; gradients are reset by forward_backward), and redo the same
        batch eagerly, so the run is the one an eager run would have been."""
        self.compile_pending = False
        buffers = [buffer.detach().clone() for buffer in self.model.buffers()]
        try:
            return self.forward_backward(self.forward, images, labels)
        except Exception as error:  # dynamo and inductor raise many unrelated types
            compile_notice(error)
            with torch.no_grad():
                for buffer, saved in zip(self.model.buffers(), buffers):
                    buffer.copy_(saved)
            self.forward = self.eager_forward
            return self.forward_backward(self.forward, images, labels)

    def step(self):
        """One optimisation step; returns the loss as a tensor (no host sync)."""
        lr = poly_lr(self.settings["LR"], self.step_count, self.total_steps, self.settings["POLY_POWER"],
                     self.settings.get("WARMUP_STEPS", 0))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images, labels = self.batch()
        self.model.train()
        if self.compile_pending:
            loss = self.first_compiled_step(images, labels)
        else:
            loss = self.forward_backward(self.forward, images, labels)
        self.optimizer.step()
        self.step_count += 1
        return loss.detach()

    @property
    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def sample_prediction(self):
        """First training image, its label and the current prediction, for a visual check."""
        image = self.images[:1].float() / 255
        height, width = image.shape[-2:]
        padded = data.pad_to_square(image, data.padded_side(height, width))
        probs = predict(self.model, data.normalize(padded), self.device, tta=False, amp=self.settings["AMP"],
                        fmt=self.format)[..., :height, :width]
        return image[0].cpu(), self.labels[0].cpu(), probs[0].cpu()


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(model, images, device, tta=True, amp=True, fmt=torch.contiguous_format, images_per_batch=4):
    """Class probabilities (N, K, H, W) for normalised images (N, 3, H, W).

    With `tta`, every image is seen in all 8 dihedral variants; the variants of `images_per_batch`
    images go through the network in one forward pass, each prediction is mapped back and the 8 are
    averaged (the paper's test-time augmentation).
    """
    model.eval()
    variants = range(8) if tta else range(1)
    results = []
    for chunk in images.split(images_per_batch):
        chunk = chunk.to(device, non_blocking=True)
        batch = torch.cat([data.dihedral(chunk, k) for k in variants]).contiguous(memory_format=fmt)
        with autocast(device, amp):
            logits = model(batch)
        probs = networks.probabilities(logits.float()).split(len(chunk))
        restored = torch.stack([data.undo_dihedral(view, k) for view, k in zip(probs, variants)])
        results.append(restored.mean(0))
    return torch.cat(results)


# --------------------------------------------------------------------------------------------
# Visdom
# --------------------------------------------------------------------------------------------

class VisdomLogger:
    """Loss / LR curves and a sample (image, label, prediction) in a visdom environment.

    When no server answers, says so once and turns into a no-op, so training never depends on it.
    """

    def __init__(self, server, port, env, enabled=True):
        self.env, self.viz = env, None
        if not enabled:
            return
        try:
            import logging

            from visdom import Visdom
            logging.getLogger("visdom").setLevel(logging.CRITICAL)
            viz = Visdom(server=server, port=port, env=env, raise_exceptions=True, use_incoming_socket=False)
            if viz.check_connection(timeout_seconds=2):
                self.viz = viz
        except Exception:  # visdom raises bare ConnectionErrors of several kinds
            self.viz = None
        if self.viz is None:
            print(f"notice: no visdom server at {server}:{port}; training goes on without live plots "
                  f"(start one with `python -m visdom.server`)", file=sys.stderr)

    def scalar(self, window, step, value):
        if self.viz is None:
            return
        try:
            update = "append" if self.viz.win_exists(window, env=self.env) else None
            self.viz.line(X=[step], Y=[value], win=window, env=self.env, update=update,
                          opts={"title": window, "xlabel": "step"})
        except Exception:
            self._lost()

    def sample(self, image, label, probs):
        """Image, label and prediction side by side (the prediction is the foreground probability,
        or the argmax class scaled to grey for multi-class)."""
        if self.viz is None:
            return
        if probs.shape[0] == 1:
            shown = probs[0]
        else:
            shown = probs.argmax(0).float() / max(1, probs.shape[0] - 1)
        grey = label.float() / max(1, int(label.max()))
        tiles = torch.stack([image, grey.expand(3, -1, -1), shown.expand(3, -1, -1)])
        try:
            self.viz.images(tiles.clamp(0, 1), nrow=3, win="sample", env=self.env,
                            opts={"title": "image | label | prediction"})
        except Exception:
            self._lost()

    def _lost(self):
        print("notice: lost the visdom server; training goes on without live plots", file=sys.stderr)
        self.viz = None


def write_json(path, payload):
    Path(path).write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def timed():
    """A monotonic clock that waits for queued GPU work first, so timings are real."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()
