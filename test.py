"""Evaluate a checkpoint on its dataset's test split, the paper's way.

    python test.py                                   # newest weights/*/final.pth
    python test.py --checkpoint weights/RUN/final.pth --data-root ../DRIVE

Predicts every test image with 8-way flip test-time augmentation, maps the probabilities back to the
original resolution, scores them with the task's metrics (DRIVE: AUC, Acc, Sen, Spe, F1 over the
whole image and inside the field-of-view mask) and writes to results/<run>/: probability maps, binary
masks and overlays as PNG, a ROC plot, metrics.json and metrics.md.
"""
import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import cli
import data
import framework
import metrics

# Overlay colours: what a reader needs to see at a glance is where the model is right and wrong.
TRUE_POSITIVE = np.array([255, 255, 255], np.uint8)
FALSE_POSITIVE = np.array([255, 40, 40], np.uint8)
FALSE_NEGATIVE = np.array([40, 140, 255], np.uint8)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="a final.pth from main.py (default: the newest one)")
    parser.add_argument("--out", default=None, help="output folder (default: results/<run name>, never reused)")
    cli.add_constant_flags(parser)
    args = parser.parse_args(argv)
    return args, cli.settings_from(args)


def predict_split(model, samples, settings, device):
    """Probabilities at native resolution, one (K, H, W) tensor per sample, on the device."""
    if settings["PATCH_SIZE"]:
        return predict_native(model, samples, settings, device)
    size = settings["IMAGE_SIZE"]
    data.check_image_size(size)
    fmt = framework.memory_format(device, settings)
    images = torch.stack([data.resize_image(sample.image, size) for sample in samples])
    if device.type == "cuda":
        images = images.pin_memory()
    images = data.normalize(images.to(device, non_blocking=True))
    probs = framework.predict(model, images, device, tta=settings["TTA"], amp=settings["AMP"], fmt=fmt)
    restored = []
    for sample, prob in zip(samples, probs):
        height, width = sample.label.shape
        restored.append(F.interpolate(prob[None], size=(height, width), mode="bilinear", align_corners=False)[0])
    return restored


def predict_native(model, samples, settings, device, images_per_chunk=4):
    """Whole images at native resolution, zero-padded at the bottom and right to a square whose side is
    a multiple of 32 (DRIVE 584 x 565 -> 608 x 608; square, so the transposed TTA views batch with the
    others), predicted a few at a time; the padding is cut off the probabilities."""
    fmt = framework.memory_format(device, settings)
    restored = []
    for start in range(0, len(samples), images_per_chunk):
        chunk = samples[start:start + images_per_chunk]
        images, _ = data.stack_native(chunk, 1)
        side = data.padded_side(*images.shape[-2:])
        images = data.normalize(data.pad_to_square(images, side).to(device))
        probs = framework.predict(model, images, device, tta=settings["TTA"], amp=settings["AMP"], fmt=fmt)
        restored.extend(prob[:, :sample.label.shape[0], :sample.label.shape[1]] for sample, prob in zip(chunk, probs))
    return restored


def empty_predictions(samples, probs, threshold):
    """Names of binary-task samples whose annotation has foreground but whose prediction has none: an
    all-black mask should never pass unremarked."""
    return [sample.name for sample, prob in zip(samples, probs)
            if prob.shape[0] == 1 and sample.label.any() and not bool((prob[0] > threshold).any())]


def class_map_picture(classes, num_classes):
    """Integer map -> grey levels spread over 0..255 so every class is visible."""
    return (classes.astype(np.float32) * (255 / max(1, num_classes - 1))).astype(np.uint8)


def pictures(sample, prob, threshold):
    """(probability, mask, overlay) uint8 arrays for one sample."""
    if prob.shape[0] == 1:
        foreground = prob[0]
        predicted = foreground > threshold
        truth = sample.label > 0
        overlay = (sample.image * 0.6).astype(np.uint8)
        overlay[predicted & truth] = TRUE_POSITIVE
        overlay[predicted & ~truth] = FALSE_POSITIVE
        overlay[~predicted & truth] = FALSE_NEGATIVE
        return (foreground * 255).round().astype(np.uint8), predicted.astype(np.uint8) * 255, overlay
    classes = prob.argmax(0)
    grey = class_map_picture(classes, prob.shape[0])
    overlay = (sample.image * 0.5 + grey[..., None] * 0.5).astype(np.uint8)
    return (prob.max(0) * 255).round().astype(np.uint8), grey, overlay


def save_png(array, path):
    Image.fromarray(array).save(path, compress_level=1)


def markdown_table(rows, summary, names):
    keys = list(summary)
    lines = ["| image | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in zip(names, rows):
        lines.append(f"| {name} | " + " | ".join(f"{row[key]:.4f}" for key in keys) + " |")
    lines.append("| **mean ± std** | " + " | ".join(
        f"**{summary[key]['mean']:.4f} ± {summary[key]['std']:.4f}**" for key in keys) + " |")
    return "\n".join(lines) + "\n"


def roc_plot(curves, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(5, 5), dpi=110)
    for name, (fpr, tpr, auc) in curves.items():
        axes.plot(fpr, tpr, linewidth=0.8, label=f"{name} ({auc:.4f})")
    axes.plot([0, 1], [0, 1], color="grey", linewidth=0.5, linestyle="--")
    axes.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1))
    if len(curves) <= 20:
        axes.legend(fontsize=5, loc="lower right", title="image (AUC)", title_fontsize=6)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def evaluate(checkpoint, settings, out_dir=None):
    """Predict, score and save; returns (summary dict, output folder, seconds after the model is loaded)."""
    model, settings, payload = framework.model_from_checkpoint(checkpoint, settings)
    device = framework.select_device(settings["DEVICE"])
    framework.configure_speed(device, settings)
    model = model.to(device, memory_format=framework.memory_format(device, settings))
    samples = data.load_split(settings, "test")
    spec = data.dataset_spec(settings["DATASET"])
    out = Path(out_dir) if out_dir else Path(settings["RESULTS_DIR"]) / Path(checkpoint).parent.name
    out = framework.new_run_dir(out.parent, out.name)

    start = framework.timed()
    probs = predict_split(model, samples, settings, device)
    rows, curves = [], {}
    for sample, prob in zip(samples, probs):
        row, curve = metrics.evaluate(spec.task, prob, sample, settings["THRESHOLD"])
        rows.append(row)
        if curve is not None:
            curves[sample.name] = curve
    predict_seconds = framework.timed() - start
    empty = empty_predictions(samples, probs, settings["THRESHOLD"])
    if empty:
        print(f"warning: {len(empty)} of {len(samples)} predicted masks have no foreground at threshold "
              f"{settings['THRESHOLD']} ({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}); the model is "
              f"probably undertrained: train longer or check the learning rate", file=sys.stderr)

    names = [sample.name for sample in samples]
    # PNG encoding releases the GIL, so every core can compress a file while this thread draws the next.
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 4)) as pool:
        for sample, prob in zip(samples, probs):
            probability, mask, overlay = pictures(sample, prob.float().cpu().numpy(), settings["THRESHOLD"])
            pool.submit(save_png, probability, out / f"{sample.name}_prob.png")
            pool.submit(save_png, mask, out / f"{sample.name}_mask.png")
            pool.submit(save_png, overlay, out / f"{sample.name}_overlay.png")
        if curves:
            roc_plot(curves, out / "roc.png", f"{settings['MODEL']} on {settings['DATASET']} test (inside FOV)")
    summary = metrics.summarize(rows)
    total_seconds = framework.timed() - start
    protocol = {
        "checkpoint": str(checkpoint), "model": settings["MODEL"], "dataset": settings["DATASET"],
        "image_size": settings["IMAGE_SIZE"], "tta": settings["TTA"], "threshold": settings["THRESHOLD"],
        "amp": settings["AMP"] and device.type == "cuda", "device": str(device),
        "pretrained": payload.get("pretrained", "unknown"), "train_steps": payload.get("step"),
        "evaluation": metrics.TASK_NOTES[spec.task], "empty_predictions": empty,
    }
    framework.write_json(out / "metrics.json", {
        "protocol": protocol, "summary": summary, "per_image": dict(zip(names, rows)),
        "seconds": {"predict_and_score": round(predict_seconds, 3), "total_after_load": round(total_seconds, 3)},
    })
    table = markdown_table(rows, summary, names)
    (out / "metrics.md").write_text(f"# {settings['MODEL']} on {settings['DATASET']} test\n\n"
                                    f"{metrics.TASK_NOTES[spec.task]}\n\n{table}")
    return summary, out, total_seconds


def main(argv=None):
    args, settings = parse_args(argv)
    checkpoint = Path(args.checkpoint) if args.checkpoint else framework.latest_checkpoint(settings["WEIGHTS_DIR"])
    if not args.checkpoint:
        print(f"evaluating the newest checkpoint, {checkpoint}", file=sys.stderr)
    summary, out, seconds = evaluate(checkpoint, settings, args.out)
    width = max(len(key) for key in summary)
    for key, value in summary.items():
        print(f"{key:<{width}}  {value['mean']:.4f} ± {value['std']:.4f}")
    print(f"wrote {out} ({seconds:.2f}s after loading the model)")


if __name__ == "__main__":
    cli.run(main)
