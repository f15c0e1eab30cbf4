"""How fast the real training and evaluation code runs, as a table of figures.

    python benchmark.py                                  # constants.py as it is (448 px, batch 8, bf16 on CUDA)
    python benchmark.py --batch-size 32 --compile true
    python benchmark.py --compare                        # fp32 batch 8 -> bf16 + channels_last batch 32 -> + compile
    python benchmark.py --device cpu --image-size 64 --batch-size 2 --steps 3 --warmup 1
    torchrun --nproc_per_node=4 benchmark.py --batch-size 128   # data parallel; --batch-size is the global batch

What is measured, all through the code main.py and test.py run:
- train: framework.Trainer.step() on the training split held on the device (batch gather, augmentation
  on the device, forward, loss, backward, SGD, poly LR), --steps steps timed after --warmup untimed ones
  (the warm-up absorbs torch.compile and cuDNN autotuning); img/s counts the global batch;
- peak GPU memory of those training steps (torch.cuda.max_memory_allocated; n/a on the CPU);
- inference: inference.predict without TTA on a batch of BATCH_SIZE images, eval mode, in each process,
  with the memory layout test.py uses; always eager, as test.py predicts with the uncompiled model (so a
  "+ compile" row speeds up training only);
- evaluate: evaluation.evaluate on the whole test split (TTA when TTA is on, metrics, every PNG, ROC plot,
  metrics.json) into a temporary folder, timed after the model is loaded, as test.py reports it;
- a projection of a full main.py run with these settings (start-up + warm-up + remaining steps).
The weights are those of the trained steps; speed does not depend on their values, so the encoder starts
from random weights unless --pretrained is given (no download needed).
"""
import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

import cli
import data
import devices
import evaluation
import framework
import inference
import report
import tasks
import training
from errors import UserError

# --compare: the quoted before/after steps. On the CPU, bf16 autocast and channels_last do not apply
# (devices.autocast / memory_format), so rows that reduce to an earlier one are left out.
COMPARE_ROWS = [
    ("before: the paper's fp32, batch {small}", {"AMP": False, "CHANNELS_LAST": False, "COMPILE": False}, "small"),
    ("after: batch {large}, bf16 + channels_last on CUDA", {"AMP": True, "CHANNELS_LAST": True, "COMPILE": False},
     "large"),
    ("after, + torch.compile", {"AMP": True, "CHANNELS_LAST": True, "COMPILE": True}, "large"),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="timed training steps (default 50)")
    parser.add_argument("--warmup", type=int, default=10,
                        help="untimed steps first: compilation, cuDNN autotuning, allocator (default 10)")
    parser.add_argument("--compare", action="store_true",
                        help="measure the configurations of COMPARE_ROWS and print a before/after table")
    parser.add_argument("--compare-batches", default="8,32", metavar="SMALL,LARGE",
                        help="batch sizes of the --compare rows: the paper's, and the fast one (default 8,32)")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation.evaluate timing")
    parser.add_argument("--sgd-kernel", choices=("fused", "foreach", "loop"), default=None,
                        help="SGD implementation (default: what main.py uses, foreach on CUDA, loop on the CPU)")
    cli.add_constant_flags(parser)
    args = parser.parse_args(argv)
    settings, given = cli.settings_from(args)
    if args.steps < 1 or args.warmup < 0:
        raise UserError(f"--steps must be at least 1 and --warmup at least 0 (got {args.steps}, {args.warmup})")
    try:
        small, large = (int(text) for text in args.compare_batches.split(","))
    except ValueError:
        raise UserError(f"--compare-batches wants two integers like 8,32, got {args.compare_batches!r}")
    if small < 1 or large < 1:
        raise UserError(f"--compare-batches must be positive, got {args.compare_batches!r}")
    args.batches = {"small": small, "large": large}
    if "PRETRAINED" not in given:
        settings["PRETRAINED"] = "none"  # speed does not depend on the starting weights
    settings["VISDOM"] = False
    return args, settings


def describe(settings, device, world_size):
    """What actually runs, after the device has dropped the options it does not use (bf16 / fp16 by GPU,
    channels_last on CUDA only, no compile under torchrun on GPUs: see framework.compile_useful)."""
    cuda = device.type == "cuda"
    dtype = devices.amp_dtype(device, settings["AMP"])
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16 + loss scaling"}[dtype]
    layout = "channels_last" if settings["CHANNELS_LAST"] and cuda else "NCHW"
    compiled = "compiled" if settings["COMPILE"] and not (cuda and world_size > 1) else "eager"
    processes = f" x{world_size} processes" if world_size > 1 else ""
    return f"{precision}, {layout}, {compiled}, batch {settings['BATCH_SIZE']}{processes}"


def measure(settings, args, device, rank, world_size, workdir):
    """Figures for one configuration: a dict of name -> number (or None where not applicable)."""
    clock = devices.timed(device)
    model, images, labels, _ = training.prepare(settings, rank)
    full_run_steps = data.steps_for(len(images), settings["BATCH_SIZE"], settings["EPOCHS"])
    # The poly schedule must not run out during the benchmark (its base would go negative).
    steps_per_epoch = math.ceil(len(images) / settings["BATCH_SIZE"])
    needed_epochs = math.ceil((args.warmup + args.steps + 1) / steps_per_epoch)
    config = framework.TrainConfig.from_settings(settings, epochs=max(settings["EPOCHS"], needed_epochs),
                                                 sgd_kernel=args.sgd_kernel or "")
    trainer = framework.Trainer(model, images, labels, config, device, rank, world_size)
    startup = devices.timed(device) - clock

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    clock = devices.timed(device)
    for _ in range(args.warmup):
        trainer.step()
    warmup_seconds = devices.timed(device) - clock
    clock = devices.timed(device)
    for _ in range(args.steps):
        loss = trainer.step()
    train_seconds = devices.timed(device) - clock
    if not torch.isfinite(loss).all():  # after the clock stopped: reading it waits for the GPU
        print(f"notice: the training loss is {loss.item()} after the timed steps", file=sys.stderr)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    step_seconds = train_seconds / args.steps

    # Inference: eval-mode forward of one batch through the real predict(), without TTA. Crop-trained
    # models predict whole native images, padded to a square multiple of 32 as test.py does.
    count = settings["BATCH_SIZE"]
    images = trainer.images[torch.arange(count, device=device) % len(trainer.images)]
    if config.patch_size:
        images = data.pad_to_square(images, data.padded_side(*images.shape[-2:]))
    batch = data.normalize(images, settings["PREPROCESS"])
    fmt = devices.inference_memory_format(device, settings["CHANNELS_LAST"])
    infer = lambda: inference.predict(trainer.model, batch, device, tta=False, amp=settings["AMP"],
                                      fmt=fmt, images_per_batch=count)
    for _ in range(max(1, args.warmup)):
        infer()
    clock = devices.timed(device)
    for _ in range(args.steps):
        infer()
    infer_seconds = devices.timed(device) - clock

    figures = {
        "train throughput (img/s)": settings["BATCH_SIZE"] * args.steps / train_seconds,
        "train step (ms)": 1000 * step_seconds,
        "peak GPU memory, training (GiB)": peak,
        "inference throughput, eager, no TTA (img/s)": count * args.steps / infer_seconds,
        "start-up: read data, build model (s)": startup,
        f"warm-up, {args.warmup} steps (s)": warmup_seconds,
        f"projected main.py run, {full_run_steps} steps (s)":
            startup + warmup_seconds + max(0, full_run_steps - args.warmup) * step_seconds,
    }
    if not args.no_eval and rank == 0:
        checkpoint = framework.save_checkpoint(workdir / "benchmark.pth", trainer.model, settings,
                                               step=trainer.step_count)
        del trainer, model  # evaluate loads its own copy, as test.py does
        if cuda:
            torch.cuda.empty_cache()
        test_count = len(tasks.load_split(settings["DATASET"], settings["DATA_ROOT"], "test",
                                          tasks.SplitOptions.from_settings(settings)))
        clock = devices.timed(device)
        _, _, after_load = evaluation.evaluate(checkpoint, settings, out_dir=workdir / "evaluate")
        whole = devices.timed(device) - clock
        tta = "with 8-way TTA" if settings["TTA"] else "no TTA"
        figures[f"evaluate {test_count} test images {tta}, all outputs, after model load (s)"] = after_load
        figures["evaluate, including model load and reading the images (s)"] = whole
    if world_size > 1:
        devices.dist.barrier()  # the other processes wait while rank 0 evaluates
    return figures


def compare_configurations(settings, batches, device, world_size):
    """(label, settings) for each COMPARE_ROWS entry that differs, on this device, from the rows before it."""
    configurations, seen = [], set()
    for label, overrides, batch in COMPARE_ROWS:
        row = {**settings, **overrides, "BATCH_SIZE": batches[batch]}
        effective = describe(row, device, world_size)
        if effective not in seen:
            seen.add(effective)
            configurations.append((label.format(**batches), row))
    return configurations


def number(value):
    if value is None:
        return "n/a"
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def print_figures(title, figures):
    print(f"\n{title}\n")
    print(report.markdown_table(["figure", "value"], [[name, number(value)] for name, value in figures.items()]))


def print_comparison(rows):
    """Before/after table: one row per configuration, speed-ups against the first."""
    first = rows[0][2]["train throughput (img/s)"]
    evaluate_key = next((key for key in rows[0][2] if key.startswith("evaluate ") and "after model load" in key),
                        None)
    print("\n| configuration | runs as | train img/s | speed-up | peak GPU memory (GiB) | inference img/s (eager) |"
          + (" evaluate (s) |" if evaluate_key else ""))
    print("|---|---|---|---|---|---|" + ("---|" if evaluate_key else ""))
    for label, effective, figures in rows:
        throughput = figures["train throughput (img/s)"]
        cells = [label, effective, number(throughput), f"{throughput / first:.2f}x",
                 number(figures["peak GPU memory, training (GiB)"]),
                 number(figures["inference throughput, eager, no TTA (img/s)"])]
        if evaluate_key:
            cells.append(number(figures.get(evaluate_key)))
        print("| " + " | ".join(cells) + " |")


def run(args, settings):
    device = devices.select_device(settings["DEVICE"])
    rank, world_size = devices.distributed_context(device)
    settings["DEVICE"] = str(device)  # evaluate() picks the same device, without a second notice
    devices.configure_speed(device, settings["DETERMINISTIC"])
    cpu = f"CPU, {torch.get_num_threads()} thread(s)"
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    config = framework.TrainConfig.from_settings(settings, sgd_kernel=args.sgd_kernel or "")
    optimizer = f"SGD {framework.sgd_kernel(config, device)}" if config.optimizer == "sgd" else config.optimizer
    size = f"{config.patch_size} px crops" if config.patch_size else f"{settings['IMAGE_SIZE']} px"
    header = (f"{settings['MODEL']} on {settings['DATASET']} at {size}, {machine}, torch {torch.__version__}, "
              f"{optimizer}, {args.steps} timed steps after {args.warmup} warm-up")

    configurations = compare_configurations(settings, args.batches, device, world_size) if args.compare \
        else [("", settings)]
    results = []
    with tempfile.TemporaryDirectory(prefix="cenet-benchmark-") as temporary:
        for index, (label, row) in enumerate(configurations):
            workdir = Path(temporary) / f"config-{index}"
            workdir.mkdir()
            figures = measure(row, args, device, rank, world_size, workdir)
            if rank == 0:
                runs_as = describe(row, device, world_size)
                print_figures(f"{header}\n{label} (runs as {runs_as})" if label else f"{header}\n{runs_as}", figures)
            results.append((label, describe(row, device, world_size), figures))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if row["COMPILE"]:
                torch._dynamo.reset()  # the next configuration compiles afresh
    if args.compare and rank == 0:
        if device.type != "cuda":
            print("\n(on the CPU, bf16 autocast and channels_last are not used, so those rows reduce to fp32 "
                  "NCHW and are measured once)")
        print_comparison(results)


def main(argv=None):
    args, settings = parse_args(argv)
    try:
        run(args, settings)
        devices.close_distributed()
    finally:
        devices.close_distributed(finished=False)  # a no-op when the run already closed it


if __name__ == "__main__":
    cli.run(main)
