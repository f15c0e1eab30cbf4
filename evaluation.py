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

import torch

import data
import devices
import fov
import framework
import inference
import metrics
import report
import tasks
from errors import UserError

# What a checkpoint's model is and which images it belongs to: taken from the checkpoint. A flag may
# still change the evaluation size or the fold (with a notice); the model must match, and so must the dataset
# unless both are of one family (compatible_datasets: a DRIVE model scored on CHASE_DB1, no retraining).
MODEL_KEYS = ("MODEL", "DATASET", "IMAGE_SIZE", "PATCH_SIZE", "PATCH_SCALE", "PREPROCESS", "FOLD", "NUM_FOLDS",
              "CROP_SIZE", "CLASS_VALUES", "LABEL_THRESHOLD")

# How the authors' released CE-Net was trained and tested (their main.py and test_cenet.py): whole images
# resized to 448, their preprocessing.
AUTHORS_TRAINING = {"MODEL": "cenet", "IMAGE_SIZE": 448, "PATCH_SIZE": 0, "PREPROCESS": "authors"}
MUST_MATCH = ("MODEL", "DATASET")


def compatible_datasets(trained, wanted):
    """Whether a model trained on dataset `trained` may be scored on `wanted` without retraining: both of one
    declared family (Dataset.family, e.g. "fundus vessels") and with the same output classes."""
    first, second = tasks.dataset(trained), tasks.dataset(wanted)
    return bool(first.family) and first.family == second.family and first.num_classes == second.num_classes


def dataset_kind(name):
    spec = tasks.dataset(name)
    return f"{name}: {spec.family or 'no family'}, {spec.num_classes} output channel{'s' * (spec.num_classes > 1)}"


def check_dataset(trained, wanted, path):
    """A cross-dataset evaluation is allowed, with a notice, between compatible datasets; refused otherwise."""
    if not compatible_datasets(trained, wanted):
        raise UserError(f"checkpoint {path} was trained as dataset {trained!r}, but --dataset {wanted} was given; "
                        f"a model is scored on another dataset only when both are of one family with the same "
                        f"classes ({dataset_kind(trained)}; {dataset_kind(wanted)}); drop the flag or pick a "
                        f"matching checkpoint")
    print(f"notice: cross-dataset evaluation: a model trained on {trained} scored on {wanted} without retraining "
          f"(both {tasks.dataset(trained).family}); images from another camera may need --eval-scale field "
          f"(matches FOV diameters and the cameras' field angles) or auto (FOV diameters only): docs/datasets.md",
          file=sys.stderr)


def settings_for(trained, settings, given, path):
    """The settings an evaluation runs with: the checkpoint's MODEL_KEYS, everything else the user's
    (DATA_ROOT too, unless the user gave none and the checkpoint's folder, of the same dataset, is there)."""
    merged = dict(settings)
    for key in MODEL_KEYS:
        if key not in trained:
            continue  # a checkpoint older than the setting: today's default
        if key in given and settings[key] != trained[key]:
            if key == "DATASET":
                check_dataset(trained[key], settings[key], path)
                continue
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
    same_dataset = merged.get("DATASET") == trained.get("DATASET", merged.get("DATASET"))
    if "DATA_ROOT" not in given and trained_root and same_dataset and Path(trained_root).is_dir():
        merged["DATA_ROOT"] = trained_root
    return merged


def load_model(path, settings, given):
    """(model, settings to evaluate with, checkpoint payload) for our checkpoints and bare state dicts.

    A bare state dict (no record of its training) is loaded into the model named by MODEL, for DATASET."""
    payload = framework.read_checkpoint(path)
    if payload.get("format") in (framework.CHECKPOINT_FORMAT, framework.RESUME_FORMAT):
        merged = settings_for(payload["settings"], settings, given, path)
        state_dict, _ = framework.weights_in(payload, path)
        num_classes = payload.get("num_classes")  # a resume point (a stopped run's last.pth) has none: its dataset's
        if payload["format"] == framework.RESUME_FORMAT:
            print(f"notice: {path} is a resume point; evaluating the weights of step {payload.get('step')}, "
                  f"before the run's last step", file=sys.stderr)
    else:
        merged = dict(settings)
        num_classes = None  # a bare state dict predicts its dataset's classes (below)
        state_dict, authors = framework.weights_in(payload, path)
        if authors:
            merged = settings_for(AUTHORS_TRAINING, settings, given, path)
            print(f"notice: {path} is a CE-Net checkpoint in the authors' format; its tensors were renamed "
                  f"to this repository's CE-Net, and it is evaluated with their preprocessing "
                  f"({merged['PREPROCESS']}) at {merged['IMAGE_SIZE']} px", file=sys.stderr)
    spec = tasks.dataset(merged["DATASET"])
    merged = spec.with_classes(merged)  # --dataset folder: the classes the checkpoint recorded, or its labels'
    expected = spec.outputs(merged)
    num_classes = expected if num_classes is None else num_classes
    if num_classes != expected:
        raise UserError(f"checkpoint {path} predicts {num_classes} classes but dataset "
                        f"{merged['DATASET']!r} has {expected}")
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


def save_pictures(samples, probs, curves, out, threshold, title, extra_pictures=None, options=None):
    # PNG encoding releases the GIL, so every core can compress a file while this thread draws the next.
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as pool:
        for sample, prob in zip(samples, probs):
            probability, mask, overlay = report.pictures(sample, prob.numpy(), threshold)
            pool.submit(report.save_png, probability, out / f"{sample.name}_prob.png")
            pool.submit(report.save_png, mask, out / f"{sample.name}_mask.png")
            pool.submit(report.save_png, overlay, out / f"{sample.name}_overlay.png")
            extras = extra_pictures(prob, sample, threshold, **(options or {})) if extra_pictures else {}
            for key, picture in extras.items():
                pool.submit(report.save_png, picture, out / f"{sample.name}_{key}.png")
        if curves:
            report.roc_plot(curves, out / "roc.png", title)


def score_options(settings, spec):
    """The keyword arguments of the dataset's score() beyond the threshold (Dataset.score_settings, e.g.
    isbi2012's POSTPROCESS), from `settings`; a post-processing the dataset's scoring does not read is one
    clear error."""
    if settings.get("POSTPROCESS", "none") != "none" and "POSTPROCESS" not in spec.score_settings:
        readers = [name for name, entry in tasks.DATASETS.items() if "POSTPROCESS" in entry.score_settings]
        raise UserError(f"--postprocess {settings['POSTPROCESS']} applies to the scoring of {', '.join(readers)} "
                        f"only, not {settings['DATASET']!r}; drop the flag")
    if "POSTPROCESS" in spec.score_settings and settings["POSTPROCESS"] not in spec.postprocessings:
        raise UserError(f"--postprocess {settings['POSTPROCESS']} is not one for {settings['DATASET']!r}; choose "
                        f"{' or '.join(spec.postprocessings)}")
    return {name.lower(): settings[name] for name in spec.score_settings}


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


def input_description(settings, scales=None):
    if not settings["PATCH_SIZE"]:
        return f"resized to {settings['IMAGE_SIZE']}x{settings['IMAGE_SIZE']}, probabilities resized back"
    if scales and len(set(scales)) > 1:
        return (f"whole image resized by {min(scales):.3f} to {max(scales):.3f} (--eval-scale "
                f"{settings.get('EVAL_SCALE', '1')}: per image, see 'scales'), zero-padded to a multiple of 32, "
                f"probabilities resized back to native resolution")
    scale = scales[0] if scales else settings["PATCH_SCALE"]
    if scale == 1:
        return "whole image at native resolution, zero-padded to a multiple of 32"
    return (f"whole image resized by {scale:g}, zero-padded to a multiple of 32, "
            f"probabilities resized back to native resolution")


def fov_of(sample):
    """The sample's field of view: its dataset's mask (or CHASE_DB1's estimate), else estimated here."""
    return sample.fov if sample.fov is not None else fov.estimate_fov(sample.image)


def field_angle_ratio(evaluated, trained):
    """Field angle of the evaluated dataset's camera over the training dataset's: CHASE_DB1 (30 degrees) for
    a DRIVE model (45) gives 2/3, since the same FOV diameter then holds a smaller piece of retina, magnified."""
    angles = {name: tasks.dataset(name).field_degrees for name in (evaluated, trained)}
    unknown = [name for name, angle in angles.items() if angle is None]
    if unknown:
        known = [name for name in tasks.fundus_datasets() if tasks.dataset(name).field_degrees]
        raise UserError(f"--eval-scale field needs the camera's field angle, which is recorded for "
                        f"{', '.join(known)} only, not {' or '.join(map(repr, unknown))}; use --eval-scale auto "
                        f"(FOV diameter only) or a number")
    return angles[evaluated] / angles[trained]


def evaluation_scales(samples, settings, trained_dataset):
    """The PATCH_SCALE each sample is predicted at: the checkpoint's, times EVAL_SCALE ("auto": per image, the
    factor that gives its FOV the training dataset's fov_diameter; "field": that factor times the ratio of the
    two cameras' field angles, so a degree of retina spans as many pixels as in training). None for a model
    that resizes every image to IMAGE_SIZE, where a scale would change nothing (ignored with a notice)."""
    choice = settings.get("EVAL_SCALE", "1")
    if not settings["PATCH_SIZE"]:
        if choice not in fov.FOV_SCALE_RULES and float(choice) == 1:
            return None
        print(f"notice: --eval-scale {choice} ignored: this model resizes every image to {settings['IMAGE_SIZE']} "
              f"px (PATCH_SIZE 0), whatever its size", file=sys.stderr)
        return None
    if choice in fov.FOV_SCALE_RULES:
        reference = tasks.dataset(trained_dataset).fov_diameter
        if reference is None:
            raise UserError(f"--eval-scale {choice} matches each image's field of view to the training set's, which "
                            f"is known for {', '.join(tasks.fundus_datasets())} only, not {trained_dataset!r}; use "
                            f"--eval-scale 1 or a number")
        angles = field_angle_ratio(settings["DATASET"], trained_dataset) if choice == "field" else 1.0
        factors = [fov.scale_to_match(fov_of(sample), reference) * angles for sample in samples]
    else:
        factors = [float(choice)] * len(samples)
    # Rounded, so that images of equal FOV diameter get equal scales and share a batch.
    scales = [round(settings["PATCH_SCALE"] * factor, 4) for factor in factors]
    for sample, scale in zip(samples, scales):
        if not 0.25 <= scale <= 4:
            raise UserError(f"--eval-scale {choice} would resize image {sample.name} by {scale:g} (with PATCH_SCALE "
                            f"{settings['PATCH_SCALE']:g}), outside [0.25, 4]; use --eval-scale 1 or a nearer number")
    return scales


def adapt_batchnorm(model, settings, device, fmt, trained_dataset, scored, scored_scales):
    """ADAPT_BN: the BatchNorm statistics measured again (inference.adapt_batchnorm) on the scored dataset's
    training images ("train": none of their labels is read for it) or on the scored images themselves ("scored"),
    each at the scale it would be predicted at. Returns the names of the images used (None: not adapted)."""
    choice = settings.get("ADAPT_BN", "none")
    if choice == "none":
        return None
    if choice == "scored":
        samples, scales = scored, scored_scales
    else:
        samples = tasks.load_split(settings["DATASET"], settings["DATA_ROOT"], "train",
                                   tasks.SplitOptions.from_settings(settings))
        scales = evaluation_scales(samples, settings, trained_dataset)
    layers = inference.adapt_batchnorm(model, samples, device, amp=settings["AMP"], fmt=fmt,
                                       preprocess=settings["PREPROCESS"], scales=scales,
                                       image_size=None if settings["PATCH_SIZE"] else settings["IMAGE_SIZE"])
    if not layers:
        raise UserError(f"--adapt-bn {choice}: the {settings['MODEL']} model has no BatchNorm layer whose "
                        f"statistics could be measured again; use --adapt-bn none")
    print(f"BatchNorm statistics of {layers} layers re-estimated on {len(samples)} {settings['DATASET']} "
          f"{'training' if choice == 'train' else 'scored'} images (labels unused)", file=sys.stderr)
    return [sample.name for sample in samples]


def predict_at_scales(model, samples, device, settings, fmt, scales, restore_size):
    """inference.predict_samples with one PATCH_SCALE per sample (`scales`, None: the checkpoint's):
    the samples that share a scale go through together, and come back in their own order."""
    options = dict(image_size=settings["IMAGE_SIZE"], patch_size=settings["PATCH_SIZE"], tta=settings["TTA"],
                   amp=settings["AMP"], fmt=fmt, preprocess=settings["PREPROCESS"], restore_size=restore_size)
    if scales is None or len(set(scales)) == 1:
        scale = settings["PATCH_SCALE"] if scales is None else scales[0]
        return inference.predict_samples(model, samples, device, patch_scale=scale, progress=True, **options)
    probs = [None] * len(samples)
    for scale in sorted(set(scales)):
        indices = [index for index, own in enumerate(scales) if own == scale]
        group = inference.predict_samples(model, [samples[index] for index in indices], device, patch_scale=scale,
                                          **options)
        for index, prob in zip(indices, group):
            probs[index] = prob
    return probs


# Thresholds at which the dataset's F1 is scanned for the best one: 0.01 steps, plus the one in use.
THRESHOLD_GRID = [step / 100 for step in range(1, 100)]


def threshold_scan(spec, samples, probs, threshold):
    """Where the dataset's F1 (Dataset.f1_by_threshold), averaged over these images as the summary averages
    it, is highest among THRESHOLD_GRID and `threshold`: {"metric", "best_threshold", "best", "threshold",
    "at_threshold"}; None for a dataset without such an F1 or a multi-class model."""
    if spec.f1_by_threshold is None or probs[0].shape[0] != 1:
        return None
    grid = sorted(set(THRESHOLD_GRID) | {threshold})
    per_image = []
    for sample, prob in zip(samples, probs):
        key, values = spec.f1_by_threshold(prob, sample, grid)
        per_image.append(values)
    means = torch.nanmean(torch.stack(per_image), dim=0)
    if bool(means.isnan().all()):
        return None
    best = int(torch.nan_to_num(means, nan=-1.0).argmax())
    return {"metric": key, "best_threshold": grid[best], "best": float(means[best]), "threshold": threshold,
            "at_threshold": float(means[grid.index(threshold)])}


def threshold_advice(scan, count, split):
    """One line on the best threshold: to use, when found on training images; a caution, when found on test ones."""
    found = (f"{scan['metric']} over these {count} {split} images is highest at threshold {scan['best_threshold']:g} "
             f"({scan['best']:.4f}; {scan['at_threshold']:.4f} at {scan['threshold']:g})")
    if split == "train":
        return f"{found}: pass --threshold {scan['best_threshold']:g} to score test images with it"
    return (f"{found}; a threshold chosen on the images it scores flatters them: choose it on training images "
            f"(--split train)")


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
    options = score_options(settings, spec)
    split = settings.get("SPLIT", "test")
    samples = tasks.load_split(settings["DATASET"], settings["DATA_ROOT"], split,
                               tasks.SplitOptions.from_settings(settings))
    trained_dataset = payload.get("dataset", settings["DATASET"]) \
        if payload.get("format") == framework.CHECKPOINT_FORMAT else settings["DATASET"]
    scales = evaluation_scales(samples, settings, trained_dataset)
    adapted_on = adapt_batchnorm(model, settings, device, fmt, trained_dataset, samples, scales)
    out = Path(out_dir) if out_dir else Path(settings["RESULTS_DIR"]) / Path(checkpoint).parent.name
    out = framework.new_run_dir(out.parent, out.name)  # only now: a bad input leaves no empty folder

    print(f"predicting {len(samples)} {split} images on "
          f"{devices.compute_description(device, settings['AMP'], settings['CHANNELS_LAST'], training=False)}",
          file=sys.stderr)
    start = devices.timed(device)
    as_authors = settings["PROTOCOL"] == "authors"
    probs = predict_at_scales(model, samples, device, settings, fmt, scales, restore_size=not as_authors)
    rows, curves = [], {}
    for index, (sample, prob) in enumerate(zip(samples, probs)):
        if as_authors:
            row, probs[index] = spec.authors_score(prob, sample, settings["THRESHOLD"])
        else:
            row, curve = spec.score(prob, sample, settings["THRESHOLD"], **options)
            if curve is not None:
                curves[sample.name] = curve
        rows.append(row)
    predict_seconds = devices.timed(device) - start
    empty = empty_predictions(samples, probs, settings["THRESHOLD"])
    if empty:
        print(f"warning: {len(empty)} of {len(samples)} predicted masks have no foreground at threshold "
              f"{settings['THRESHOLD']} ({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}); the model is "
              f"probably undertrained: train longer or check the learning rate", file=sys.stderr)

    unlabelled = [sample.name for sample in samples if spec.outputs(settings) == 1 and not sample.label.any()]
    if unlabelled:
        print(f"warning: the test labels of {', '.join(unlabelled)} have no foreground, so their AUC, Sen and F1 "
              f"are undefined: null in metrics.json and left out of the means", file=sys.stderr)

    scan = None if as_authors else threshold_scan(spec, samples, probs, settings["THRESHOLD"])
    if scan:
        print(threshold_advice(scan, len(samples), split), file=sys.stderr)

    names = [sample.name for sample in samples]
    save_pictures(samples, probs, curves, out, settings["THRESHOLD"],
                  f"{settings['MODEL']} on {settings['DATASET']} {split} (inside FOV)",
                  None if as_authors else spec.extra_pictures, options)
    summary = metrics.summarize(rows)
    total_seconds = devices.timed(device) - start
    protocol = {
        "checkpoint": str(checkpoint), "model": settings["MODEL"], "dataset": settings["DATASET"],
        "trained_on": trained_dataset, "split": split, "data_root": str(settings["DATA_ROOT"]),
        "image_size": None if settings["PATCH_SIZE"] else settings["IMAGE_SIZE"],
        "input": input_description(settings, scales),
        "eval_scale": settings.get("EVAL_SCALE", "1"),
        "scales": None if scales is None else dict(zip((sample.name for sample in samples), scales)),
        "adapt_bn": settings.get("ADAPT_BN", "none"), "adapt_bn_images": adapted_on,
        "preprocess": settings["PREPROCESS"], "tta": settings["TTA"], "threshold": settings["THRESHOLD"],
        "amp": devices.amp_dtype(device, settings["AMP"]) is not None,
        "precision": devices.precision_name(device, settings["AMP"]), "device": str(device),
        "machine": devices.machine_name(device),
        "pretrained": payload.get("pretrained", "unknown"), "train_steps": payload.get("step"),
        "scoring": settings["PROTOCOL"], **({} if as_authors else options),
        "evaluation": spec.authors_notes if as_authors else spec.notes, "empty_predictions": empty, "labels_without_foreground": unlabelled,
    }
    report.write_json(out / "metrics.json", {
        "protocol": protocol, "summary": summary, "per_image": dict(zip(names, rows)), "threshold_scan": scan,
        "seconds": {"predict_and_score": round(predict_seconds, 3), "total_after_load": round(total_seconds, 3)},
    })
    report.write_text(out / "metrics.md", f"# {settings['MODEL']} on {settings['DATASET']} {split}\n\n"
                                          f"{protocol['evaluation']}\n\n"
                                          + (f"BatchNorm statistics re-estimated before prediction (--adapt-bn "
                                             f"{protocol['adapt_bn']}) on {len(adapted_on)} images, labels "
                                             f"unused.\n\n" if adapted_on else "")
                                          + "".join(f"{name.replace('_', ' ').capitalize()}: {value}\n\n"
                                                    for name, value in options.items() if not as_authors)
                                          + (threshold_advice(scan, len(samples), split) + ".\n\n" if scan else "")
                                          + per_image_table(rows, summary, names))
    return summary, out, total_seconds
