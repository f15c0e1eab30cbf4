"""Train CE-Net (or a baseline) with the paper's recipe.

    python main.py                                  # constants.py as it is
    python main.py --data-root ../DRIVE --epochs 300
    torchrun --nproc_per_node=4 main.py ...         # several GPUs, same checkpoint format

Writes weights/<run>/final.pth (plus settings.json and train_log.csv) and never replaces an earlier run.
"""
import argparse
import datetime
import sys

import cli
import data
import framework
import networks


def parse_settings(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_constant_flags(parser)
    return cli.settings_from(parser.parse_args(argv))


def run_name(settings):
    if settings["RUN_NAME"]:
        return settings["RUN_NAME"]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{settings['DATASET']}_{settings['MODEL']}_{stamp}"


def say(rank, message):
    if rank == 0:
        print(message, file=sys.stderr)


def prepare(settings, rank):
    """Everything before the first step: validation, data in memory, model with its encoder weights."""
    patch = settings["PATCH_SIZE"]
    data.check_image_size(patch or settings["IMAGE_SIZE"])
    spec = data.dataset_spec(settings["DATASET"])
    if settings["MODEL"] not in networks.MODELS:
        networks.build_model(settings["MODEL"])  # raises the UserError listing valid names
    samples = data.load_split(settings, "train")
    if patch:
        images, labels = data.stack_native(samples, spec.num_classes)
    else:
        images, labels = data.stack_samples(samples, settings["IMAGE_SIZE"], spec.num_classes)
    framework.seed_everything(settings["SEED"])
    model = networks.build_model(settings["MODEL"], num_classes=spec.num_classes)
    status = networks.load_encoder_weights(model, settings["PRETRAINED"])
    say(rank, status)
    return model, images, labels, status


def train(settings):
    device = framework.select_device(settings["DEVICE"])
    rank, world_size = framework.distributed_context(device)
    framework.configure_speed(device, settings)
    model, images, labels, pretrained_status = prepare(settings, rank)
    trainer = framework.Trainer(model, images, labels, settings, device, rank, world_size)

    run_dir = None
    if rank == 0:
        run_dir = framework.new_run_dir(settings["WEIGHTS_DIR"], run_name(settings))
        framework.write_json(run_dir / "settings.json", framework.checkpoint_settings(settings))
    visdom = framework.VisdomLogger(settings["VISDOM_SERVER"], settings["VISDOM_PORT"],
                                    env=run_dir.name if run_dir else "", enabled=settings["VISDOM"] and rank == 0)
    say(rank, f"training {networks.MODEL_TITLES[settings['MODEL']]} on {settings['DATASET']} ({len(images)} images, "
              + (f"random {settings['PATCH_SIZE']}px crops at native resolution" if settings["PATCH_SIZE"]
                 else f"resized to {settings['IMAGE_SIZE']}px") + ")"
              + f" for {trainer.total_steps} steps of batch {settings['BATCH_SIZE']} "
              f"on {device}" + (f" x{world_size}" if world_size > 1 else ""))

    log_lines = ["step,loss,lr"]
    start = framework.timed()
    progress = progress_bar(trainer.total_steps, rank)
    sample_every = max(1, settings["LOG_EVERY"] * 10)
    for step in range(1, trainer.total_steps + 1):
        loss = trainer.step()
        if step % settings["LOG_EVERY"] == 0 or step == trainer.total_steps:
            value = loss.item()  # the only host sync, once per LOG_EVERY steps
            log_lines.append(f"{step},{value:.6f},{trainer.lr:.6g}")
            progress.set_postfix(loss=f"{value:.4f}", lr=f"{trainer.lr:.2e}")
            visdom.scalar("loss", step, value)
            visdom.scalar("lr", step, trainer.lr)
        if visdom.viz is not None and (step % sample_every == 0 or step == trainer.total_steps):
            visdom.sample(*trainer.sample_prediction())
        progress.update(1)
    progress.close()
    seconds = framework.timed() - start  # waits for the GPU, which may still be running the last steps

    if rank == 0:
        (run_dir / "train_log.csv").write_text("\n".join(log_lines) + "\n")
        path = framework.save_checkpoint(run_dir / "final.pth", trainer.model, settings, step=trainer.step_count,
                                         train_seconds=round(seconds, 2), pretrained=pretrained_status,
                                         world_size=world_size)
        print(f"saved {path} after {trainer.step_count} steps in {seconds:.1f}s; evaluate with: "
              f"python test.py --checkpoint {path}")
    return run_dir


def progress_bar(total, rank):
    from tqdm import tqdm
    return tqdm(total=total, desc="train", unit="step", disable=rank != 0, dynamic_ncols=True, file=sys.stderr)


def main(argv=None):
    settings = parse_settings(argv)
    try:
        train(settings)
        framework.close_distributed()
    finally:
        framework.close_distributed(finished=False)  # a no-op when the run already closed it


if __name__ == "__main__":
    cli.run(main)
