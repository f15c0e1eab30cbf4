"""The paper's Table VI as paired tests: does each of DAC and RMP add accuracy? (reproduce.py's
drive_ablation_cpu table: every ablation model, several seeds, 20 DRIVE test images each).

Two sources of variation make a difference between two models uncertain here: the test images (some are
harder for one model than for the other) and the training seed (a run from random weights lands somewhere
different each time). Each comparison B - A therefore reports
- the mean difference over seeds and images;
- a 95 % confidence interval and a p-value at the seed level: the per-seed mean differences D_s (the seeds
  are paired: seed s of A and of B saw the same batches, crops and flips) under a one-sample t-test with
  n_seeds - 1 degrees of freedom. This is the test of the claim "B trains to a better model than A", since a
  new training run is a new seed; with few seeds it is weak, and with one seed it does not exist;
- the image-level Wilcoxon signed-rank p-value on the per-image differences averaged over seeds: "on these
  20 test images, B beats A", which holds the seed fixed in spirit and is easily significant;
- Holm's step-down correction of each family of p-values over the comparisons made.
The smallest difference the seed-level design could detect (two-sided alpha 0.05, power 0.8) follows from
the seed-to-seed spread of D_s: (t_{0.975, n-1} + t_{0.8, n-1}) * sd(D) / sqrt(n).
"""
import math
import statistics

import numpy as np
from scipy import stats

# The paper's comparisons, each (before, after, what it tests).
COMPARISONS = [
    ("backbone", "backbone_dac", "Backbone -> +DAC"),
    ("backbone", "backbone_rmp", "Backbone -> +RMP"),
    ("backbone_dac_noatrous", "backbone_dac", "+DAC w/o atrous -> +DAC"),
    ("backbone_inception", "backbone_dac", "+Inception -> +DAC"),
    ("backbone_inception_res", "backbone_dac", "+Inception-ResNet -> +DAC"),
    ("backbone_dac", "cenet", "+DAC -> CE-Net (+RMP)"),
    ("backbone_rmp", "cenet", "+RMP -> CE-Net (+DAC)"),
    ("backbone", "cenet", "Backbone -> CE-Net"),
]

ALPHA, POWER = 0.05, 0.8


def runs_by_seed(records, model):
    """{seed: per-image figures} of `model`'s recorded runs."""
    return {record["seed"]: record["per_image"] for record in records
            if record["model"] == model and record.get("per_image")}


def differences(records, before, after, metric):
    """{seed: [after - before per test image]} over the seeds both models have, images in name order."""
    first, second = runs_by_seed(records, before), runs_by_seed(records, after)
    result = {}
    for seed in sorted(set(first) & set(second)):
        names = sorted(set(first[seed]) & set(second[seed]))
        pairs = [(first[seed][name].get(metric), second[seed][name].get(metric)) for name in names]
        result[seed] = [b - a for a, b in pairs if a is not None and b is not None]
    return result


def seed_level(seed_means):
    """Mean, 95 % CI and two-sided one-sample t-test p of the per-seed mean differences (None for < 2 seeds),
    and the smallest difference this many seeds could detect at ALPHA with POWER."""
    n = len(seed_means)
    mean = statistics.fmean(seed_means)
    if n < 2:
        return {"mean": mean, "ci": None, "p": None, "sd": None, "detectable": None}
    sd = statistics.stdev(seed_means)
    half = stats.t.ppf(1 - ALPHA / 2, n - 1) * sd / math.sqrt(n)
    p = float(stats.ttest_1samp(seed_means, 0.0).pvalue) if sd > 0 else (0.0 if mean else 1.0)
    detectable = (stats.t.ppf(1 - ALPHA / 2, n - 1) + stats.t.ppf(POWER, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "ci": [mean - half, mean + half], "p": p, "sd": sd, "detectable": detectable}


def image_level(per_seed):
    """Wilcoxon signed-rank p on the per-image differences averaged over the seeds, and on how many images
    the after-model is higher."""
    image_means = np.mean(np.array([per_seed[seed] for seed in sorted(per_seed)]), axis=0)
    higher = int((image_means > 0).sum())
    if not np.any(image_means):
        return {"p": 1.0, "higher": higher, "images": len(image_means)}
    p = float(stats.wilcoxon(image_means).pvalue)
    return {"p": p, "higher": higher, "images": len(image_means)}


def holm(p_values):
    """Holm's step-down adjusted p-values, in the input order (None stays None)."""
    present = sorted((p, index) for index, p in enumerate(p_values) if p is not None)
    adjusted, running = [None] * len(p_values), 0.0
    for rank, (p, index) in enumerate(present):
        running = max(running, min(1.0, (len(present) - rank) * p))
        adjusted[index] = running
    return adjusted


def compare(records, metric="FOV AUC", comparisons=COMPARISONS):
    """Every comparison whose two models have a common seed: the figures described in the module docstring."""
    results = []
    for before, after, label in comparisons:
        per_seed = differences(records, before, after, metric)
        if not per_seed:
            continue
        seed_means = [statistics.fmean(values) for values in per_seed.values()]
        results.append({"label": label, "before": before, "after": after, "metric": metric,
                        "seeds": sorted(per_seed), "seed_means": seed_means,
                        "seed_level": seed_level(seed_means), "image_level": image_level(per_seed)})
    for family in ("seed_level", "image_level"):
        for result, adjusted in zip(results, holm([result[family]["p"] for result in results])):
            result[family]["p_holm"] = adjusted
    return results


# --- the table -------------------------------------------------------------------------------------------

# Gu et al., IEEE TMI 2019, Table VI (DRIVE; ImageNet-pretrained encoder, a GPU, 300 epochs at 448 x 448;
# the paper does not say whether inside the FOV or over the whole image): AUC, to the three decimals
# quoted here. The table's other columns are not transcribed.
PAPER_AUC = {"backbone": 0.971, "backbone_dac": 0.977, "backbone_dac_noatrous": 0.970, "backbone_rmp": 0.974,
             "backbone_inception": 0.972, "backbone_inception_res": 0.974, "cenet": 0.978, "unet": 0.960}

SUMMARY_METRICS = ("FOV AUC", "FOV F1", "FOV Sen", "FOV Acc", "whole AUC", "whole Acc")


def parameter_count(model):
    import networks
    return sum(parameter.numel() for parameter in networks.build_model(model).parameters())


def spread(values):
    values = [value for value in values if value is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def p_text(p):
    return "n/a" if p is None else (f"{p:.2g}" if p < 0.001 else f"{p:.3f}")


def summary_lines(records, models, titles):
    header = ["model", "seeds", *SUMMARY_METRICS, "paper AUC (Table VI)", "parameters", "training (min, mean)"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for model in models:
        runs = sorted((record for record in records if record["model"] == model), key=lambda run: run["seed"])
        if not runs:
            continue
        cells = [f"{titles.get(model, model)} (`{model}`)", ", ".join(str(run["seed"]) for run in runs)]
        cells += [spread([run["metrics"].get(name) for run in runs]) for name in SUMMARY_METRICS]
        paper = PAPER_AUC.get(model)
        minutes = statistics.fmean(run["train_seconds"] for run in runs) / 60
        cells += [f"{paper:.3f}" if paper else "n/a", f"{parameter_count(model):,}", f"{minutes:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def comparison_lines(results):
    lines = ["| comparison | seeds | mean difference | 95 % CI (seeds) | p seeds (t) | p seeds, Holm | "
             "images higher | p images (Wilcoxon) | p images, Holm | detectable (seeds) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        seed, image = result["seed_level"], result["image_level"]
        ci = f"[{seed['ci'][0]:+.4f}, {seed['ci'][1]:+.4f}]" if seed["ci"] else "n/a (1 seed)"
        detectable = f"{seed['detectable']:.4f}" if seed["detectable"] is not None else "n/a"
        lines.append(f"| {result['label']} | {len(result['seeds'])} | {seed['mean']:+.4f} | {ci} | "
                     f"{p_text(seed['p'])} | {p_text(seed.get('p_holm'))} | {image['higher']}/{image['images']} | "
                     f"{p_text(image['p'])} | {p_text(image.get('p_holm'))} | {detectable} |")
    return lines


def render(records, models, titles, command, figure=None):
    """The markdown page of the study: the models' table, the paired answers, the protocol, every run."""
    results = compare(records)
    machines = sorted({record.get("machine", "unknown") for record in records})
    precisions = sorted({record.get("train_precision", "fp32") for record in records})
    commits = sorted({record.get("git_commit", "unknown") for record in records})
    lines = ["# DRIVE ablation (the paper's Table VI), `cpu` recipe", "",
             f"Written by `reproduce.py` from `drive_ablation_cpu.json` ({len(records)} runs); rerun it rather than "
             "editing this file.", "",
             "Every model: the `cpu` recipe as it is (random 256x256 crops at native resolution, CLAHE, AdamW 2e-3, "
             "Dice + BCE, batch 4, 1400 steps), **from random weights**; evaluated as `test.py` does (8-way flip "
             "TTA, threshold 0.5, 1st annotator, the 20 test images; FOV = inside DRIVE's mask, whole = every "
             "pixel). Cells: mean ± sample std over seeds of each run's mean over the 20 images. The paper's "
             "figures come from another setting: an ImageNet-pretrained encoder, a GPU, 300 epochs at 448x448, "
             "its metric region not stated.", ""]
    lines += summary_lines(records, models, titles)
    if figure:
        lines += ["", f"![FOV AUC per seed]({figure})"]
    lines += ["", "## The paper's comparisons, paired (FOV AUC)", "",
              "Difference = after - before. *Seeds*: a one-sample t-test on the per-seed mean differences (seed "
              "s of both models saw the same batches, crops and flips) — the test of the claim that one model "
              "trains to a better one, since a new run is a new seed. *Images*: Wilcoxon signed-rank on the "
              "20 per-image differences averaged over seeds — whether it wins on these test images. Holm's "
              "step-down correction over the comparisons listed, for each family. *Detectable*: the smallest "
              "difference the seed-level test finds with power 0.8 at alpha 0.05, from the measured seed-to-seed "
              "spread of the differences.", ""]
    lines += comparison_lines(results) if results else ["(no comparison has both of its models yet)"]
    lines += ["", "## Every run", "", "| model | seed | FOV AUC | FOV F1 | FOV Sen | whole AUC | training (s) | "
              "precision | run |", "|---|---|---|---|---|---|---|---|---|"]
    for record in sorted(records, key=lambda rec: (models.index(rec["model"]) if rec["model"] in models else 99,
                                                   rec["seed"])):
        values = [record["metrics"].get(name) for name in ("FOV AUC", "FOV F1", "FOV Sen", "whole AUC")]
        lines.append(f"| {record['model']} | {record['seed']} | " + " | ".join(
            "n/a" if value is None else f"{value:.4f}" for value in values)
            + f" | {record['train_seconds']:.0f} | {record.get('train_precision', 'fp32')} | `{record['run']}` |")
    lines += ["", f"- Machine: {'; '.join(machines)}; training precision: {', '.join(precisions)}.",
              f"- Git commit: {', '.join(f'`{commit}`' for commit in commits)}.",
              f"- Command (any row: the same with `--models MODEL --seeds N`): `{command}`", ""]
    return "\n".join(lines)


def plot(records, models, titles, path):
    """Each model's FOV AUC per seed (points), their mean (a bar) and the paper's AUC (a diamond)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = [model for model in models if any(record["model"] == model for record in records)]
    figure, axes = plt.subplots(figsize=(1.3 * len(shown) + 2, 4))
    for x, model in enumerate(shown):
        values = [record["metrics"]["FOV AUC"] for record in records if record["model"] == model]
        axes.scatter([x] * len(values), values, color="tab:blue", zorder=3, label="a seed" if x == 0 else None)
        axes.hlines(statistics.fmean(values), x - 0.3, x + 0.3, color="tab:blue", label="mean" if x == 0 else None)
        if model in PAPER_AUC:
            axes.scatter([x], [PAPER_AUC[model]], marker="D", color="tab:red", zorder=3,
                         label="paper (Table VI)" if x == 0 else None)
    axes.set_xticks(range(len(shown)), [titles.get(model, model) for model in shown], rotation=25, ha="right")
    axes.set_ylabel("FOV AUC (DRIVE test, 8-way TTA)")
    axes.legend(loc="lower right", fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
