"""One training run, as main.py (and reproduce.py, benchmark.py) runs it: data in memory, model with its
encoder weights, the Trainer's steps with a progress bar and live plots, and a new run folder holding the
checkpoint, settings.json, train_log.csv and the training curve. Nothing an earlier run wrote is replaced.
"""
import datetime
import signal
import sys
import time

import data
import devices
import framework
import loss as losses
import networks
import report
import tasks
from errors import UserError
from live_plots import VisdomLogger


def run_name(settings):
    if settings["RUN_NAME"]:
        return settings["RUN_NAME"]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{settings['DATASET']}_{settings['MODEL']}_{stamp}"


def say(rank, message):
    if rank == 0:
        print(message, file=sys.stderr)


def training_tensors(settings):
    """The training split as uint8 tensors: resized to IMAGE_SIZE, or at native resolution for crops; and its
    instance maps laid out alike (data.stack_instances) when the loss reads them and the dataset has them
    (GlaS, MoNuSeg), else None."""
    spec = tasks.dataset(settings["DATASET"])
    samples = tasks.load_split(settings["DATASET"], settings["DATA_ROOT"], "train",
                               tasks.SplitOptions.from_settings(settings))
    num_classes = spec.outputs(settings)
    empty = [sample.name for sample in samples if num_classes == 1 and not sample.label.any()]
    if empty:
        print(f"warning: {len(empty)} of {len(samples)} training labels have no foreground "
              f"({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}); check that the annotations are the "
              f"right files (a binary label counts every nonzero value as foreground)", file=sys.stderr)
    instances = None
    if getattr(losses.build_loss(settings["LOSS"], num_classes), "uses_instances", False) \
            and all(sample.instances is not None for sample in samples):
        instances = data.stack_instances(samples, None if settings["PATCH_SIZE"] else settings["IMAGE_SIZE"],
                                         settings["PATCH_SCALE"] if settings["PATCH_SIZE"] else 1.0)
    if settings["PATCH_SIZE"]:
        return (*data.stack_native(samples, num_classes, settings["PATCH_SCALE"], settings["PREPROCESS"]),
                instances)
    return (*data.stack_samples(samples, settings["IMAGE_SIZE"], num_classes, settings["PREPROCESS"]), instances)


def prepare(settings, rank):
    """Everything before the first step: validation, data in memory, model with its encoder weights. Returns
    (model, images, labels, encoder weights status, instance maps or None: see training_tensors)."""
    data.check_image_size(settings["PATCH_SIZE"] or settings["IMAGE_SIZE"])
    if settings["PATCH_SCALE"] != 1 and not settings["PATCH_SIZE"]:
        raise UserError(f"--patch-scale {settings['PATCH_SCALE']:g} applies to crop training only; add "
                        f"--patch-size N (e.g. 256), or set the size of whole resized images with --image-size")
    spec = tasks.dataset(settings["DATASET"])
    settings = spec.with_classes(settings)  # a no-op after train() decided them; benchmark.py calls prepare alone
    if settings["MODEL"] not in networks.MODELS:
        networks.build_model(settings["MODEL"])  # raises the UserError listing valid names
    images, labels, instances = training_tensors(settings)
    devices.seed_everything(settings["SEED"])
    model = networks.build_model(settings["MODEL"], num_classes=spec.outputs(settings))
    if settings["INIT_WEIGHTS"] and not settings["RESUME"]:  # a resumed run's own weights replace them anyway
        status = framework.load_initial_weights(model, settings["INIT_WEIGHTS"], settings["MODEL"],
                                                  settings["PREPROCESS"])
    else:
        status = networks.load_encoder_weights(model, settings["PRETRAINED"])
    say(rank, status)
    return model, images, labels, status, instances


def describe_input(settings, count):
    if settings["PATCH_SIZE"]:
        scale = settings["PATCH_SCALE"]
        where = "native resolution" if scale == 1 else f"{scale:g}x native resolution"
        return f"{count} images, random {settings['PATCH_SIZE']}px crops at {where}"
    return f"{count} images resized to {settings['IMAGE_SIZE']}px"


# Settings that decide how a run is watched and saved, never what it computes.
BOOKKEEPING = ("VISDOM", "VISDOM_SERVER", "VISDOM_PORT", "LOG_EVERY", "CHECKPOINT_EVERY", "CHECKPOINT_MIN_SECONDS",
               "SNAPSHOT_EVERY")
# What the command line may set anew for a resumed run.
RESUMABLE_CHANGES = ("DEVICE", *BOOKKEEPING)


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM (a cluster's time limit) ask the loop to stop after the current step,
    so the run can be saved; a second Ctrl-C stops at once. Only in a single process: under torchrun the
    ranks could stop at different steps and wait on each other forever."""

    def __init__(self, enabled):
        self.enabled, self.received, self.previous = enabled, None, {}

    def __enter__(self):
        if self.enabled:
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self.handle)
        return self

    def handle(self, number, frame):
        if self.received is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = number
        print(f"\n{signal.Signals(number).name}: stopping after this step to save the run "
              f"(Ctrl-C again stops at once, losing what the last resume point does not hold)", file=sys.stderr)

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def resumed_settings(settings, given):
    """(settings, resume point) for --resume: the run's own settings, with those of RESUMABLE_CHANGES that the
    command line gave (and today's defaults for settings that did not exist when the run was saved)."""
    if not settings["RESUME"]:
        return settings, None
    path, point = framework.read_resume_point(settings["RESUME"])
    merged = {**settings, **point["settings"], **{key: settings[key] for key in RESUMABLE_CHANGES if key in given},
              "RESUME": settings["RESUME"]}
    return merged, {**point, "path": path}


def train(settings, given=frozenset()):
    """Train with `settings` (every constant, resolved; `given`: the names the command line set); returns the
    run folder (rank 0) or None.

    Every CHECKPOINT_EVERY steps (at least CHECKPOINT_MIN_SECONDS apart), and when stopped by Ctrl-C or
    SIGTERM, the run so far goes to <run>/last.pth; `--resume <run>/last.pth` continues it bit for bit (same
    weights as an uninterrupted run). Every SNAPSHOT_EVERY steps the weights are also kept as <run>/step_<N>.pth,
    a checkpoint test.py reads like final.pth."""
    settings, resume = resumed_settings(settings, given)
    device = devices.select_device(settings["DEVICE"])
    rank, world_size = devices.distributed_context(device)
    if settings["BATCH_SIZE"] % world_size:  # before the data is read
        raise UserError(f"--batch-size {settings['BATCH_SIZE']} does not split over {world_size} processes; "
                        f"use a multiple of {world_size}")
    devices.configure_speed(device, settings["DETERMINISTIC"])
    # --dataset folder: the classes its labels decide, recorded in settings.json and the checkpoint for test.py.
    settings = tasks.dataset(settings["DATASET"]).with_classes(settings)
    model, images, labels, pretrained_status, instances = prepare(settings, rank)
    if resume:
        model.load_state_dict(resume["state_dict"])
        pretrained_status = resume.get("pretrained", pretrained_status)
    trainer = framework.Trainer(model, images, labels, framework.TrainConfig.from_settings(settings), device,
                                rank, world_size, instances=instances)
    if resume:
        trainer.optimizer.load_state_dict(resume["optimizer"])
        if resume.get("scaler"):  # fp16 runs only; empty for bf16 and fp32
            trainer.scaler.load_state_dict(resume["scaler"])
        trainer.step_count = resume["step"]

    precision = devices.precision_name(device, settings["AMP"])
    # Resume points written before precisions were recorded say nothing, and get no notice.
    precisions = resume.get("precisions", []) if resume else []
    if precisions and precision not in precisions:
        say(rank, f"notice: this run was trained in {', '.join(precisions)} so far and continues in {precision} "
                  f"on this machine; --amp false continues in fp32")
    run_dir, commit = None, report.git_commit()  # the code as it is now, not after an edit during training
    if rank == 0 and resume:
        run_dir = resume["path"].parent
        say(rank, f"resuming {run_dir} at step {trainer.step_count} of {trainer.total_steps}")
    elif rank == 0:
        run_dir = framework.new_run_dir(settings["WEIGHTS_DIR"], run_name(settings))
        report.write_json(run_dir / "settings.json", framework.checkpoint_settings(settings))
    visdom = VisdomLogger(settings["VISDOM_SERVER"], settings["VISDOM_PORT"], env=run_dir.name if run_dir else "",
                          enabled=settings["VISDOM"] and rank == 0)
    say(rank, f"training {networks.MODEL_TITLES[settings['MODEL']]} on {settings['DATASET']} "
              f"({describe_input(settings, len(images))}) for {trainer.total_steps} steps of batch "
              f"{settings['BATCH_SIZE']} on " + (f"{world_size} processes, " if world_size > 1 else "")
              + devices.compute_description(device, settings["AMP"], settings["CHANNELS_LAST"]))

    log_lines = resume["log"] if resume else ["step,loss,lr"]
    earlier_seconds = resume.get("train_seconds", 0.0) if resume else 0.0
    log_every, checkpoint_every = settings["LOG_EVERY"], settings["CHECKPOINT_EVERY"]
    snapshot_every = settings["SNAPSHOT_EVERY"]
    start = devices.timed(device)
    last_saved = time.monotonic()
    progress = progress_bar(trainer.total_steps, rank, initial=trainer.step_count)
    sample_every = max(1, log_every * 10)

    def seconds_so_far():  # on a GPU, waits for the steps queued so far
        return earlier_seconds + devices.timed(device) - start

    def save_point():
        return framework.save_resume_point(run_dir / "last.pth", trainer, settings, log_lines,
                                           pretrained=pretrained_status, train_seconds=round(seconds_so_far(), 2),
                                           precision=precision,
                                           precisions=sorted(set(precisions) | {precision}))

    def save_weights(path, seconds):
        return framework.save_checkpoint(path, trainer.model, settings, step=trainer.step_count,
                                         train_seconds=round(seconds, 2), pretrained=pretrained_status,
                                         world_size=world_size, git_commit=commit,
                                         machine=devices.machine_name(device), precision=precision,
                                         precisions=sorted(set(precisions) | {precision}))

    def save_snapshot(step):
        path = run_dir / f"step_{step}.pth"
        if not path.exists():  # one written before a crash that came ahead of the next resume point holds these weights
            save_weights(path, seconds_so_far())

    with StopSignals(enabled=world_size == 1) as stop:
        for step in range(trainer.step_count + 1, trainer.total_steps + 1):
            loss = trainer.step()
            if step % log_every == 0 or step == trainer.total_steps:
                value = loss.item()  # the only host sync, once per LOG_EVERY steps
                log_lines.append(f"{step},{value:.6f},{trainer.lr:.6g}")
                progress.set_postfix(loss=f"{value:.4f}", lr=f"{trainer.lr:.2e}")
                visdom.scalar("loss", step, value)
                visdom.scalar("lr", step, trainer.lr)
            if visdom.active and (step % sample_every == 0 or step == trainer.total_steps):
                visdom.sample(*trainer.sample_prediction())
            progress.update(1)
            if rank == 0 and snapshot_every and step % snapshot_every == 0 and step < trainer.total_steps:
                save_snapshot(step)
            if stop.received is not None and step < trainer.total_steps:
                progress.close()
                visdom.close()
                path = save_point()
                print(f"stopped at step {step} of {trainer.total_steps}; saved {path}; continue with: "
                      f"python main.py --resume {path}", file=sys.stderr)
                raise SystemExit(128 + stop.received)
            if (rank == 0 and checkpoint_every and step % checkpoint_every == 0 and step < trainer.total_steps
                    and time.monotonic() - last_saved >= settings["CHECKPOINT_MIN_SECONDS"]):
                save_point()
                last_saved = time.monotonic()
    progress.close()
    seconds = seconds_so_far()
    visdom.close()

    if rank == 0:
        log_path = run_dir / "train_log.csv"
        log_path.write_text("\n".join(log_lines) + "\n")
        report.training_curve_plot(log_path, run_dir / "training_curve.png",
                                   f"{networks.MODEL_TITLES[settings['MODEL']]} on {settings['DATASET']}")
        path = save_weights(run_dir / "final.pth", seconds)
        (run_dir / "last.pth").unlink(missing_ok=True)  # final.pth holds all of it now
        print(f"saved {path} after {trainer.step_count} steps in {seconds:.1f}s; evaluate with: "
              f"python test.py --checkpoint {path}")
    return run_dir


def progress_bar(total, rank, initial=0):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=rank != 0, dynamic_ncols=True,
                file=sys.stderr)
