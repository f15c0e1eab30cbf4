"""The training wrapper: optimiser, LR schedule, the training step, and checkpoints (save / load).

- `TrainConfig`: the settings a training step depends on, read once from constants / flags;
- `Trainer`: SGD (or AdamW) + poly LR on in-memory tensors with batch augmentation on the device;
- checkpoints that record everything test.py needs, and load whatever wrapper saved them.
"""
import contextlib
import dataclasses
import os
import pickle
import sys
from pathlib import Path

import torch

import data
import loss as losses
import networks
from devices import amp_dtype, autocast, memory_format, to_device
from errors import UserError
from inference import predict

CHECKPOINT_FORMAT = "cenet-repro/1"


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
    return {networks.strip_prefixes(key, networks.WRAPPER_PREFIXES): value for key, value in state_dict.items()}



def checkpoint_settings(settings):
    """The constants a run used, as recorded in its checkpoint and settings.json."""
    return dict(settings)



def save_checkpoint(path, model, settings, **extra):
    """Write a checkpoint that test.py can use alone. Refuses to replace an existing file."""
    path = Path(path)
    if path.exists():
        raise UserError(f"{path} already exists; refusing to overwrite it (choose another --run-name)")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": settings["MODEL"],
        "dataset": settings["DATASET"],
        "num_classes": unwrap(model).num_classes,
        "image_size": settings["IMAGE_SIZE"],
        "settings": checkpoint_settings(settings),
        "state_dict": clean_state_dict(unwrap(model).state_dict()),
        **extra,
    }
    return write_atomically(payload, path)


def write_atomically(payload, path):
    """torch.save to a side file, then rename it over `path`: a crash or a full disk mid-write never leaves a
    truncated file, and the file `path` held before (an earlier resume point) stays intact."""
    path = Path(path)
    temporary = path.with_name(path.name + ".partial")
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:  # torch wraps a full disk in a RuntimeError
        temporary.unlink(missing_ok=True)
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise UserError(f"could not write {path} ({reason}); free some space or choose another --weights-dir"
                        + ("; the previous resume point there is intact" if path.exists() else ""))
    return path


# What a resume point holds besides the model: enough to continue bit for bit.
RESUME_FORMAT = "cenet-repro/resume/1"


def save_resume_point(path, trainer, settings, log_lines, **extra):
    """The run so far (weights, optimiser state, step, log) in `path`, replacing the previous one atomically.
    Batch order, crop positions and augmentation come from the seed, so they need no saving."""
    payload = {"format": RESUME_FORMAT, "settings": checkpoint_settings(settings), "step": trainer.step_count,
               "state_dict": clean_state_dict(unwrap(trainer.model).state_dict()),
               "optimizer": trainer.optimizer.state_dict(), "scaler": trainer.scaler.state_dict(),
               "log": list(log_lines), **extra}
    return write_atomically(payload, path)


def read_resume_point(path):
    """A resume point written by save_resume_point; a run folder means its last.pth."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pth"
    payload = read_checkpoint(path)
    if payload.get("format") != RESUME_FORMAT:
        raise UserError(f"{path} is not a resume point (those are the last.pth files main.py writes every "
                        f"CHECKPOINT_EVERY steps and when it is stopped)")
    return path, payload


def release_checkpoint(source, target, **extra):
    """A copy of checkpoint `source` for distribution: weights stored as float16 (half the size; test.py
    loads them into the float32 model; see release_tensor), everything else as recorded, plus `extra`.
    Refuses to replace an existing file."""
    target = Path(target)
    if target.exists():
        raise UserError(f"{target} already exists; refusing to overwrite it")
    payload = read_checkpoint(source)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{source} is not a checkpoint written by main.py")
    payload["state_dict"] = {key: release_tensor(key, value) for key, value in payload["state_dict"].items()}
    payload.update(extra, weights_dtype="float16 (BatchNorm statistics and out-of-range tensors float32)")
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(payload, target)


def release_tensor(key, value):
    """float16 for learned weights; BatchNorm's running statistics stay float32, since a from-scratch
    network can grow variances far beyond float16's range (65504), and so does any tensor that would
    not survive the conversion."""
    if not value.is_floating_point() or key.endswith(("running_mean", "running_var")):
        return value
    half = value.half()
    return half if torch.isfinite(half).all() else value


def average_state_dicts(state_dicts, names):
    """The element-wise mean of several state dicts of one architecture (stochastic weight averaging,
    Izmailov et al., "Averaging weights leads to wider optima and better generalization", 2018):
    mean[key] = (1/n) * sum_i state_dicts[i][key], summed in float64 and stored in each tensor's own dtype.
    Integer tensors (BatchNorm's num_batches_tracked) are counters, not weights: the last dict's value is kept.
    `names` label the dicts in the error raised when their keys or shapes differ."""
    if len(state_dicts) < 2:
        raise UserError("averaging needs at least two checkpoints")
    first, first_name = state_dicts[0], names[0]
    for state_dict, name in zip(state_dicts[1:], names[1:]):
        differing = sorted(set(first) ^ set(state_dict))
        if not differing:
            differing = [key for key in first if first[key].shape != state_dict[key].shape]
        if differing:
            raise UserError(f"{name} and {first_name} hold different tensors (e.g. {differing[0]}); only "
                            f"checkpoints of one architecture and class count can be averaged")
    averaged = {}
    for key, value in first.items():
        if value.is_floating_point():
            total = sum(state_dict[key].double() for state_dict in state_dicts)
            averaged[key] = (total / len(state_dicts)).to(value.dtype)
        else:
            averaged[key] = state_dicts[-1][key].clone()
    return averaged


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
        detail = (str(error).splitlines() or ["the file is empty" if path.stat().st_size == 0 else ""])[0][:120]
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {detail})")
    if not isinstance(payload, dict):
        raise UserError(f"{path} holds a {type(payload).__name__}, not a checkpoint dictionary")
    return payload



def weights_in(payload, path):
    """(state dict, whether it came in the authors' CE-Net tensor names) of a checkpoint payload: ours (its
    "state_dict"), the common {"model": state dict, "optimizer": ...} layout, or a bare state dict; wrapper
    prefixes stripped and the authors' names mapped to this repository's."""
    held = payload.get("state_dict")
    if held is None and isinstance(payload.get("model"), dict):
        held = payload["model"]
    held = payload if held is None else held
    if not isinstance(held, dict):
        raise UserError(f"{path} does not hold model weights")
    held = clean_state_dict(held)
    if networks.is_authors_state_dict(held):
        return networks.from_authors_names(held), True
    return held, False


def load_initial_weights(model, path, name, preprocess):
    """Fine-tuning: every tensor of `model` (a `name` model, to be trained with `preprocess`) from checkpoint
    `path`, one of main.py's (a final.pth, a step_<N>.pth snapshot, a resume point, a release copy) or a bare
    state dict. Returns a one-line status."""
    payload = read_checkpoint(path)
    trained = payload.get("settings") if isinstance(payload.get("settings"), dict) else {}
    recorded = payload["model"] if isinstance(payload.get("model"), str) else trained.get("MODEL")
    if recorded and recorded != name:
        raise UserError(f"--init-weights {path} holds a {recorded!r} model, but this run trains {name!r}; add "
                        f"--model {recorded} or pick a checkpoint of {name!r}")
    state_dict, _ = weights_in(payload, path)
    load_state_dict_checked(unwrap(model), state_dict, path, name)
    if trained.get("PREPROCESS", preprocess) != preprocess:
        print(f"notice: {path} was trained with --preprocess {trained['PREPROCESS']}, and this run feeds it "
              f"--preprocess {preprocess}; give --preprocess {trained['PREPROCESS']} to keep its inputs as they "
              f"were", file=sys.stderr)
    step = f", step {payload['step']}" if payload.get("step") is not None else ""
    return f"weights: all from {path}{step} (--init-weights; --pretrained unused)"


def model_from_state_dict(name, num_classes, state_dict, path):
    """A `name` model with `num_classes` outputs holding `state_dict` (wrapper prefixes stripped);
    one clear error when the tensors do not fit."""
    model = networks.build_model(name, num_classes=num_classes)
    load_state_dict_checked(model, clean_state_dict(state_dict), path, name)
    return model


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
    candidate, number = parent / name, 1
    try:
        parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                candidate.mkdir()
                break
            except FileExistsError:
                number += 1
                candidate = parent / f"{name}-{number}"
        probe = candidate / ".write-test"  # a read-only mount can still allow mkdir of an existing tree
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write to {candidate} ({error.strerror or error}); choose a writable folder "
                        f"with --weights-dir or --results-dir")
    if number > 1:
        print(f"notice: {parent / name} already exists; writing to {candidate} instead", file=sys.stderr)
    return candidate



def latest_checkpoint(weights_dir):
    found = sorted(Path(weights_dir).glob("*/final.pth"), key=lambda path: path.stat().st_mtime)
    if not found:
        raise UserError(f"no checkpoint under {weights_dir}/; train one with main.py or pass --checkpoint PATH")
    return found[-1]


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What a training step depends on; `from_settings` reads it from constants.py names."""
    batch_size: int = 8
    epochs: int = 300
    loss: str = "dice"
    optimizer: str = "sgd"
    lr: float = 4e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    warmup_steps: int = 0
    augment: str = "paper"   # a key of data.AUGMENTATIONS
    preprocess: str = "ours"  # a key of data.PREPROCESSINGS
    patch_size: int = 0
    seed: int = 0
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    sgd_kernel: str = ""     # "" = fused / foreach / loop chosen for the device (see sgd_kernel)
    elastic_alpha: float = data.ELASTIC_ALPHA    # AUGMENT "elastic": control-point displacement std (px)
    elastic_spacing: int = data.ELASTIC_SPACING  # ... and the largest control-point spacing (px)
    border_w0: float = 10.0                      # LOSS "weighted_bce_dice": U-Net's border weight w0
    border_sigma: float = 5.0                    # ... its width sigma (px)
    border_cells: str = "background"             # ... and which class the cells are (loss.BORDER_CELLS)

    @classmethod
    def from_settings(cls, settings, **overrides):
        values = {field.name: settings[field.name.upper()] for field in dataclasses.fields(cls)
                  if field.name.upper() in settings}
        values = {**values, **overrides}
        if "augment" in values:
            values["augment"] = data.augmentation_mode(values["augment"])
        return cls(**values)


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
        if not is_compile_failure(error):
            raise
        compile_notice(error)
        return model



def compile_useful(requested, device, rank, world_size):
    """COMPILE, except on several GPUs: there SyncBatchNorm breaks the compiled graph at every BatchNorm
    (48 in CE-Net), which leaves little to gain, and its all-gathers would run inside the trial step that
    lets every process agree on a compile failure (Trainer.first_compiled_step)."""
    if requested and world_size > 1 and device.type == "cuda":
        if rank == 0:
            print("notice: --compile is off under torchrun on GPUs: SyncBatchNorm breaks the compiled graph at "
                  "each BatchNorm layer, so it would gain little; running eagerly", file=sys.stderr)
        return False
    return requested



def is_compile_failure(error):
    """Whether `error` (or anything it wraps) may be torch.compile failing. Running out of memory and CUDA
    errors (a device-side assert, an illegal address) are not: they would fail eagerly too, so they
    surface as what they are instead of a quiet fallback."""
    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, out_of_memory) or "CUDA error" in str(error) \
                or type(error).__name__ == "AcceleratorError":
            return False
        error = error.__cause__ or error.__context__
    return True



def compile_notice(error, rank=0):
    where = f"process {rank}: " if rank else ""
    if error is None:
        print("notice: torch.compile failed in another process; every process runs eagerly", file=sys.stderr)
        return
    first_line = (str(error).strip().splitlines() or [""])[0][:160]
    print(f"notice: {where}torch.compile unavailable ({type(error).__name__}: {first_line}); running eagerly",
          file=sys.stderr)



def build_optimizer(parameters, config, device):
    """SGD with momentum and L2 weight decay (the paper), or AdamW with decoupled weight decay.

    The same SGD in any implementation (`kernel`: fused, foreach or the per-tensor loop); tests check
    they agree. The default is PyTorch's multi-tensor (foreach) path on CUDA and the loop on the CPU;
    benchmark.py --sgd-kernel compares them."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer != "sgd":
        raise UserError(f"unknown optimizer {config.optimizer!r}; choose sgd or adamw")
    kernel = sgd_kernel(config, device)
    implementation = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[kernel]
    return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                           **implementation)



def sgd_kernel(config, device):
    """The SGD implementation a run uses: the configured one, else foreach on CUDA and the loop on the CPU."""
    return config.sgd_kernel or ("foreach" if device.type == "cuda" else "loop")



# Border weight maps ride through the labels' nearest-neighbour resampling as integers, in these units (a
# thousandth: far below any difference that matters to the loss); float32 carries them exactly up to 2**24.
WEIGHT_UNITS = 1000


def weight_units(weights):
    """(N, H, W) float weight maps as int32 multiples of 1 / WEIGHT_UNITS."""
    return (weights * WEIGHT_UNITS).round().to(torch.int32)


class Trainer:
    """SGD with momentum and weight decay (or AdamW), poly LR, the paper's augmentation, on in-memory tensors.

    `images`/`labels` are uint8 tensors of the whole training set at the training size; they are
    moved to the device once, so a step never waits for a loader. A step never waits for the GPU either:
    the loss comes back as a device tensor, and the caller decides when to read it.
    """

    def __init__(self, model, images, labels, config, device, rank=0, world_size=1, layout=None, instances=None):
        """`layout`: a memory format that replaces the device's choice (devices.memory_format), for
        benchmark.py's what-if rows only. `instances`: (N, H, W) instance ids beside `labels` (data.stack_instances),
        for a loss that asks for them (varCE); without them it takes the connected components of the labels."""
        if config.batch_size % world_size:
            raise UserError(f"batch size {config.batch_size} does not split over {world_size} processes")
        self.config, self.device = config, device
        self.rank, self.world_size = rank, world_size
        self.format = layout or memory_format(device, config.channels_last, config.amp)
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
        self.criterion = losses.build_loss(config.loss, self.model.num_classes, config.border_w0,
                                           config.border_sigma, config.border_cells)
        # Only a loss that reads instances gets them; for any other they would be device memory for nothing.
        uses_instances = getattr(self.criterion, "uses_instances", False)
        self.instances = to_device(instances, device) if instances is not None and uses_instances else None
        # A border-weighted loss gets each label's weight map, computed once here at the training resolution
        # (before crops, so a crop's border pixels know the cells outside it) and moved with the labels.
        self.weights = to_device(weight_units(self.criterion.weight_maps(labels)), device) \
            if getattr(self.criterion, "uses_weight_map", False) else None
        self.optimizer = build_optimizer(self.model.parameters(), config, device)
        # fp16 (GPUs without fast bf16) needs the loss scaled so that small gradients do not flush to zero;
        # bf16 and fp32 do not, and a disabled scaler passes everything through unchanged.
        self.amp_dtype = amp_dtype(device, config.amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.total_steps = data.steps_for(len(images), config.batch_size, config.epochs)
        self.plan = self.draw_plan(len(images), config.batch_size // world_size)
        self.colour_first = data.augmentation_parts(config.augment).get("colour_first", False)
        self.step_count = 0
        wrapped = self.model
        if world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            wrapped = torch.nn.parallel.DistributedDataParallel(wrapped, device_ids=ids)
        self.eager_forward = wrapped
        self.forward = maybe_compile(wrapped, compile_useful(config.compile, device, rank, world_size))
        self.compile_pending = self.forward is not wrapped

    def draw_plan(self, num_images, batch_size):
        """The whole run's randomness, drawn on the CPU from the seed and uploaded once: which images
        each step sees (this rank's shard) and their augmentation parameters. A step then only slices
        device tensors, so it never stalls the host on a host-to-GPU copy, and a seed gives the same images,
        crops and augmentation on every device (the arithmetic itself differs between devices, and on a GPU
        between runs unless DETERMINISTIC: see devices.configure_speed)."""
        seed, steps, augment = self.config.seed, self.total_steps, self.config.augment
        stream = data.BatchStream(num_images, batch_size, seed, self.rank, self.world_size)
        indices = torch.stack([stream.next() for _ in range(steps)])
        generator = torch.Generator().manual_seed(seed * 1000 + self.rank)
        theta, hsv = data.draw_augmentation(steps * batch_size, generator, augment)
        plan = {"indices": indices, "theta": theta.view(steps, batch_size, 2, 3),
                "hsv": hsv.view(steps, batch_size, 3)}
        patch = self.config.patch_size
        if patch:
            height, width = self.images.shape[-2:]
            centres = data.random_crop_centres(steps * batch_size, patch, height, width, generator)
            plan["theta"] = data.crop_affine(plan["theta"].view(-1, 2, 3), centres, patch, height,
                                             width).view(steps, batch_size, 2, 3)
        if data.augmentation_parts(augment).get("elastic"):  # drawn last: the other draws stay as they were
            side = patch or self.images.shape[-1]
            plan["elastic"] = data.draw_displacements(steps * batch_size, side, generator, self.config.elastic_alpha,
                                                      self.config.elastic_spacing).unflatten(0, (steps, batch_size))
        if data.augmentation_parts(augment).get("photometric"):  # drawn last, as the elastic field
            plan["photometric"] = data.draw_photometric(steps * batch_size, generator).view(steps, batch_size, 3)
        return {key: to_device(value, self.device) for key, value in plan.items()}

    def batch(self):
        """This step's augmented, normalised batch, assembled on the device."""
        images, labels, _ = self.batch_with_maps()
        return images, labels

    def batch_with_maps(self):
        """`batch`, and the per-pixel maps the loss reads besides the labels, as the criterion's keyword
        arguments: "instances" (ids) and "weights" (border weight maps), those the run carries. They go through
        the crop and augmentation in one resampling with the labels, so an id stays on its object's pixels and
        a weight on its pixel."""
        step = self.step_count % self.total_steps
        index = self.plan["indices"][step]
        images = self.images[index].float() / 255
        carried = {name: value[index] for name, value in (("instances", self.instances), ("weights", self.weights))
                   if value is not None}
        maps = self.labels[index]
        if carried:
            maps = torch.stack([maps.to(torch.int32), *carried.values()], dim=1)
        displacements = self.plan["elastic"][step] if "elastic" in self.plan else None
        if self.config.patch_size:  # the crop is one resampling with the augmentation (identity when off)
            images, maps = data.apply_augmentation(images, maps, self.plan["theta"][step],
                                                   self.plan["hsv"][step], out_size=self.config.patch_size,
                                                   colour_first=self.colour_first, displacements=displacements)
        elif self.config.augment != "none":
            images, maps = data.apply_augmentation(images, maps, self.plan["theta"][step],
                                                   self.plan["hsv"][step], colour_first=self.colour_first,
                                                   displacements=displacements)
        if "photometric" in self.plan:
            images = data.jitter_photometric(images, self.plan["photometric"][step])
        labels = maps[:, 0] if carried else maps
        extras = {name: maps[:, position] for position, name in enumerate(carried, start=1)}
        if "weights" in extras:
            extras["weights"] = extras["weights"].float() / WEIGHT_UNITS
        images = data.normalize(images, self.config.preprocess).contiguous(memory_format=self.format)
        return images, labels.long(), extras

    def forward_backward(self, forward, images, labels, instances=None, weights=None):
        with autocast(self.device, self.config.amp):
            logits = forward(images)
        extras = {name: value for name, value in (("instances", instances), ("weights", weights)) if value is not None}
        loss = self.criterion(logits.float(), labels, **extras)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        return loss

    def first_compiled_step(self, images, labels, instances=None, weights=None):
        """The first step of a compiled model is a trial: torch.compile reports most failures (no compiler, an
        unsupported operator) only when the compiled model first runs, in its forward or part-way through its
        backward, and possibly in one process only.

        Under DDP the trial exchanges nothing (no buffer broadcast, no gradient all-reduce), so a failure
        anywhere leaves no collective half done; then every process learns whether any failed (one
        all-reduce) and all keep the compiled model or all go eager. What the trial changed (BatchNorm running
        statistics; gradients are reset by forward_backward) is undone and the step is taken for real, so
        the run is the one an eager (or compiled) run would have been. Out-of-memory and CUDA errors are not
        compile failures: they surface as themselves."""
        self.compile_pending = False
        buffers = [buffer.detach().clone() for buffer in self.model.buffers()]
        error = None
        with self.collectives_paused():
            try:
                loss = self.forward_backward(self.forward, images, labels, instances, weights)
            except Exception as caught:  # dynamo and inductor raise many unrelated types
                if not is_compile_failure(caught):
                    raise
                error = caught
        failed = self.failed_anywhere(error is not None)
        if failed:
            if error is not None or self.rank == 0:
                compile_notice(error, self.rank)
            self.forward = self.eager_forward
        elif self.world_size == 1:
            return loss  # one process: the trial was the real step
        with torch.no_grad():
            for buffer, saved in zip(self.model.buffers(), buffers):
                buffer.copy_(saved)
        return self.forward_backward(self.forward, images, labels, instances, weights)

    @contextlib.contextmanager
    def collectives_paused(self):
        """Under DDP: no buffer broadcast before the forward and no gradient all-reduce in the backward
        (DDP skips both when these flags are off; `no_sync` alone would still broadcast the buffers)."""
        if self.world_size == 1:
            yield
            return
        ddp = self.eager_forward
        saved = ddp.require_forward_param_sync, ddp.require_backward_grad_sync
        ddp.require_forward_param_sync = ddp.require_backward_grad_sync = False
        try:
            yield
        finally:
            ddp.require_forward_param_sync, ddp.require_backward_grad_sync = saved

    def failed_anywhere(self, failed_here):
        """True on every process when any process failed (an all-reduce of the flag under DDP)."""
        if self.world_size == 1:
            return failed_here
        import torch.distributed as dist
        flag = torch.tensor([1.0 if failed_here else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def step(self):
        """One optimisation step; returns the loss as a tensor (no host sync)."""
        lr = poly_lr(self.config.lr, self.step_count, self.total_steps, self.config.poly_power,
                     self.config.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images, labels, extras = self.batch_with_maps()
        self.model.train()
        if self.compile_pending:
            loss = self.first_compiled_step(images, labels, **extras)
        else:
            loss = self.forward_backward(self.forward, images, labels, **extras)
        self.scaler.step(self.optimizer)
        self.scaler.update()
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
        probs = predict(self.model, data.normalize(padded, self.config.preprocess), self.device, tta=False, amp=self.config.amp,
                        fmt=self.format)[..., :height, :width]
        return image[0].cpu(), self.labels[0].cpu(), probs[0].cpu()

