"""Average the weights of several checkpoints of one run into one checkpoint (stochastic weight averaging).

    python main.py ... --snapshot-every 220               # keeps weights/RUN/step_220.pth, step_440.pth, ...
    python average.py weights/RUN/step_1320.pth weights/RUN/step_1540.pth weights/RUN/final.pth \\
        --out weights/RUN/average_1320-1760.pth
    python test.py --checkpoint weights/RUN/average_1320-1760.pth

Snapshots taken while the learning rate is still high scatter around a good region of the weights; their mean
often lies nearer its centre than any one of them (Izmailov et al., 2018). The mean weights no longer match the
BatchNorm statistics any snapshot recorded, so these are measured again on the run's training images (labels
unused), each whole at the scale the model predicts at; --bn keep leaves the mean of the recorded statistics.
The new checkpoint carries the newest snapshot's record plus the list it was averaged from, and reads in
test.py and predict.py like a final.pth. It never replaces a file.
"""
import argparse
import sys
from pathlib import Path

import cli
import constants
import devices
import framework
import inference
import tasks
from errors import UserError

# Settings that may differ between checkpoints averaged together: how a run was watched, saved and scored.
IGNORED_DIFFERENCES = ("RUN_NAME", "EPOCHS", "RESUME", "DEVICE", "DATA_ROOT", "WEIGHTS_DIR", "RESULTS_DIR",
                       "VISDOM", "VISDOM_SERVER", "VISDOM_PORT", "LOG_EVERY", "CHECKPOINT_EVERY",
                       "CHECKPOINT_MIN_SECONDS", "SNAPSHOT_EVERY", "TTA", "THRESHOLD")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="two or more step_<N>.pth / final.pth of one architecture")
    parser.add_argument("--out", required=True, help="the averaged checkpoint to write (never replaced)")
    parser.add_argument("--bn", choices=("train", "keep"), default="train",
                        help="train: measure BatchNorm statistics again on the training images (default); "
                             "keep: the mean of the checkpoints' own")
    parser.add_argument("--data-root", default=None, help="the training data (default: the folder the run used)")
    parser.add_argument("--device", default=constants.DEVICE, help=f"default: {constants.DEVICE!r}")
    return parser.parse_args(argv)


def read_snapshots(paths):
    """The checkpoints' payloads, checked to be main.py checkpoints of one model, dataset and class count."""
    if len(paths) < 2:
        raise UserError("give at least two checkpoints to average")
    if len({Path(path).resolve() for path in paths}) < len(paths):
        raise UserError("the same checkpoint is named twice; each should count once in the average")
    payloads = []
    for path in paths:
        payload = framework.read_checkpoint(path)
        if payload.get("format") == framework.RESUME_FORMAT:
            raise UserError(f"{path} is a resume point; average the step_<N>.pth snapshots and final.pth instead")
        if payload.get("format") != framework.CHECKPOINT_FORMAT:
            raise UserError(f"{path} is not a checkpoint written by main.py")
        payloads.append(payload)
    first = payloads[0]
    for path, payload in zip(paths[1:], payloads[1:]):
        for key in ("model", "dataset", "num_classes"):
            if payload.get(key) != first.get(key):
                raise UserError(f"{path} has {key} {payload.get(key)!r} but {paths[0]} has {first.get(key)!r}; "
                                f"only checkpoints of one model, dataset and class count can be averaged")
    return payloads


def training_differences(payloads):
    """Settings (beyond IGNORED_DIFFERENCES) on which the checkpoints' runs differ: those of one run differ in none.
    A setting one checkpoint does not record (it is older than the setting) counts as today's default."""
    recorded = [{**cli.default_settings(), **payload["settings"]} for payload in payloads]
    keys = set().union(*recorded) - set(IGNORED_DIFFERENCES)
    return sorted(key for key in keys if len({repr(settings.get(key)) for settings in recorded}) > 1)


def settings_of(payload, data_root, device):
    settings = cli.default_settings()
    settings.update(payload["settings"], DEVICE=device)
    if data_root:
        settings["DATA_ROOT"] = data_root
    return settings


def remeasure_batchnorm(model, settings):
    """inference.adapt_batchnorm on the run's training images; returns (layers changed, images used)."""
    samples = tasks.load_split(settings["DATASET"], settings["DATA_ROOT"], "train",
                               tasks.SplitOptions.from_settings(settings))
    device = devices.select_device(settings["DEVICE"])
    fmt = devices.inference_memory_format(device, settings["CHANNELS_LAST"])
    model.to(device, memory_format=fmt)
    crops = bool(settings["PATCH_SIZE"])
    print(f"measuring BatchNorm statistics on {len(samples)} training images, each once through the network, on "
          f"{devices.compute_description(device, settings['AMP'], settings['CHANNELS_LAST'], training=False)}",
          file=sys.stderr)
    layers = inference.adapt_batchnorm(model, samples, device, amp=settings["AMP"], fmt=fmt,
                                       preprocess=settings["PREPROCESS"],
                                       scales=[settings["PATCH_SCALE"]] * len(samples) if crops else None,
                                       image_size=None if crops else settings["IMAGE_SIZE"])
    model.to("cpu")
    return layers, len(samples)


def main(argv=None):
    args = parse_args(argv)
    if Path(args.out).exists():  # before the minutes the BatchNorm statistics take
        raise UserError(f"{args.out} already exists; refusing to overwrite it (choose another --out)")
    payloads = read_snapshots(args.checkpoints)
    differing = training_differences(payloads)
    if differing:
        print(f"notice: these checkpoints were trained with different {', '.join(differing)}; "
              f"averaging them anyway", file=sys.stderr)
    order = sorted(range(len(payloads)), key=lambda index: payloads[index].get("step") or 0)
    newest = payloads[order[-1]]
    averaged = framework.average_state_dicts([framework.clean_state_dict(payloads[index]["state_dict"])
                                              for index in order], [args.checkpoints[index] for index in order])
    model = framework.model_from_state_dict(newest["model"], newest["num_classes"], averaged, args.checkpoints[0])
    settings = settings_of(newest, args.data_root, args.device)
    batchnorm = "the mean of the averaged checkpoints' own statistics"
    if args.bn == "train":
        layers, count = remeasure_batchnorm(model, settings)
        if layers:
            batchnorm = f"measured again on {count} {settings['DATASET']} training images (labels unused)"
            print(f"BatchNorm statistics of {layers} layers {batchnorm}", file=sys.stderr)
    record = {key: value for key, value in newest.items()
              if key not in ("format", "model", "dataset", "num_classes", "image_size", "settings", "state_dict")}
    record["averaged_from"] = [{"checkpoint": str(args.checkpoints[index]), "step": payloads[index].get("step")}
                               for index in order]
    record["batchnorm"] = batchnorm
    saved_settings = dict(newest["settings"], **({"DATA_ROOT": args.data_root} if args.data_root else {}))
    path = framework.save_checkpoint(args.out, model, saved_settings, **record)
    steps = ", ".join(str(entry["step"]) for entry in record["averaged_from"])
    print(f"wrote {path}: the mean of {len(payloads)} checkpoints (steps {steps}); evaluate with: "
          f"python test.py --checkpoint {path}")


if __name__ == "__main__":
    cli.run(main)
