"""Evaluation metrics of the CE-Net experiments, vectorised (no per-pixel Python loops).

* Vessel / binary segmentation (DRIVE): ``roc_curve``, ``roc_auc``, ``binary_metrics``; ``f1_by_threshold``
  for choosing a threshold.
* Optic disc / lung: ``overlap_error``, ``dice_coefficient``.
* ISBI 2012 EM membranes: ``rand_info_scores`` (V^Rand and V^Info).
* Retinal OCT layers: ``boundary_positions``, ``boundary_mae``.
* Per-image dicts to mean and std: ``summarize``.

Which of these a dataset reports, and how, is its task module's business (tasks/).

Threshold-free and count-based metrics work on torch tensors (CPU or CUDA) and accept
NumPy arrays; the label-image metrics run in NumPy / scikit-image and accept either.
"""
import math

import numpy as np
import torch
from skimage.measure import label as connected_components
from skimage.morphology import thin as thin_to_one_pixel

def as_device_tensor(array, device):
    """A NumPy array (any layout) as a tensor on `device`."""
    return torch.as_tensor(np.ascontiguousarray(array), device=device)


def foreground_mask(prob, threshold):
    """Binary prediction of a one-channel probability map (1, H, W), as a NumPy bool array."""
    return (prob[0] > threshold).cpu().numpy()


def thin_curve(fpr, tpr, points=2000):
    """At most `points` ROC points for plotting; the exact curve can have one per distinct score."""
    step = max(1, len(fpr) // points)
    keep = torch.cat([torch.arange(0, len(fpr), step, device=fpr.device),
                      torch.tensor([len(fpr) - 1], device=fpr.device)])
    return fpr[keep].cpu().numpy(), tpr[keep].cpu().numpy()


def _as_tensor(x):
    return x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))


def _as_numpy(x):
    if torch.is_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _ratio(numerator, denominator):
    return numerator / denominator if denominator else math.nan


# --- ROC ------------------------------------------------------------------------------------

def roc_curve(scores, labels):
    """Exact ROC curve of ``scores`` against boolean ``labels`` (both 1-D, same length).

    Pixels are sorted by decreasing score; the curve has one point per distinct score t:

        TPR(t) = #{positives with score >= t} / P,   FPR(t) = #{negatives with score >= t} / N,

    preceded by (0, 0). Tied scores form one group and move the curve in one diagonal step,
    so the last point is (1, 1). Returns float64 tensors (fpr, tpr) on the input's device;
    they are NaN where P or N is zero.
    """
    scores, labels = _as_tensor(scores), _as_tensor(labels)
    if scores.ndim != 1 or labels.ndim != 1 or scores.shape != labels.shape:
        raise ValueError(f"scores and labels must be 1-D of equal length, got {tuple(scores.shape)} "
                         f"and {tuple(labels.shape)}")
    if scores.numel() == 0:
        raise ValueError("roc_curve needs at least one score")
    labels = labels.to(device=scores.device, dtype=torch.bool)
    order = torch.argsort(scores, descending=True, stable=True)
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    true_positives = torch.cumsum(sorted_labels.long(), 0)
    false_positives = torch.cumsum((~sorted_labels).long(), 0)
    # A threshold admits the whole tie group at once, so only each group's last index counts.
    group_ends = torch.nonzero(sorted_scores[1:] != sorted_scores[:-1]).flatten()
    last = torch.tensor([scores.numel() - 1], device=scores.device)
    group_ends = torch.cat([group_ends, last])
    zero = torch.zeros(1, dtype=torch.float64, device=scores.device)
    positives = true_positives[-1].double()
    negatives = false_positives[-1].double()
    tpr = torch.cat([zero, true_positives[group_ends].double() / positives])
    fpr = torch.cat([zero, false_positives[group_ends].double() / negatives])
    return fpr, tpr


def roc_auc(scores, labels):
    """Area under ``roc_curve(scores, labels)`` by the trapezoidal rule.

    Because tie groups are joined by straight segments this equals the Mann-Whitney
    statistic  AUC = P(score_pos > score_neg) + 1/2 * P(score_pos = score_neg).
    Returns NaN when only one class is present.
    """
    return area_under(*roc_curve(scores, labels))


def area_under(fpr, tpr):
    """Trapezoidal area under a ROC curve from `roc_curve`; NaN when it is undefined."""
    if torch.isnan(fpr[-1]) or torch.isnan(tpr[-1]):
        return math.nan
    return float(torch.trapezoid(tpr, fpr))


# --- thresholded pixel metrics ------------------------------------------------------------

def binary_metrics(prob, label, mask=None, threshold=0.5):
    """`binary_metrics_and_roc` without the curve."""
    return binary_metrics_and_roc(prob, label, mask, threshold)[0]


def binary_metrics_and_roc(prob, label, mask=None, threshold=0.5):
    """AUC and the thresholded metrics of `threshold_metrics` on the same pixels, with the ROC curve
    (fpr, tpr) the AUC was computed from (one sort of the pixels serves both). AUC =
    ``roc_auc(prob, label)`` over the evaluated pixels. Returns a dict of Python floats keyed "AUC",
    "Acc", "Sen", "Spe", "F1", and (fpr, tpr)."""
    prob, label = _evaluated_pixels(prob, label, mask)
    fpr, tpr = roc_curve(prob, label)
    return {"AUC": area_under(fpr, tpr), **_counted_metrics(prob, label, threshold)}, (fpr, tpr)


def threshold_metrics(prob, label, mask=None, threshold=0.5):
    """Accuracy, sensitivity, specificity and F1 of one probability map (no AUC, so no sort).

    prob: (H, W) float probabilities; label: (H, W) bool ground truth; mask: optional (H, W)
    bool, the pixels to evaluate (e.g. DRIVE's field of view). The prediction is
    ``prob > threshold``; with TP, FP, TN, FN counted over the evaluated pixels,

        Sen = TP / (TP + FN)        Spe = TN / (TN + FP)
        Acc = (TP + TN) / (TP + FP + TN + FN)
        F1  = 2 TP / (2 TP + FP + FN)

    An undefined ratio (zero denominator) is NaN. Returns Python floats keyed "Acc", "Sen", "Spe", "F1".
    """
    return _counted_metrics(*_evaluated_pixels(prob, label, mask), threshold)


def f1_by_threshold(prob, label, mask=None, thresholds=None):
    """F1 of ``prob > t`` for each t of `thresholds` (default 0.01, 0.02, ..., 0.99), exactly as
    ``threshold_metrics`` counts it at each one, from one pass over the pixels: a pixel is predicted
    foreground at the thresholds below its probability, so with b(p) = #{t < p},

        TP(t_j) = #{foreground pixels with b(p) > j},   FP(t_j) likewise over background pixels,
        F1(t_j) = 2 TP / (2 TP + FP + FN) = 2 TP / (TP + FP + P),   P = #foreground pixels.

    Returns a float64 tensor of F1 per threshold (NaN where no pixel is foreground in either), on the CPU."""
    prob, label = _evaluated_pixels(prob, label, mask)
    if thresholds is None:
        thresholds = torch.arange(1, 100, dtype=torch.float64) / 100
    thresholds = torch.as_tensor(thresholds, dtype=prob.dtype, device=prob.device)
    if thresholds.ndim != 1 or not bool((thresholds[1:] > thresholds[:-1]).all()):
        raise ValueError("thresholds must be a 1-D increasing sequence")
    below = torch.bucketize(prob, thresholds)  # = #{t < p}
    bins = thresholds.numel() + 1
    positive = torch.bincount(below[label], minlength=bins).double()
    negative = torch.bincount(below[~label], minlength=bins).double()
    # Pixels predicted foreground at threshold j: those with b(p) >= j + 1.
    true_positive = positive.flip(0).cumsum(0).flip(0)[1:]
    false_positive = negative.flip(0).cumsum(0).flip(0)[1:]
    denominator = true_positive + false_positive + positive.sum()
    return torch.where(denominator > 0, 2 * true_positive / denominator.clamp(min=1),
                       torch.full_like(denominator, math.nan)).cpu()


def _evaluated_pixels(prob, label, mask):
    """Flat (prob, bool label) of the pixels to evaluate, on prob's device, shapes checked."""
    prob, label = _as_tensor(prob), _as_tensor(label)
    if prob.shape != label.shape:
        raise ValueError(f"prob and label must have the same shape, got {tuple(prob.shape)} "
                         f"and {tuple(label.shape)}")
    label = label.to(device=prob.device, dtype=torch.bool)
    if mask is not None:
        mask = _as_tensor(mask)
        if mask.shape != prob.shape:
            raise ValueError(f"mask must have the shape of prob {tuple(prob.shape)}, got {tuple(mask.shape)}")
        mask = mask.to(device=prob.device, dtype=torch.bool)
        prob, label = prob[mask], label[mask]
    prob, label = prob.reshape(-1), label.reshape(-1)
    if prob.numel() == 0:
        raise ValueError("no pixels to evaluate (empty input or empty mask)")
    return prob, label


def _counted_metrics(prob, label, threshold):
    predicted = prob > threshold
    counts = torch.stack([
        (predicted & label).sum(), (predicted & ~label).sum(),
        (~predicted & ~label).sum(), (~predicted & label).sum(),
    ])
    tp, fp, tn, fn = counts.tolist()  # one device-to-host copy for all four
    return {
        "Acc": _ratio(tp + tn, tp + fp + tn + fn),
        "Sen": _ratio(tp, tp + fn),
        "Spe": _ratio(tn, tn + fp),
        "F1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


# --- region overlap -----------------------------------------------------------------------

def overlap_error(pred, gt):
    """Overlap error of two binary masks:  E = 1 - |S ∩ G| / |S ∪ G|  (S = pred, G = gt).

    Two empty masks agree perfectly: E = 0.
    """
    pred, gt = _as_numpy(pred).astype(bool), _as_numpy(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape, got {pred.shape} and {gt.shape}")
    union = np.count_nonzero(pred | gt)
    if union == 0:
        return 0.0
    return 1.0 - np.count_nonzero(pred & gt) / union


def dice_coefficient(pred, gt):
    """Dice = 2 |S ∩ G| / (|S| + |G|) of two binary masks; two empty masks agree perfectly: 1."""
    pred, gt = _as_numpy(pred).astype(bool), _as_numpy(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape, got {pred.shape} and {gt.shape}")
    total = np.count_nonzero(pred) + np.count_nonzero(gt)
    if total == 0:
        return 1.0
    return 2.0 * np.count_nonzero(pred & gt) / total


# --- ISBI 2012 EM: V^Rand and V^Info ------------------------------------------------------

def boundaries_to_segments(boundary):
    """Label image of a boolean boundary map: 4-connected components of the non-boundary
    pixels numbered 1, 2, ..., boundary pixels 0."""
    return connected_components(~boundary, background=0, connectivity=1)


def _entropy(counts, total):
    p = counts / total
    return float(-(p * np.log(p)).sum())


def rand_info_scores(pred_boundary, gt_boundary, thin=True):
    """Foreground-restricted Rand and information scores of the ISBI 2012 EM challenge
    (Arganda-Carreras et al., Front. Neuroanat. 2015).

    pred_boundary, gt_boundary: (H, W) bool membrane maps (True = boundary). With
    ``thin=True`` both are first thinned to 1-pixel-wide curves (the challenge's border
    thinning, ``skimage.morphology.thin``, with the image edge replicated outwards first
    so that membranes still reach the border: `thin_membranes`). Each map then becomes a
    segmentation: the 4-connected components of its non-boundary pixels, boundary = 0.

    Only pixels inside a ground-truth segment (ground-truth label != 0) are scored; let n be
    their number. A predicted boundary pixel among them belongs to no predicted segment; it
    is counted as a segment of its own (a singleton), which penalises boundaries drawn
    through cells without rewarding them. This is what the challenge's Fiji script does
    (its extra sum(p_i0)/n and -sum(p_i0) log n terms are exactly the singletons' share).

    With p_ij the fraction of the n pixels in predicted segment i and true segment j,
    s_i = sum_j p_ij and t_j = sum_i p_ij:

        V^Rand = 2 sum_ij p_ij^2 / (sum_i s_i^2 + sum_j t_j^2)
        V^Info = 2 I(S; T) / (H(S) + H(T)),   I(S; T) = sum_ij p_ij log(p_ij / (s_i t_j))
                                                      = H(S) + H(T) - H(S, T),
        H(S) = -sum_i s_i log s_i,  H(T) = -sum_j t_j log t_j,  H(S, T) = -sum_ij p_ij log p_ij,

    with V^Info = 1 when H(S) + H(T) = 0 (both one segment). Both lie in [0, 1], 1 = perfect.
    Both are NaN when the ground truth has no non-boundary pixel. Returns
    dict(VRand=..., VInfo=...).
    """
    pred_boundary = _as_numpy(pred_boundary).astype(bool)
    gt_boundary = _as_numpy(gt_boundary).astype(bool)
    if pred_boundary.ndim != 2 or pred_boundary.shape != gt_boundary.shape:
        raise ValueError(f"boundary maps must be 2-D and of equal shape, got {pred_boundary.shape} "
                         f"and {gt_boundary.shape}")
    return segments_rand_info(membrane_segments(pred_boundary, thin), membrane_segments(gt_boundary, thin))


def membrane_segments(boundary, thin=True):
    """The segmentation rand_info_scores compares: the 4-connected regions between the (thinned) membranes."""
    return boundaries_to_segments(thin_membranes(boundary) if thin else boundary)


# Thinning sees nothing beyond the image, so a membrane band that meets the image border thins to a line ending
# about half its width short of the border, and the two cells it separated join there: thinned so, 805 of the
# 3431 cells of the 30 ISBI 2012 training labels merge with a neighbour. Replicating the map's edge outwards
# first keeps such lines reaching the border: 4 of 3431 merge at 16 px, 1 at 32.
THIN_PAD = 32


def thin_membranes(boundary):
    """A bool membrane map thinned to 1-pixel curves (skimage.morphology.thin) after extending it by THIN_PAD
    px of edge replication on every side, cropped back to its own size."""
    padded = np.pad(boundary, THIN_PAD, mode="edge")
    return thin_to_one_pixel(padded)[THIN_PAD:-THIN_PAD, THIN_PAD:-THIN_PAD]


def segments_rand_info(pred_segments, gt_segments):
    """V^Rand and V^Info (rand_info_scores) of two label images from `membrane_segments`."""
    inside = gt_segments != 0
    n = int(np.count_nonzero(inside))
    if n == 0:
        return {"VRand": math.nan, "VInfo": math.nan}
    pred_ids = pred_segments[inside].astype(np.int64)
    true_ids = gt_segments[inside].astype(np.int64)
    on_pred_boundary = pred_ids == 0
    pred_ids[on_pred_boundary] = pred_ids.max() + 1 + np.arange(np.count_nonzero(on_pred_boundary))

    # Sparse contingency table: the non-zero n_ij are the counts of distinct (i, j) pairs.
    pair_keys = pred_ids * (int(true_ids.max()) + 1) + true_ids
    _, joint = np.unique(pair_keys, return_counts=True)
    _, pred_sizes = np.unique(pred_ids, return_counts=True)
    _, true_sizes = np.unique(true_ids, return_counts=True)
    joint, pred_sizes, true_sizes = (a.astype(np.float64) for a in (joint, pred_sizes, true_sizes))

    # Counts instead of probabilities: the 1/n^2 factors cancel in V^Rand.
    v_rand = 2.0 * (joint @ joint) / (pred_sizes @ pred_sizes + true_sizes @ true_sizes)

    h_pred, h_true = _entropy(pred_sizes, n), _entropy(true_sizes, n)
    h_joint = _entropy(joint, n)
    if h_pred + h_true == 0.0:
        v_info = 1.0
    else:
        # Rounding can push a zero mutual information a hair below 0.
        mutual = max(h_pred + h_true - h_joint, 0.0)
        v_info = 2.0 * mutual / (h_pred + h_true)
    return {"VRand": float(v_rand), "VInfo": float(v_info)}


# The challenge's leaderboard reports each score at its best threshold of the submitted probability map.
LEADERBOARD_THRESHOLDS = tuple(round(0.05 * step, 2) for step in range(1, 20))   # 0.05, 0.10, ..., 0.95


def rand_info_over_thresholds(prob, gt_boundary, thresholds=LEADERBOARD_THRESHOLDS):
    """The largest V^Rand and V^Info of ``prob > t`` over the thresholds t, and the t of each (the lowest
    of equals), the ground truth thinned once:

        V^Rand max = max_t V^Rand(prob > t, gt),  V^Info max = max_t V^Info(prob > t, gt).

    prob: (H, W) membrane probabilities; gt_boundary: (H, W) bool. NaN where every score is NaN (no
    ground-truth segment). Returns {"VRand max", "VRand max threshold", "VInfo max", "VInfo max threshold"}."""
    prob, gt_boundary = _as_numpy(prob), _as_numpy(gt_boundary).astype(bool)
    if prob.shape != gt_boundary.shape or prob.ndim != 2:
        raise ValueError(f"prob and gt_boundary must be 2-D of equal shape, got {prob.shape} and {gt_boundary.shape}")
    truth = membrane_segments(gt_boundary)
    scores = [segments_rand_info(membrane_segments(prob > threshold), truth) for threshold in thresholds]
    row = {}
    for name in ("VRand", "VInfo"):
        values = np.array([score[name] for score in scores], dtype=np.float64)
        best = None if np.all(np.isnan(values)) else int(np.nanargmax(values))
        row[f"{name} max"] = math.nan if best is None else float(values[best])
        row[f"{name} max threshold"] = math.nan if best is None else float(thresholds[best])
    return row


# --- OCT layer boundaries -----------------------------------------------------------------

def boundary_positions(labels, num_classes):
    """Row of each layer boundary in each column of an OCT label map.

    labels: (H, W) integers, classes 0..K-1 ordered top to bottom. Boundary b (b = 0..K-2)
    in column c is the first row r with labels[r, c] >= b + 1, NaN where no such row
    exists. Returns a float64 array (K - 1, W).
    """
    labels = _as_numpy(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D (H, W) map, got shape {labels.shape}")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2 for layer boundaries, got {num_classes}")
    levels = np.arange(1, int(num_classes)).reshape(-1, 1, 1)
    at_or_below = labels[np.newaxis] >= levels                      # (K-1, H, W)
    rows = np.argmax(at_or_below, axis=1).astype(np.float64)        # first True per column
    rows[~at_or_below.any(axis=1)] = np.nan
    return rows


def boundary_mae(pred_labels, gt_labels, num_classes):
    """Mean absolute error, in pixels, of each OCT layer boundary's row:

        MAE_b = mean over columns c of |r_pred(b, c) - r_gt(b, c)|,  b = 0..K-2,

    with r from ``boundary_positions``. Columns where either map lacks boundary b are left
    out; a boundary missing from every column gives NaN. Returns a float64 array (K - 1,).
    """
    pred_labels, gt_labels = _as_numpy(pred_labels), _as_numpy(gt_labels)
    if pred_labels.shape != gt_labels.shape:
        raise ValueError(f"pred_labels and gt_labels must have the same shape, got "
                         f"{pred_labels.shape} and {gt_labels.shape}")
    errors = np.abs(boundary_positions(pred_labels, num_classes) - boundary_positions(gt_labels, num_classes))
    return nanmean_rows(errors)


def nanmean_rows(values):
    # np.nanmean warns on an all-NaN row; an absent boundary is expected, not alarming.
    valid = ~np.isnan(values)
    counts = valid.sum(axis=1)
    totals = np.where(valid, values, 0.0).sum(axis=1)
    return np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)


# --- aggregation ----------------------------------------------------------------------------

def summarize(rows):
    """Mean and population standard deviation of each metric over per-image dicts.

        mean = (1/m) sum_k x_k,   std = sqrt((1/m) sum_k (x_k - mean)^2),

    over the m images where the metric is not NaN (NaN in both if there is none). Keys
    keep their first-seen order. Returns {name: {"mean": float, "std": float}}.
    """
    names = []
    for row in rows:
        names.extend(name for name in row if name not in names)
    summary = {}
    for name in names:
        values = np.array([float(row[name]) for row in rows if name in row], dtype=np.float64)
        values = values[~np.isnan(values)]
        if values.size == 0:
            summary[name] = {"mean": math.nan, "std": math.nan}
        else:
            summary[name] = {"mean": float(values.mean()), "std": float(values.std())}
    return summary


# --------------------------------------------------------------------------------------------
# Object-level metrics of instance maps: the GlaS challenge's (Sirinukunwattana et al., Medical Image
# Analysis 2017) and MoNuSeg's Aggregated Jaccard Index (Kumar et al., IEEE TMI 2017)
# --------------------------------------------------------------------------------------------
#
# A MoNuSeg tile holds hundreds of nuclei, so nothing here builds one full-size mask per object or compares
# objects pair by pair over the whole image: the pairwise overlaps come from one contingency table, and a
# Hausdorff distance is computed inside the bounding box of the two objects only.

class ObjectPairs:
    """Two instance maps (0 = background), each renumbered 1..n in the order of their ids, with
    overlap[i, j] = #pixels of segmented object i in ground-truth object j (row and column 0: background),
    and each object's area and bounding box."""

    def __init__(self, segmented, truth):
        segmented, truth = _as_numpy(segmented), _as_numpy(truth)
        if segmented.shape != truth.shape:
            raise ValueError(f"instance maps must have the same shape, got {segmented.shape} and {truth.shape}")
        self.found, found_count = _renumbered(segmented)
        self.real, real_count = _renumbered(truth)
        keys = self.found.ravel() * (real_count + 1) + self.real.ravel()
        self.overlap = np.bincount(keys, minlength=(found_count + 1) * (real_count + 1)) \
            .reshape(found_count + 1, real_count + 1)
        self.found_areas = self.overlap[1:].sum(axis=1)
        self.real_areas = self.overlap[:, 1:].sum(axis=0)
        self.found_boxes = _boxes(self.found, found_count)
        self.real_boxes = _boxes(self.real, real_count)

    @property
    def counts(self):
        return len(self.found_areas), len(self.real_areas)

    def inner(self):
        """(#segmented, #ground truth) overlaps between objects, background left out."""
        return self.overlap[1:, 1:]


def _renumbered(instances):
    """(map with ids 1..n in the order of the original ids, 0 kept as background; n)."""
    flat = np.asarray(instances).ravel()
    values, inverse = np.unique(flat, return_inverse=True)
    if values.size and values[0] < 0:
        raise ValueError(f"instance ids must be >= 0 (0 = background), found {values[0]}")
    numbered = inverse.reshape(np.shape(instances)).astype(np.int64)
    if values.size and values[0] == 0:
        return numbered, values.size - 1
    return numbered + 1, values.size  # no background pixel at all


def _boxes(numbered, count):
    """(count, 4) int array: first row, end row, first column, end column of objects 1..count."""
    from scipy import ndimage
    slices = ndimage.find_objects(numbered, max_label=count)
    return np.array([[s[0].start, s[0].stop, s[1].start, s[1].stop] for s in slices], np.int64).reshape(-1, 4)


def object_f1(segmented, truth):
    """Object-level F1 between two instance maps (0 = background). A segmented object is a true positive when
    it covers at least half of its ground-truth object (the one it overlaps most); precision = TP / #segmented,
    recall = TP / #ground truth, F1 their harmonic mean. NaN when both maps are empty."""
    return pairs_f1(ObjectPairs(segmented, truth))


def pairs_f1(pairs):
    found, real = pairs.counts
    if not found and not real:
        return float("nan")
    true_positives = 0
    if found and real:
        inner = pairs.inner()
        best = inner.argmax(axis=1)  # first of equals: the lowest id, as a loop over the ids would pick
        covered = inner[np.arange(found), best]
        true_positives = int(((covered > 0) & (covered >= 0.5 * pairs.real_areas[best])).sum())
    precision = _ratio(true_positives, found)
    recall = _ratio(true_positives, real)
    return _ratio(2 * precision * recall, precision + recall) if true_positives else 0.0


def _score_of_an_empty_map(found, real):
    """An object score when a map has no object: NaN when both are empty (nothing to score), 0 when one is."""
    return float("nan") if not found and not real else 0.0


def object_dice(segmented, truth):
    """GlaS object Dice: 1/2 [sum_i g_i Dice(G_i, S*(G_i)) + sum_j s_j Dice(G*(S_j), S_j)], with weights
    g_i = |G_i| / sum |G| and s_j = |S_j| / sum |S|, and * the object of the other map overlapping most (none:
    Dice 0). NaN when both maps are empty; 0 when only one is."""
    return pairs_dice(ObjectPairs(segmented, truth))


def pairs_dice(pairs):
    found, real = pairs.counts
    if not found or not real:
        return _score_of_an_empty_map(found, real)
    inner = pairs.inner()
    return 0.5 * (_weighted_dice(inner.T, pairs.real_areas, pairs.found_areas)
                  + _weighted_dice(inner, pairs.found_areas, pairs.real_areas))


def _weighted_dice(overlap, areas, other_areas):
    """sum_i w_i Dice(O_i, partner(O_i)) over the objects of the rows of `overlap` (rows: these objects,
    columns: the other map's), w_i = |O_i| / sum |O|, the partner overlapping most; no overlap: Dice 0."""
    best = overlap.argmax(axis=1)
    shared = overlap[np.arange(len(areas)), best]
    dice = 2.0 * shared / (areas + other_areas[best])
    return float((areas / areas.sum() * dice).sum())


def hausdorff(a, b):
    """Hausdorff distance in pixels between two non-empty masks: the largest distance from a pixel of one to
    the nearest pixel of the other."""
    from scipy import ndimage
    to_b = ndimage.distance_transform_edt(~b)
    to_a = ndimage.distance_transform_edt(~a)
    return float(max(to_b[a].max(), to_a[b].max()))


def object_hausdorff(segmented, truth):
    """GlaS object Hausdorff distance: 1/2 [sum_i g_i H(G_i, S*(G_i)) + sum_j s_j H(G*(S_j), S_j)], weights as
    in object_dice, * the object overlapping most or, where none overlaps, the nearest by Hausdorff distance.
    NaN when either map is empty (the distance to nothing is undefined)."""
    return pairs_hausdorff(ObjectPairs(segmented, truth))


def pairs_hausdorff(pairs):
    found, real = pairs.counts
    if not found or not real:
        return float("nan")
    inner = pairs.inner()
    real_side = _weighted_hausdorff(inner.T, (pairs.real, pairs.real_boxes, pairs.real_areas),
                                    (pairs.found, pairs.found_boxes))
    found_side = _weighted_hausdorff(inner, (pairs.found, pairs.found_boxes, pairs.found_areas),
                                     (pairs.real, pairs.real_boxes))
    return float(0.5 * (real_side + found_side))


def _weighted_hausdorff(overlap, own, other):
    """sum_i w_i H(O_i, partner(O_i)) over one map's objects (`own`: numbered map, boxes, areas), each paired
    with the object of the `other` map (numbered map, boxes) that overlaps it most, or the nearest one."""
    numbered, boxes, areas = own
    other_numbered, other_boxes = other
    weights = areas / areas.sum()
    total = 0.0
    for index in range(len(areas)):
        if overlap[index].max() > 0:
            partner = int(overlap[index].argmax())
            distance = _boxed_hausdorff(numbered, index, boxes[index], other_numbered, partner, other_boxes[partner])
        else:
            distance = _nearest_hausdorff(numbered, index, boxes[index], other_numbered, other_boxes)
        total += weights[index] * distance
    return total


def _boxed_hausdorff(numbered, index, box, other_numbered, partner, other_box):
    """H between object index + 1 of `numbered` and object partner + 1 of `other_numbered`, inside the box
    around both: every pixel of either lies in it, so the distances are those of the whole image."""
    top, bottom = min(box[0], other_box[0]), max(box[1], other_box[1])
    left, right = min(box[2], other_box[2]), max(box[3], other_box[3])
    window = (slice(top, bottom), slice(left, right))
    return hausdorff(numbered[window] == index + 1, other_numbered[window] == partner + 1)


def _nearest_hausdorff(numbered, index, box, other_numbered, other_boxes):
    """The smallest H from object index + 1 to any object of the other map (the first of equals). Every
    candidate is bounded below by the gap between the two bounding boxes (no pixel of one is nearer to the
    other), so candidates are tried nearest box first and the search stops once no box can do better."""
    row_gap = np.maximum(0, np.maximum(other_boxes[:, 0] - box[1], box[0] - other_boxes[:, 1]) + 1)
    column_gap = np.maximum(0, np.maximum(other_boxes[:, 2] - box[3], box[2] - other_boxes[:, 3]) + 1)
    bounds = np.hypot(row_gap, column_gap)
    best, best_partner = math.inf, -1
    for partner in np.lexsort((np.arange(len(bounds)), bounds)):
        if bounds[partner] > best:
            break
        distance = _boxed_hausdorff(numbered, index, box, other_numbered, partner, other_boxes[partner])
        if distance < best or (distance == best and partner < best_partner):
            best, best_partner = distance, partner
    return best


def aggregated_jaccard_index(segmented, truth):
    """MoNuSeg's Aggregated Jaccard Index (Kumar et al., IEEE TMI 2017, Algorithm 1) of a segmented instance map
    against the ground truth (0 = background):

        AJI = sum_i |G_i ∩ S*(G_i)| / ( sum_i |G_i ∪ S*(G_i)| + sum_{S unused} |S| ),

    S*(G_i) the segmented object of largest IoU with ground-truth object G_i (the first of equals); a segmented
    object may be the partner of several G_i, and "unused" are those that are nobody's partner. A G_i that no
    segmented object overlaps has no partner and adds its own area to the union. NaN when both maps are empty,
    0 when only one is."""
    return pairs_aji(ObjectPairs(segmented, truth))


def pairs_aji(pairs):
    found, real = pairs.counts
    if not found or not real:
        return _score_of_an_empty_map(found, real)
    inner = pairs.inner().astype(np.float64)
    unions = pairs.found_areas[:, None] + pairs.real_areas[None, :] - inner  # > 0: every object has pixels
    iou = inner / unions
    columns = np.arange(real)
    partners = iou.argmax(axis=0)                   # per ground-truth object; the first of equals
    matched = iou[partners, columns] > 0
    intersection = inner[partners[matched], columns[matched]].sum()
    union = unions[partners[matched], columns[matched]].sum() + pairs.real_areas[~matched].sum()
    used = np.zeros(found, bool)
    used[partners[matched]] = True
    union += pairs.found_areas[~used].sum()
    return float(intersection / union)


def object_scores(segmented, truth):
    """AJI, object F1, object Dice and object Hausdorff of one pair of instance maps, from one pairing."""
    pairs = ObjectPairs(segmented, truth)
    return {"AJI": pairs_aji(pairs), "object F1": pairs_f1(pairs), "object Dice": pairs_dice(pairs),
            "object Hausdorff": pairs_hausdorff(pairs)}
