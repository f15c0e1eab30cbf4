"""How fast the real training and evaluation code runs, as a table of figures.

    python benchmark.py                                  # constants.py as it is (448 px, batch 8, bf16 on CUDA)
    python benchmark.py --batch-size 32 --compile true
    python benchmark.py --compare                        # GPU: fp32 batch 8 -> bf16 + channels_last batch 32 -> + compile
    python benchmark.py --device cpu --recipe cpu --compare --no-eval   # CPU: fp32 NCHW, fp32 channels_last,
                                                         # bf16 channels_last (native bf16 only), + compile
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
- a projection of a full main.py run with these settings (start-up + warm-up + remaining steps);
- with --compare, the machine's own matrix-multiply peak in each precision (a large torch.mm, timed in the
  same run) and the GFLOP/s the model reaches against it, from FLOPs that torch.utils.flop_counter counts in
  one training step and one inference batch (convolutions and matrix products; the elementwise rest is free
  to that count, so a fraction well under 100 % is time spent outside the multiply-adds).
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

# --compare: (label, overrides, batch, training layout forced or None). Rows that reduce on this device to an
# earlier one (bf16 on a CPU without native bf16, a compile under torchrun on GPUs) are left out.
GPU_COMPARE_ROWS = [
    ("before: the paper's fp32, batch {small}", {"AMP": False, "CHANNELS_LAST": False, "COMPILE": False}, "small",
     None),
    ("after: batch {large}, bf16 + channels_last on CUDA", {"AMP": True, "CHANNELS_LAST": True, "COMPILE": False},
     "large", None),
    ("after, + torch.compile", {"AMP": True, "CHANNELS_LAST": True, "COMPILE": True}, "large", None),
]
# On the CPU the batch is the run's own (a 2-core machine has no larger batch to spare). main.py trains in
# NCHW there (devices.memory_format); the channels_last training rows are what-ifs, forced here.
CPU_COMPARE_ROWS = [
    ("fp32, NCHW (--amp false)", {"AMP": False, "CHANNELS_LAST": False, "COMPILE": False}, None, None),
    ("fp32, channels_last training", {"AMP": False, "CHANNELS_LAST": True, "COMPILE": False}, None,
     torch.channels_last),
    ("AMP: bf16 autocast where native", {"AMP": True, "CHANNELS_LAST": True, "COMPILE": False}, None, None),
    ("AMP, channels_last training", {"AMP": True, "CHANNELS_LAST": True, "COMPILE": False}, None,
     torch.channels_last),
    ("AMP, + torch.compile", {"AMP": True, "CHANNELS_LAST": True, "COMPILE": True}, None, None),
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


def describe(settings, device, world_size, layout=None):
    """What actually runs, after the device has dropped the options it does not use (bf16 / fp16 by GPU,
    bf16 on CPUs that compute it natively, the training layout of devices.memory_format unless `layout`
    forces one, no compile under torchrun on GPUs: see framework.compile_useful)."""
    cuda = device.type == "cuda"
    dtype = devices.amp_dtype(device, settings["AMP"])
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16 + loss scaling"}[dtype]
    layout = layout or devices.memory_format(device, settings["CHANNELS_LAST"], settings["AMP"])
    layout = "channels_last" if layout == torch.channels_last else "NCHW"
    compiled = "compiled" if settings["COMPILE"] and not (cuda and world_size > 1) else "eager"
    processes = f" x{world_size} processes" if world_size > 1 else ""
    return f"{precision}, {layout}, {compiled}, batch {settings['BATCH_SIZE']}{processes}"


def measure(settings, args, device, rank, world_size, workdir, layout=None, peaks=None):
    """Figures for one configuration: a dict of name -> number (or None where not applicable). With `peaks`
    (precision -> GFLOP/s of a large matrix product), also the model's achieved GFLOP/s and their share."""
    clock = devices.timed(device)
    model, images, labels, _, instances = training.prepare(settings, rank)
    full_run_steps = data.steps_for(len(images), settings["BATCH_SIZE"], settings["EPOCHS"])
    # The poly schedule must not run out during the benchmark (its base would go negative).
    steps_per_epoch = math.ceil(len(images) / settings["BATCH_SIZE"])
    needed_epochs = math.ceil((args.warmup + args.steps + 1) / steps_per_epoch)
    config = framework.TrainConfig.from_settings(settings, epochs=max(settings["EPOCHS"], needed_epochs),
                                                 sgd_kernel=args.sgd_kernel or "")
    trainer = framework.Trainer(model, images, labels, config, device, rank, world_size, layout=layout,
                                instances=instances)
    startup = devices.timed(device) - clock

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    clock = devices.timed(device)
    for done in range(args.warmup):
        trainer.step()
        if done == 0 and rank == 0:
            announce_long_wait("training", devices.timed(device) - clock, args.warmup - 1 + args.steps, "steps")
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
    clock = devices.timed(device)
    infer()
    first_batch_seconds = devices.timed(device) - clock
    if rank == 0:
        announce_long_wait(f"inference on batches of {count} whole {batch.shape[-2]}x{batch.shape[-1]} images",
                           first_batch_seconds, max(0, args.warmup - 1) + args.steps, "batches")
    for _ in range(max(0, args.warmup - 1)):
        infer()
    clock = devices.timed(device)
    for _ in range(args.steps):
        infer()
    infer_seconds = devices.timed(device) - clock

    infer_batch_seconds = infer_seconds / args.steps

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
    if peaks is not None:
        figures.update(flop_figures(trainer, batch, device, settings, fmt, step_seconds, infer_batch_seconds,
                                    peaks))
    if not args.no_eval and rank == 0:
        checkpoint = framework.save_checkpoint(workdir / "benchmark.pth", trainer.model, settings,
                                               step=trainer.step_count)
        del trainer, model  # evaluate loads its own copy, as test.py does
        if cuda:
            torch.cuda.empty_cache()
        test_count = len(tasks.load_split(settings["DATASET"], settings["DATA_ROOT"], "test",
                                          tasks.SplitOptions.from_settings(settings)))
        views = 8 if settings["TTA"] else 1
        announce_long_wait(f"evaluation of {test_count} test images x {views} view(s)", first_batch_seconds / count,
                           test_count * views, "image views", skip="--no-eval skips it")
        clock = devices.timed(device)
        _, _, after_load = evaluation.evaluate(checkpoint, settings, out_dir=workdir / "evaluate")
        whole = devices.timed(device) - clock
        tta = "with 8-way TTA" if settings["TTA"] else "no TTA"
        figures[f"evaluate {test_count} test images {tta}, all outputs, after model load (s)"] = after_load
        figures["evaluate, including model load and reading the images (s)"] = whole
    if world_size > 1:
        devices.dist.barrier()  # the other processes wait while rank 0 evaluates
    return figures


# A phase projected to take longer than this is announced, so a slow model on large images is not taken for a
# hang (FullNet on 1000-px MoNuSeg tiles: about two minutes a batch of four on a 2-core CPU).
LONG_WAIT_SECONDS = 60


def announce_long_wait(what, seconds_each, count, unit, skip="fewer --steps shorten it"):
    """One line on stderr when `count` more `unit` of `seconds_each` will take more than LONG_WAIT_SECONDS."""
    projected = seconds_each * count
    if projected > LONG_WAIT_SECONDS:
        print(f"benchmark: {what}: about {seconds_each:.1f} s each, so {count} more {unit} take about "
              f"{duration_text(projected)} ({skip})", file=sys.stderr, flush=True)


def duration_text(seconds):
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def compare_configurations(settings, batches, device, world_size):
    """(label, settings, forced layout) for each compare row that differs, on this device, from the rows
    before it."""
    rows = GPU_COMPARE_ROWS if device.type == "cuda" else CPU_COMPARE_ROWS
    configurations, seen = [], set()
    for label, overrides, batch, layout in rows:
        row = {**settings, **overrides}
        if batch is not None:
            row["BATCH_SIZE"] = batches[batch]
        effective = describe(row, device, world_size, layout)
        if effective not in seen:
            seen.add(effective)
            configurations.append((label.format(**batches), row, layout))
    return configurations


# --- the machine's own peak, and the share of it the model reaches ---------------------------------------

PEAK_SIDE = {"cpu": 4096, "cuda": 8192}  # square matrices: large enough for the library's best kernel
                                         # (on a 2-core AMD EPYC, fp32 2048 reached half of what 4096 did)


def precision_key(settings, device):
    dtype = devices.amp_dtype(device, settings["AMP"])
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def matmul_peak(device, precision, repeats=5):
    """GFLOP/s of torch.mm on two square matrices in `precision` (fp32 / bf16 / fp16): the best of `repeats`
    after two untimed products. On the CPU it uses every thread torch has, as training does."""
    side = PEAK_SIDE.get(device.type, 2048)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(side, side, generator=generator).to(device, dtype) for _ in range(2))
    for _ in range(2):
        torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        clock = devices.timed(device)
        torch.mm(a, b)
        best = min(best, devices.timed(device) - clock)
    return 2 * side ** 3 / best / 1e9


def counted_flops(function):
    """Floating-point operations torch.utils.flop_counter counts while `function` runs (matrix products and
    convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        function()
    return counter.get_total_flops()


def flop_figures(trainer, batch, device, settings, fmt, step_seconds, infer_batch_seconds, peaks):
    """Achieved GFLOP/s of the timed training step and inference batch, and their share of the matmul peak
    in the same precision. Counted after the clock stopped, on one more step's worth of work."""
    images, labels = trainer.batch()
    trainer.model.train()
    train_flops = counted_flops(lambda: trainer.forward_backward(trainer.eager_forward, images, labels))
    infer_flops = counted_flops(lambda: inference.predict(trainer.model, batch, device, tta=False,
                                                          amp=settings["AMP"], fmt=fmt,
                                                          images_per_batch=len(batch)))
    precision = precision_key(settings, device)
    peak = peaks[precision]
    train_rate, infer_rate = train_flops / step_seconds / 1e9, infer_flops / infer_batch_seconds / 1e9
    return {
        "counted GFLOP per training step": train_flops / 1e9,
        "training, achieved GFLOP/s": train_rate,
        f"training, share of the {precision} matmul peak (%)": 100 * train_rate / peak,
        "counted GFLOP per inference batch": infer_flops / 1e9,
        "inference, achieved GFLOP/s": infer_rate,
        f"inference, share of the {precision} matmul peak (%)": 100 * infer_rate / peak,
    }


def number(value):
    if value is None:
        return "n/a"
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def print_figures(title, figures):
    print(f"\n{title}\n")
    print(report.markdown_table(["figure", "value"], [[name, number(value)] for name, value in figures.items()]))


def share_of_peak(figures, part):
    key = next((key for key in figures if key.startswith(f"{part}, share of the")), None)
    return f"{figures[key]:.0f} % of {key.split('the ')[1].split(' matmul')[0]}" if key else "n/a"


def print_comparison(rows, peaks):
    """Before/after table: one row per configuration, speed-ups against the first, and each row's share of
    the matrix-multiply peak measured in its precision."""
    first = rows[0][2]
    evaluate_key = next((key for key in first if key.startswith("evaluate ") and "after model load" in key), None)
    print("\n| configuration | runs as | train step (ms) | train img/s | speed-up | train GFLOP/s (share of peak) "
          "| peak GPU memory (GiB) | inference img/s (eager) | speed-up | inference GFLOP/s (share of peak) |"
          + (" evaluate (s) |" if evaluate_key else ""))
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if evaluate_key else ""))
    for label, effective, figures in rows:
        throughput = figures["train throughput (img/s)"]
        inference_rate = figures["inference throughput, eager, no TTA (img/s)"]
        cells = [label, effective, number(figures["train step (ms)"]), number(throughput),
                 f"{throughput / first['train throughput (img/s)']:.2f}x",
                 f"{number(figures['training, achieved GFLOP/s'])} ({share_of_peak(figures, 'training')})",
                 number(figures["peak GPU memory, training (GiB)"]), number(inference_rate),
                 f"{inference_rate / first['inference throughput, eager, no TTA (img/s)']:.2f}x",
                 f"{number(figures['inference, achieved GFLOP/s'])} ({share_of_peak(figures, 'inference')})"]
        if evaluate_key:
            cells.append(number(figures.get(evaluate_key)))
        print("| " + " | ".join(cells) + " |")
    print("\nmatrix-multiply peak of this machine, torch.mm of two square matrices: "
          + ", ".join(f"{precision} {number(value)} GFLOP/s" for precision, value in peaks.items()))


def run(args, settings):
    device = devices.select_device(settings["DEVICE"])
    rank, world_size = devices.distributed_context(device)
    settings["DEVICE"] = str(device)  # evaluate() picks the same device, without a second notice
    devices.configure_speed(device, settings["DETERMINISTIC"])
    cpu = (f"CPU {devices.cpu_model()} ({devices.cpu_capability()[0]}), {torch.get_num_threads()} thread(s)")
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    config = framework.TrainConfig.from_settings(settings, sgd_kernel=args.sgd_kernel or "")
    optimizer = f"SGD {framework.sgd_kernel(config, device)}" if config.optimizer == "sgd" else config.optimizer
    size = f"{config.patch_size} px crops" if config.patch_size else f"{settings['IMAGE_SIZE']} px"
    header = (f"{settings['MODEL']} on {settings['DATASET']} at {size}, {machine}, torch {torch.__version__}, "
              f"{optimizer}, {args.steps} timed steps after {args.warmup} warm-up")

    configurations = compare_configurations(settings, args.batches, device, world_size) if args.compare \
        else [("", settings, None)]
    peaks = None
    if args.compare:
        precisions = dict.fromkeys(precision_key(row, device) for _, row, _ in configurations)
        peaks = {precision: matmul_peak(device, precision) for precision in precisions}
    results = []
    with tempfile.TemporaryDirectory(prefix="cenet-benchmark-") as temporary:
        for index, (label, row, layout) in enumerate(configurations):
            workdir = Path(temporary) / f"config-{index}"
            workdir.mkdir()
            figures = measure(row, args, device, rank, world_size, workdir, layout, peaks)
            runs_as = describe(row, device, world_size, layout)
            if rank == 0:
                print_figures(f"{header}\n{label} (runs as {runs_as})" if label else f"{header}\n{runs_as}", figures)
            results.append((label, runs_as, figures))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if row["COMPILE"]:
                torch._dynamo.reset()  # the next configuration compiles afresh
    if args.compare and rank == 0:
        if device.type == "cpu" and not devices.cpu_capability()[1]:
            print(f"\n(this CPU has no native bf16 ({devices.cpu_capability()[0]}), so AMP runs fp32 NCHW here "
                  f"and its rows reduce to the first; they are measured once)")
        print_comparison(results, peaks)


def main(argv=None):
    args, settings = parse_args(argv)
    try:
        run(args, settings)
        devices.close_distributed()
    finally:
        devices.close_distributed(finished=False)  # a no-op when the run already closed it


if __name__ == "__main__":
    cli.run(main)
