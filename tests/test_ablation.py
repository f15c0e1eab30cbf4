"""ablation.py: the Table VI comparisons' arithmetic, by hand, and the page and figure it writes."""
import json
import math

import pytest

import ablation
import tables


def record(model, seed, values, metric="FOV AUC"):
    """A recorded run whose test images 01, 02, ... score `values`."""
    per_image = {f"{index:02d}": {metric: value} for index, value in enumerate(values, 1)}
    return {"model": model, "seed": seed, "per_image": per_image, "run": f"repro_cpu_{model}_s{seed}",
            "metrics": {metric: sum(values) / len(values)}, "train_seconds": 600.0,
            "train_precision": "bf16 autocast", "machine": "test CPU", "git_commit": "abc", "command": "python x"}


def test_holm_by_hand():
    # Sorted 0.01, 0.03, 0.04 -> 3 x 0.01 = 0.03, 2 x 0.03 = 0.06, max(0.06, 1 x 0.04) = 0.06.
    assert ablation.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert ablation.holm([None, 0.2]) == [None, 0.2]
    assert ablation.holm([0.6, 0.7]) == [1.0, 1.0]


def test_seed_level_by_hand():
    """D = 0.002, 0.004, 0.006: mean 0.004, sd 0.002, t = 0.004 / (0.002 / sqrt 3) = sqrt 12 with 2 degrees of
    freedom, whose CDF is 1/2 + t / (2 sqrt(2 + t^2)), so p = 1 - sqrt 12 / sqrt 14 = 0.0742."""
    result = ablation.seed_level([0.002, 0.004, 0.006])
    assert result["mean"] == pytest.approx(0.004) and result["sd"] == pytest.approx(0.002)
    assert result["p"] == pytest.approx(1 - math.sqrt(12) / math.sqrt(14), rel=1e-6)
    half = 4.302653 * 0.002 / math.sqrt(3)  # t_{0.975, 2}
    assert result["ci"] == pytest.approx([0.004 - half, 0.004 + half], rel=1e-5)
    # (t_{0.975,2} + t_{0.8,2}) sd / sqrt 3, t_{0.8,2} = 1.060660
    assert result["detectable"] == pytest.approx((4.302653 + 1.060660) * 0.002 / math.sqrt(3), rel=1e-5)
    single = ablation.seed_level([0.003])
    assert single["mean"] == 0.003 and single["p"] is None and single["ci"] is None


def test_pairs_by_seed_and_image_and_the_image_level_test():
    records = [record("backbone", 0, [0.90, 0.91, 0.92, 0.93, 0.94]),
               record("backbone_dac", 0, [0.91, 0.93, 0.95, 0.97, 0.99]),
               record("backbone", 1, [0.90, 0.90, 0.90, 0.90, 0.90]),
               record("backbone_dac", 1, [0.91, 0.91, 0.91, 0.91, 0.91]),
               record("backbone_dac", 2, [0.5] * 5)]  # no backbone seed 2: not paired
    per_seed = ablation.differences(records, "backbone", "backbone_dac", "FOV AUC")
    assert sorted(per_seed) == [0, 1]
    assert per_seed[0] == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05])
    assert per_seed[1] == pytest.approx([0.01] * 5)
    image = ablation.image_level(per_seed)
    # All 5 seed-averaged differences are positive and distinct: the exact two-sided p is 2 / 2^5.
    assert image["higher"] == 5 and image["p"] == pytest.approx(2 / 32)
    (result,) = ablation.compare(records, comparisons=[("backbone", "backbone_dac", "+DAC")])
    assert result["seeds"] == [0, 1] and result["seed_means"] == pytest.approx([0.03, 0.01])
    assert result["seed_level"]["mean"] == pytest.approx(0.02)
    assert result["seed_level"]["p_holm"] == result["seed_level"]["p"]  # one comparison: Holm changes nothing


def test_page_and_figure(tmp_path):
    records = [record(model, seed, [0.95 + 0.001 * seed + 0.002 * rank] * 3)
               for rank, model in enumerate(["backbone", "backbone_dac", "cenet"]) for seed in (0, 1)]
    tables.write_outputs("drive_ablation_cpu", tmp_path, records, None)
    page = (tmp_path / "drive_ablation_cpu.md").read_text()
    assert "| Backbone -> +DAC | 2 | +0.0020 |" in page and "Backbone -> +RMP" not in page
    assert "0.971" in page and "0.977" in page  # the paper's Table VI beside ours
    assert "29,003,093" in page  # CE-Net's parameter count
    written = json.loads((tmp_path / "drive_ablation_cpu.json").read_text())
    assert [comparison["label"] for comparison in written["comparisons"]] == [
        "Backbone -> +DAC", "+DAC -> CE-Net (+RMP)", "Backbone -> CE-Net"]
    assert (tmp_path / "figures" / "drive_ablation_cpu_fov_auc.png").stat().st_size > 1000
