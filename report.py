"""What results look like on disk: strict JSON, Markdown tables, PNG pictures and plots."""
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent

# Overlay colours: what a reader needs to see at a glance is where the model is right and wrong.
TRUE_POSITIVE = np.array([255, 255, 255], np.uint8)
FALSE_POSITIVE = np.array([255, 40, 40], np.uint8)
FALSE_NEGATIVE = np.array([40, 140, 255], np.uint8)


def strict_json(value):
    """`value` with every NaN or infinity replaced by None: JSON has no NaN, and a reader of
    metrics.json should not meet one (an undefined metric, e.g. Sen of an image without vessels)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def write_json(path, payload):
    """Strict JSON (NaN -> null), written to a side file first so a crash never leaves half a file."""
    write_text(path, json.dumps(strict_json(payload), indent=2, allow_nan=False) + "\n")


def write_text(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(text)
    os.replace(temporary, path)


def markdown_table(headers, rows):
    """A Markdown table: `headers` a list of column titles, `rows` lists of cells (already text)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


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



def save_compressed_copy(source, target):
    """`source` PNG re-saved at full compression: test.py writes fast, large PNGs; copies that live in git
    should be small."""
    with Image.open(source) as picture:
        picture.save(target, optimize=True)


def save_png(array, path):
    Image.fromarray(array).save(path, compress_level=1)



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



def training_curve_plot(log_csv, path, title):
    """Loss against step from a train_log.csv (columns step,loss,lr), with a running mean over 10
    logged points, since a single batch's loss is noisy."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = np.loadtxt(log_csv, delimiter=",", skiprows=1, ndmin=2)
    steps, losses = rows[:, 0], rows[:, 1]
    window = min(10, len(losses))
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=110)
    axes.plot(steps, losses, linewidth=0.6, alpha=0.4, label="loss of the step's batch")
    axes.plot(steps[window - 1:], smooth, linewidth=1.2, label=f"running mean of {window}")
    axes.set(xlabel="step", ylabel="training loss", title=title)
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def git_commit():
    """HEAD's hash, with '+dirty' when tracked files differ from it; 'unknown' outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=20)
        if head.returncode:
            return "unknown"
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True, timeout=20)
        return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
