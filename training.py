"""One training run, as main.py (and reproduce.py, benchmark.py) runs it: data in memory, model with its
encoder weights, the Trainer's steps with a progress bar and live plots, and a new run folder holding the
checkpoint, settings.json, train_log.csv and the training curve. Nothing an earlier run wrote is replaced.
"""
import datetime
import sys

import data
import devices
import framework
import networks
import report
import tasks
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
    """The training split as uint8 tensors: resized to IMAGE_SIZE, or at native resolution for crops."""
    spec = tasks.dataset(settings["DATASET"])
    samples = tasks.load_split(settings["DATASET"], settings["DATA_ROOT"], "train",
                               tasks.SplitOptions.from_settings(settings))
    empty = [sample.name for sample in samples if spec.num_classes == 1 and not sample.label.any()]
    if empty:
        print(f"warning: {len(empty)} of {len(samples)} training labels have no foreground "
              f"({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}); check that the annotations are the "
              f"right files (a binary label counts every nonzero value as foreground)", file=sys.stderr)
    if settings["PATCH_SIZE"]:
        return data.stack_native(samples, spec.num_classes)
    return data.stack_samples(samples, settings["IMAGE_SIZE"], spec.num_classes)


def prepare(settings, rank):
    """Everything before the first step: validation, data in memory, model with its encoder weights."""
    data.check_image_size(settings["PATCH_SIZE"] or settings["IMAGE_SIZE"])
    spec = tasks.dataset(settings["DATASET"])
    if settings["MODEL"] not in networks.MODELS:
        networks.build_model(settings["MODEL"])  # raises the UserError listing valid names
    images, labels = training_tensors(settings)
    devices.seed_everything(settings["SEED"])
    model = networks.build_model(settings["MODEL"], num_classes=spec.num_classes)
    status = networks.load_encoder_weights(model, settings["PRETRAINED"])
    say(rank, status)
    return model, images, labels, status


def describe_input(settings, count):
    if settings["PATCH_SIZE"]:
        return f"{count} images, random {settings['PATCH_SIZE']}px crops at native resolution"
    return f"{count} images resized to {settings['IMAGE_SIZE']}px"


def train(settings):
    """Train with `settings` (every constant, resolved); returns the new run folder (rank 0) or None."""
    device = devices.select_device(settings["DEVICE"])
    rank, world_size = devices.distributed_context(device)
    devices.configure_speed(device)
    model, images, labels, pretrained_status = prepare(settings, rank)
    trainer = framework.Trainer(model, images, labels, framework.TrainConfig.from_settings(settings), device,
                                rank, world_size)

    run_dir, commit = None, report.git_commit()  # the code as it is now, not after an edit during training
    if rank == 0:
        run_dir = framework.new_run_dir(settings["WEIGHTS_DIR"], run_name(settings))
        report.write_json(run_dir / "settings.json", framework.checkpoint_settings(settings))
    visdom = VisdomLogger(settings["VISDOM_SERVER"], settings["VISDOM_PORT"], env=run_dir.name if run_dir else "",
                          enabled=settings["VISDOM"] and rank == 0)
    say(rank, f"training {networks.MODEL_TITLES[settings['MODEL']]} on {settings['DATASET']} "
              f"({describe_input(settings, len(images))}) for {trainer.total_steps} steps of batch "
              f"{settings['BATCH_SIZE']} on {device}" + (f" x{world_size}" if world_size > 1 else ""))

    log_lines = ["step,loss,lr"]
    log_every = settings["LOG_EVERY"]
    start = devices.timed(device)
    progress = progress_bar(trainer.total_steps, rank)
    sample_every = max(1, log_every * 10)
    for step in range(1, trainer.total_steps + 1):
        loss = trainer.step()
        if step % log_every == 0 or step == trainer.total_steps:
            value = loss.item()  # the only host sync, once per LOG_EVERY steps
            log_lines.append(f"{step},{value:.6f},{trainer.lr:.6g}")
            progress.set_postfix(loss=f"{value:.4f}", lr=f"{trainer.lr:.2e}")
            visdom.scalar("loss", step, value)
            visdom.scalar("lr", step, trainer.lr)
        if visdom.viz is not None and (step % sample_every == 0 or step == trainer.total_steps):
            visdom.sample(*trainer.sample_prediction())
        progress.update(1)
    progress.close()
    seconds = devices.timed(device) - start  # waits for the GPU, which may still be running the last steps

    if rank == 0:
        log_path = run_dir / "train_log.csv"
        log_path.write_text("\n".join(log_lines) + "\n")
        report.training_curve_plot(log_path, run_dir / "training_curve.png",
                                   f"{networks.MODEL_TITLES[settings['MODEL']]} on {settings['DATASET']}")
        path = framework.save_checkpoint(run_dir / "final.pth", trainer.model, settings, step=trainer.step_count,
                                         train_seconds=round(seconds, 2), pretrained=pretrained_status,
                                         world_size=world_size, git_commit=commit,
                                         machine=devices.machine_name(device))
        print(f"saved {path} after {trainer.step_count} steps in {seconds:.1f}s; evaluate with: "
              f"python test.py --checkpoint {path}")
    return run_dir


def progress_bar(total, rank):
    from tqdm import tqdm
    return tqdm(total=total, desc="train", unit="step", disable=rank != 0, dynamic_ncols=True, file=sys.stderr)
