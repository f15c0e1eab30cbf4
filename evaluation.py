"""Evaluating a checkpoint on its dataset's test split, as test.py (and reproduce.py, benchmark.py) does.

What the model is (architecture, classes, dataset, training size, crop training, fold) comes from the
checkpoint; how to evaluate it (device, threshold, test-time augmentation, data folder, output folder)
comes from the user's settings. Predictions are scored at each image's native resolution with the
dataset's own scoring (tasks/), and written to results/<run>/: probability maps, binary masks and
overlays as PNG, a ROC plot, metrics.json and metrics.md.
"""
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import data
import devices
import framework
import inference
import metrics
import networks
import report
import tasks
from errors import UserError

# What a checkpoint's model is and which images it belongs to: taken from the checkpoint. A flag may
# still change the evaluation size or the fold (with a notice); model and dataset must match.
MODEL_KEYS = ("MODEL", "DATASET", "IMAGE_SIZE", "PATCH_SIZE", "PATCH_SCALE", "PREPROCESS", "FOLD", "NUM_FOLDS",
              "CROP_SIZE")

# How the authors' released CE-Net was trained and tested (their main.py and test_cenet.py): whole images
# resized to 448, their preprocessing.
AUTHORS_TRAINING = {"MODEL": "cenet", "IMAGE_SIZE": 448, "PATCH_SIZE": 0, "PREPROCESS": "authors"}
MUST_MATCH = ("MODEL", "DATASET")


def settings_for(trained, settings, given, path):
    """The settings an evaluation runs with: the checkpoint's MODEL_KEYS, everything else the user's
    (DATA_ROOT too, unless the user gave none and the checkpoint's folder is there)."""
    merged = dict(settings)
    for key in MODEL_KEYS:
        if key not in trained:
            continue  # a checkpoint older than the setting: today's default
        if key in given and settings[key] != trained[key]:
            if key in MUST_MATCH:
                raise UserError(f"checkpoint {path} was trained as {key.lower()} {trained[key]!r}, but "
                                f"--{key.lower()} {settings[key]} was given; drop the flag or pick the "
                                f"matching checkpoint")
            print(f"notice: evaluating with --{key.lower().replace('_', '-')} {settings[key]}; the checkpoint "
                  f"was trained with {trained[key]}", file=sys.stderr)
            continue
        merged[key] = trained[key]
    # The data a model was trained on is the natural default for its test split, where that folder
    # exists on this machine (a released checkpoint names a folder of the machine that trained it).
    trained_root = trained.get("DATA_ROOT")
    if "DATA_ROOT" not in given and trained_root and Path(trained_root).is_dir():
        merged["DATA_ROOT"] = trained_root
    return merged


def load_model(path, settings, given):
    """(model, settings to evaluate with, checkpoint payload) for our checkpoints and bare state dicts.

    A bare state dict (no record of its training) is loaded into the model named by MODEL, for DATASET."""
    payload = framework.read_checkpoint(path)
    if payload.get("format") == framework.CHECKPOINT_FORMAT:
        merged = settings_for(payload["settings"], settings, given, path)
        state_dict, num_classes = payload["state_dict"], payload["num_classes"]
    else:
        merged = dict(settings)
        state_dict = payload.get("state_dict", payload.get("model", payload))
        num_classes = tasks.dataset(settings["DATASET"]).num_classes
        if isinstance(state_dict, dict):
            state_dict = framework.clean_state_dict(state_dict)
            if networks.is_authors_state_dict(state_dict):
                state_dict = networks.from_authors_names(state_dict)
                merged = settings_for(AUTHORS_TRAINING, settings, given, path)
                print(f"notice: {path} is a CE-Net checkpoint in the authors' format; its tensors were renamed "
                      f"to this repository's CE-Net, and it is evaluated with their preprocessing "
                      f"({merged['PREPROCESS']}) at {merged['IMAGE_SIZE']} px", file=sys.stderr)
    expected = tasks.dataset(merged["DATASET"]).num_classes
    if num_classes != expected:
        raise UserError(f"checkpoint {path} predicts {num_classes} classes but dataset "
                        f"{merged['DATASET']!r} has {expected}")
    if not isinstance(state_dict, dict):
        raise UserError(f"{path} does not hold model weights")
    model = framework.model_from_state_dict(merged["MODEL"], num_classes, state_dict, path)
    return model, merged, payload


def empty_predictions(samples, probs, threshold):
    """Names of binary-task samples whose annotation has foreground but whose prediction has none: an
    all-black mask should never pass unremarked."""
    return [sample.name for sample, prob in zip(samples, probs)
            if prob.shape[0] == 1 and sample.label.any() and not bool((prob[0] > threshold).any())]


def per_image_table(rows, summary, names):
    keys = list(summary)
    body = [[name] + [f"{row[key]:.4f}" for key in keys] for name, row in zip(names, rows)]
    body.append(["**mean ± std**"] + [f"**{summary[key]['mean']:.4f} ± {summary[key]['std']:.4f}**" for key in keys])
    return report.markdown_table(["image"] + keys, body)


def save_pictures(samples, probs, curves, out, threshold, title):
    # PNG encoding releases the GIL, so every core can compress a file while this thread draws the next.
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as pool:
        for sample, prob in zip(samples, probs):
            probability, mask, overlay = report.pictures(sample, prob.numpy(), threshold)
            pool.submit(report.save_png, probability, out / f"{sample.name}_prob.png")
            pool.submit(report.save_png, mask, out / f"{sample.name}_mask.png")
            pool.submit(report.save_png, overlay, out / f"{sample.name}_overlay.png")
        if curves:
            report.roc_plot(curves, out / "roc.png", title)


def check_protocol(settings, spec):
    """--protocol authors needs a dataset whose authors' protocol is known and a model that predicts resized
    images (theirs binarises at the network's size)."""
    if settings["PROTOCOL"] != "authors":
        return
    if spec.authors_score is None:
        raise UserError(f"--protocol authors is defined for DRIVE only (the authors' test_cenet.py); "
                        f"use --protocol ours for {settings['DATASET']!r}")
    if settings["PATCH_SIZE"]:
        raise UserError("--protocol authors thresholds at the network's input size, but this checkpoint was "
                        "trained on crops and predicts at native resolution; use --protocol ours")


def input_description(settings):
    if not settings["PATCH_SIZE"]:
        return f"resized to {settings['IMAGE_SIZE']}x{settings['IMAGE_SIZE']}, probabilities resized back"
    if settings["PATCH_SCALE"] == 1:
        return "whole image at native resolution, zero-padded to a multiple of 32"
    return (f"whole image resized by {settings['PATCH_SCALE']:g}, zero-padded to a multiple of 32, "
            f"probabilities resized back to native resolution")


def evaluate(checkpoint, settings, given=frozenset(), out_dir=None):
    """Predict, score and save; returns (summary dict, output folder, seconds after the model is loaded)."""
    model, settings, payload = load_model(checkpoint, settings, given)
    data.check_image_size(settings["PATCH_SIZE"] or settings["IMAGE_SIZE"])
    device = devices.select_device(settings["DEVICE"])
    devices.configure_speed(device, settings["DETERMINISTIC"])
    fmt = devices.inference_memory_format(device, settings["CHANNELS_LAST"])
    model = model.to(device, memory_format=fmt)
    spec = tasks.dataset(settings["DATASET"])
    check_protocol(settings, spec)
    samples = tasks.load_split(settings["DATASET"], settings["DATA_ROOT"], "test",
                               tasks.SplitOptions.from_settings(settings))
    out = Path(out_dir) if out_dir else Path(settings["RESULTS_DIR"]) / Path(checkpoint).parent.name
    out = framework.new_run_dir(out.parent, out.name)  # only now: a bad input leaves no empty folder

    print(f"predicting {len(samples)} test images on "
          f"{devices.compute_description(device, settings['AMP'], settings['CHANNELS_LAST'], training=False)}",
          file=sys.stderr)
    start = devices.timed(device)
    as_authors = settings["PROTOCOL"] == "authors"
    probs = inference.predict_samples(model, samples, device, image_size=settings["IMAGE_SIZE"],
                                      patch_size=settings["PATCH_SIZE"], tta=settings["TTA"], amp=settings["AMP"],
                                      fmt=fmt, preprocess=settings["PREPROCESS"],
                                      patch_scale=settings["PATCH_SCALE"], restore_size=not as_authors, progress=True)
    rows, curves = [], {}
    for index, (sample, prob) in enumerate(zip(samples, probs)):
        if as_authors:
            row, probs[index] = spec.authors_score(prob, sample, settings["THRESHOLD"])
        else:
            row, curve = spec.score(prob, sample, settings["THRESHOLD"])
            if curve is not None:
                curves[sample.name] = curve
        rows.append(row)
    predict_seconds = devices.timed(device) - start
    empty = empty_predictions(samples, probs, settings["THRESHOLD"])
    if empty:
        print(f"warning: {len(empty)} of {len(samples)} predicted masks have no foreground at threshold "
              f"{settings['THRESHOLD']} ({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}); the model is "
              f"probably undertrained: train longer or check the learning rate", file=sys.stderr)

    unlabelled = [sample.name for sample in samples if spec.num_classes == 1 and not sample.label.any()]
    if unlabelled:
        print(f"warning: the test labels of {', '.join(unlabelled)} have no foreground, so their AUC, Sen and F1 "
              f"are undefined: null in metrics.json and left out of the means", file=sys.stderr)

    names = [sample.name for sample in samples]
    save_pictures(samples, probs, curves, out, settings["THRESHOLD"],
                  f"{settings['MODEL']} on {settings['DATASET']} test (inside FOV)")
    summary = metrics.summarize(rows)
    total_seconds = devices.timed(device) - start
    protocol = {
        "checkpoint": str(checkpoint), "model": settings["MODEL"], "dataset": settings["DATASET"],
        "image_size": None if settings["PATCH_SIZE"] else settings["IMAGE_SIZE"],
        "input": input_description(settings),
        "preprocess": settings["PREPROCESS"], "tta": settings["TTA"], "threshold": settings["THRESHOLD"],
        "amp": devices.amp_dtype(device, settings["AMP"]) is not None,
        "precision": devices.precision_name(device, settings["AMP"]), "device": str(device),
        "machine": devices.machine_name(device),
        "pretrained": payload.get("pretrained", "unknown"), "train_steps": payload.get("step"),
        "scoring": settings["PROTOCOL"],
        "evaluation": spec.authors_notes if as_authors else spec.notes, "empty_predictions": empty, "labels_without_foreground": unlabelled,
    }
    report.write_json(out / "metrics.json", {
        "protocol": protocol, "summary": summary, "per_image": dict(zip(names, rows)),
        "seconds": {"predict_and_score": round(predict_seconds, 3), "total_after_load": round(total_seconds, 3)},
    })
    report.write_text(out / "metrics.md", f"# {settings['MODEL']} on {settings['DATASET']} test\n\n"
                                          f"{protocol['evaluation']}\n\n{per_image_table(rows, summary, names)}")
    return summary, out, total_seconds
