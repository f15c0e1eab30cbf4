"""Training losses of CE-Net: the paper's Dice loss (Eq. 2), cross-entropy, and their sum.

Every loss takes ``forward(logits, target)``:

* ``logits``: float tensor (N, K, H, W). K = 1 is a binary task (sigmoid of the single
  foreground channel); K >= 2 is a multi-class task (softmax over dim 1).
* ``target``: integer class map (N, H, W), uint8 or int64, values in [0, K-1] for K >= 2
  and in {0, 1} for K = 1 (1 = foreground).

and returns a float32 scalar. Logits are cast to float32 first, so a loss called inside
``torch.autocast(dtype=torch.bfloat16)`` sums in full precision.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage

from errors import UserError
from networks import probabilities

LOSSES = ("dice", "bce", "ce", "dice_bce", "varce", "weighted_bce_dice", "weighted_bce_cldice")


def check_logits_and_target(logits, target):
    """Validate a (logits, target) pair and return the channel count K.

    Raises ValueError when logits are not (N, K, H, W), when target is not an integer
    (N, H, W) map with the same N, H, W, or when a target value lies outside the classes
    the logits describe ({0, 1} for K = 1, [0, K-1] for K >= 2). The value check raises
    ValueError for CPU tensors; on an accelerator it is a device-side assert (RuntimeError
    at the next synchronisation), so training steps need no host sync.
    """
    if not torch.is_tensor(logits) or not torch.is_tensor(target):
        raise ValueError("logits and target must be torch tensors")
    if logits.ndim != 4:
        raise ValueError(f"logits must have shape (N, K, H, W), got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    n, k, h, w = logits.shape
    if k < 1:
        raise ValueError("logits have no channels (K = 0)")
    if target.ndim != 3 or tuple(target.shape) != (n, h, w):
        raise ValueError(
            f"target must have shape (N, H, W) = {(n, h, w)} to match logits {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}")
    if target.is_floating_point() or target.is_complex():
        raise ValueError(f"target must be an integer class map (uint8 or int64), got {target.dtype}")
    highest = 1 if k == 1 else k - 1
    expected = "binary task (K = 1) expects {0, 1}" if k == 1 else f"K = {k} classes expect [0, {k - 1}]"
    out_of_range = ((target < 0) | (target > highest)).any()
    if target.device.type == "cpu":
        if bool(out_of_range):
            found = (int(target.min()), int(target.max()))
            raise ValueError(f"target values span {found}, but the logits' {expected}")
    else:
        # A host-side check would stall every training step until the GPU catches up; the
        # device-side assert keeps the step asynchronous and still stops on a bad label map.
        torch._assert_async(~out_of_range, f"target values out of range: the logits' {expected}")
    return k


def probabilities_and_one_hot(logits, target):
    """Float32 probabilities p and one-hot target g, both (N, C, H, W).

    K = 1: p = sigmoid(logits) and g = target, one foreground channel (C = 1).
    K >= 2: p = softmax(logits, dim=1) and g = one_hot(target), all K classes (C = K).
    """
    probs = probabilities(logits.float())
    if logits.shape[1] == 1:
        return probs, target.unsqueeze(1).float()
    one_hot = torch.zeros_like(probs).scatter_(1, target.long().unsqueeze(1), 1.0)
    return probs, one_hot


class DiceLoss(nn.Module):
    """Dice loss of the CE-Net paper (Eq. 2), with additive smoothing s:

        L = 1 - sum_k w_k * (2 * sum_i p_ik g_ik + s) / (sum_i p_ik^2 + sum_i g_ik^2 + s),
        w_k = 1 / K,

    where p = sigmoid(logits) for K = 1 (the foreground channel alone) or softmax(logits)
    for K >= 2 (every class, background included), and g is the one-hot target. The index
    i runs over every pixel of every image in the batch ("batch Dice"): one ratio per class
    for the whole batch rather than a mean of per-image ratios, so an image with no
    foreground does not yield a 0/0 term of its own.

    With ``smooth=0`` this is exactly Eq. 2; the default ``smooth=1`` keeps the loss finite
    (and equal to 1 - 1 = 0 for a confident empty prediction) when a class is absent from
    both target and prediction.
    """

    def __init__(self, smooth=1.0):
        super().__init__()
        if smooth < 0:
            raise ValueError(f"smooth must be >= 0, got {smooth}")
        self.smooth = float(smooth)

    def forward(self, logits, target):
        check_logits_and_target(logits, target)
        probs, one_hot = probabilities_and_one_hot(logits, target)
        dims = (0, 2, 3)
        intersection = (probs * one_hot).sum(dims)
        denominator = (probs * probs).sum(dims) + (one_hot * one_hot).sum(dims)
        dice_per_class = (2.0 * intersection + self.smooth) / (denominator + self.smooth)
        return 1.0 - dice_per_class.mean()


class BCELoss(nn.Module):
    """Binary cross-entropy for K = 1, averaged over all N * H * W pixels:

        L = -mean_i [ g_i * log(sigmoid(x_i)) + (1 - g_i) * log(1 - sigmoid(x_i)) ],

    computed from the logits x directly (log-sum-exp form) for numerical stability.
    """

    def forward(self, logits, target):
        if check_logits_and_target(logits, target) != 1:
            raise ValueError(f"BCELoss needs one logit channel (K = 1), got K = {logits.shape[1]}; "
                             "use CELoss for multi-class logits")
        return F.binary_cross_entropy_with_logits(logits[:, 0].float(), target.float())


class CELoss(nn.Module):
    """Cross-entropy for K >= 2, averaged over all N * H * W pixels:

        L = -mean_i log softmax(x_i)[g_i] = -mean_i sum_k g_ik log softmax(x_i)_k   (g: one-hot target).

    Computed in the one-hot form: F.cross_entropy's CUDA kernel (NLLLoss) has no deterministic variant,
    so DETERMINISTIC runs would stop at it."""

    def forward(self, logits, target):
        if check_logits_and_target(logits, target) < 2:
            raise ValueError("CELoss needs K >= 2 logit channels, got K = 1; use BCELoss for binary logits")
        log_probs = F.log_softmax(logits.float(), dim=1)
        one_hot = torch.zeros_like(log_probs).scatter_(1, target.long().unsqueeze(1), 1.0)
        return -(log_probs * one_hot).sum(1).mean()


class DiceBCELoss(nn.Module):
    """Dice loss plus pixel-wise cross-entropy, unweighted:

        L = L_Dice + L_BCE   (K = 1)
        L = L_Dice + L_CE    (K >= 2)

    The cross-entropy term is picked from the logits' channel count at each call.
    """

    def __init__(self, smooth=1.0):
        super().__init__()
        self.dice = DiceLoss(smooth)
        self.bce = BCELoss()
        self.ce = CELoss()

    def forward(self, logits, target):
        cross_entropy = self.bce if logits.ndim == 4 and logits.shape[1] == 1 else self.ce
        return self.dice(logits, target) + cross_entropy(logits, target)


class VarianceConstrainedCELoss(nn.Module):
    """FullNet's variance-constrained cross-entropy (Qu et al., MICCAI 2019), which asks the pixels of one
    object to agree:

        L = CE + alpha * mean_n [ mean_{i in instances(n)} sum_k Var_{x in i} p_k(x) ]

    CE is BCE for K = 1 and softmax cross-entropy for K >= 2; p_k are the predicted probabilities (for K = 1 the
    two channels 1 - p and p, so the sum is 2 Var(p)); Var is the population variance over the pixels of
    instance i. Instances come from an instance label map (N, H, W) when given (0 = no instance), otherwise
    from the target: the 8-connected components of each foreground class. The pixels of one instance that the
    target puts in different classes are separate instances here (an inside and its contour band), and those of
    the background class are left out. An image without instances adds 0.
    """

    uses_instances = True  # the trainer passes a dataset's instance maps (framework.Trainer)

    def __init__(self, alpha=1.0):
        super().__init__()
        self.alpha = alpha
        self.bce = BCELoss()
        self.ce = CELoss()

    def forward(self, logits, target, instances=None):
        classes = check_logits_and_target(logits, target)
        cross_entropy = (self.bce if classes == 1 else self.ce)(logits, target)
        probs = probabilities(logits.float())
        if classes == 1:
            probs = torch.cat([1 - probs, probs], dim=1)
        if instances is None:
            instances = connected_instances(target)
        elif tuple(instances.shape) != tuple(target.shape):
            raise ValueError(f"instances must have the target's shape {tuple(target.shape)}, "
                             f"got {tuple(instances.shape)}")
        groups = instance_class_groups(instances.to(target.device), target, classes)
        return cross_entropy + self.alpha * mean_instance_variance(probs, groups.to(probs.device))


def instance_class_groups(instances, target, classes):
    """(N, H, W) ids of the pixel groups varCE asks to agree: one per instance and target class, so an object
    labelled in parts (FullNet's nuclei: an inside and a contour band) has each part agree with itself, not the
    parts with each other. Pixels of background class (0) in an instance, or of no instance, get 0."""
    kinds = max(classes, 2)
    return torch.where((instances > 0) & (target > 0), instances.long() * kinds + target.long(),
                       torch.zeros_like(instances, dtype=torch.long))


def connected_instances(target):
    """(N, H, W) int64 instance map: the 8-connected components of every foreground class of each image of
    `target` (class 0 is background), numbered 1, 2, ... per image; 0 where there is no instance."""
    classes = target.detach().cpu().numpy()
    instances = np.zeros(classes.shape, np.int64)
    eight_connected = np.ones((3, 3), bool)
    for index, image in enumerate(classes):
        count = 0
        for value in np.unique(image[image > 0]):
            components, found = ndimage.label(image == value, structure=eight_connected)
            instances[index][components > 0] = components[components > 0] + count
            count += found
    return torch.from_numpy(instances).to(target.device)


def mean_instance_variance(probs, instances):
    """mean over images of (mean over the image's instances of sum_k Var p_k), vectorised over all instances of
    the batch: every instance gets a batch-wide id, and sums per id are index_add-ed (two passes: the mean, then
    the squared deviations, which stays exact where E[p^2] - E[p]^2 would cancel)."""
    n, channels = probs.shape[:2]
    device, dtype = probs.device, probs.dtype
    per_image = instances.flatten(1).long()
    last_ids = torch.cumsum(per_image.amax(dim=1), 0)          # image n owns ids (last_ids[n-1], last_ids[n]]
    offsets = last_ids - per_image.amax(dim=1)
    ids = torch.where(per_image > 0, per_image + offsets[:, None], torch.zeros_like(per_image)).flatten()
    total = int(last_ids[-1]) + 1
    values = probs.permute(0, 2, 3, 1).reshape(-1, channels)
    counts = torch.zeros(total, device=device, dtype=dtype).index_add_(0, ids, torch.ones_like(values[:, 0]))
    means = torch.zeros(total, channels, device=device, dtype=dtype).index_add_(0, ids, values)
    means = means / counts.clamp(min=1)[:, None]
    squared = (values - means[ids]) ** 2
    variances = torch.zeros(total, channels, device=device, dtype=dtype).index_add_(0, ids, squared)
    variances = variances.sum(1) / counts.clamp(min=1)
    every_id = torch.arange(total, device=device)
    present = (counts > 0) & (every_id > 0)
    owner = torch.searchsorted(last_ids, every_id)[present]
    per_image_sum = torch.zeros(n, device=device, dtype=dtype).index_add_(0, owner, variances[present])
    per_image_count = torch.zeros(n, device=device, dtype=dtype).index_add_(0, owner, torch.ones_like(owner, dtype=dtype))
    return (per_image_sum / per_image_count.clamp(min=1)).mean()


# --- U-Net's border weight map (Ronneberger et al., MICCAI 2015) and the loss that uses it ----------------

BORDER_CELLS = ("background", "foreground")  # which class the cells are (BORDER_CELLS in constants.py)


def border_weight_map(label, w0=10.0, sigma=5.0, cells="background"):
    """U-Net's weight map of a binary label (H, W), float32 (H, W):

        w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))   on pixels of no cell,
        w(x) = w_c(x)                                                 inside a cell,

    cells = the 4-connected components of the `cells` class ("background": the regions the foreground
    membranes separate, as in ISBI 2012, where class 1 is the membrane; "foreground": the objects
    themselves); d1, d2 = Euclidean distances (px) to the nearest and second-nearest cell; w_c(x) = n / (2 n_k)
    for the class k of x, n_k its pixels in this label and n all of them (the two classes then weigh the
    same in total, and the mean of w_c is 1). The border term is kept to the pixels between cells, the
    separation borders the paper means: inside a cell d1 = 0, and the term would weigh the cell's own rim.
    With one cell or none, d2 is infinite and the term 0."""
    label = np.asarray(label) > 0
    if cells not in BORDER_CELLS:
        raise UserError(f"unknown border cells {cells!r}; choose one of: {', '.join(BORDER_CELLS)}")
    in_cell = ~label if cells == "background" else label
    weights = class_balance_weights(label)
    if w0 > 0:
        d1, d2 = nearest_two_distances(in_cell, reach=math.ceil(5 * sigma))
        border = w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma ** 2))
        weights = weights + np.where(in_cell, 0.0, border)
    return weights.astype(np.float32)


def class_balance_weights(label):
    """w_c(x) = n / (2 n_k) for the class k in {0, 1} of each pixel of a bool map (a class absent: unused)."""
    total, foreground = label.size, int(np.count_nonzero(label))
    background = total - foreground
    on = total / (2 * foreground) if foreground else 1.0
    off = total / (2 * background) if background else 1.0
    return np.where(label, on, off)


def nearest_two_distances(in_cell, reach):
    """(d1, d2) float64 (H, W): the distances to the nearest and the second-nearest 4-connected component
    of `in_cell`, infinite beyond `reach` px. Each cell's distance map is computed only in its bounding box
    widened by `reach` (which holds every pixel nearer than `reach`), so the cost grows with the cells' size,
    not with their number times the image; at 5 sigma the border term left out is below w0 * exp(-12.5)."""
    cells, count = ndimage.label(in_cell)
    d1 = np.full(in_cell.shape, np.inf)
    d2 = np.full(in_cell.shape, np.inf)
    for index, box in enumerate(ndimage.find_objects(cells), start=1):
        window = tuple(slice(max(0, side.start - reach), side.stop + reach) for side in box)
        distance = ndimage.distance_transform_edt(cells[window] != index)
        distance[distance > reach] = np.inf
        # Insert into the sorted pair (d1 <= d2): the new second is the larger of d1 and it, if smaller.
        d2[window] = np.minimum(d2[window], np.maximum(d1[window], distance))
        d1[window] = np.minimum(d1[window], distance)
    return d1, d2


class WeightedBCEDiceLoss(nn.Module):
    """Dice plus U-Net's weighted binary cross-entropy (K = 1):

        L = L_Dice + sum_i w_i l_i / sum_i w_i,   l_i = -[g_i log p_i + (1 - g_i) log(1 - p_i)],

    w the border weight map of each training label (`border_weight_map`: the gaps between cells weigh up to
    w0 more). The weighted mean keeps the BCE on the scale of an unweighted one, and pixels of weight 0 (moved
    in from outside the frame by the augmentation) do not count. The trainer computes the maps once per
    training label at the training resolution and moves them with the labels through crops and augmentation
    (`uses_weight_map`); called without `weights`, the loss computes them from the target it is given."""

    uses_weight_map = True

    def __init__(self, w0=10.0, sigma=5.0, cells="background"):
        super().__init__()
        if w0 < 0 or sigma <= 0:
            raise UserError(f"border weights need w0 >= 0 and sigma > 0, got w0 {w0} and sigma {sigma}")
        if cells not in BORDER_CELLS:
            raise UserError(f"unknown border cells {cells!r}; choose one of: {', '.join(BORDER_CELLS)}")
        self.w0, self.sigma, self.cells = float(w0), float(sigma), cells
        self.dice = DiceLoss()

    def weight_maps(self, labels):
        """(N, H, W) float32 tensor of border weight maps of the (N, H, W) labels, computed on the CPU."""
        maps = [border_weight_map(label, self.w0, self.sigma, self.cells) for label in labels.detach().cpu().numpy()]
        return torch.from_numpy(np.stack(maps)) if maps else torch.zeros(labels.shape)

    def forward(self, logits, target, weights=None):
        if check_logits_and_target(logits, target) != 1:
            raise ValueError(f"WeightedBCEDiceLoss needs one logit channel (K = 1), got K = {logits.shape[1]}")
        if weights is None:
            weights = self.weight_maps(target)
        elif tuple(weights.shape) != tuple(target.shape):
            raise ValueError(f"weights must have the target's shape {tuple(target.shape)}, got {tuple(weights.shape)}")
        weights = weights.to(device=logits.device, dtype=torch.float32)
        pixel_losses = F.binary_cross_entropy_with_logits(logits[:, 0].float(), target.float(), reduction="none")
        weighted = (weights * pixel_losses).sum() / weights.sum().clamp(min=torch.finfo(torch.float32).tiny)
        return self.dice(logits, target) + weighted


def soft_erode(x):
    """Grey-level erosion of (N, 1, H, W) maps by a 3 x 3 cross: the minimum of the pixel and its four
    neighbours (pixels outside the frame do not count)."""
    across = -F.max_pool2d(-x, (1, 3), stride=1, padding=(0, 1))
    down = -F.max_pool2d(-x, (3, 1), stride=1, padding=(1, 0))
    return torch.minimum(across, down)


def soft_dilate(x):
    """Grey-level dilation of (N, 1, H, W) maps by a 3 x 3 square (pixels outside the frame do not count)."""
    return F.max_pool2d(x, 3, stride=1, padding=1)


def soft_skeleton(x, iterations):
    """Soft skeleton of (N, 1, H, W) maps in [0, 1] (Shit et al., clDice, CVPR 2021):

        s_0 = relu(x - open(x)),   x_j = erode(x_{j-1}),
        s_j = s_{j-1} + relu(d_j - s_{j-1} d_j),   d_j = relu(x_j - open(x_j)),   j = 1 .. iterations,

    open = dilate(erode(.)). On a binary map it is the union of what each opening of the eroded map removes:
    the middle line of a band up to 2 * iterations + 1 pixels wide (one pixel wide for an odd width, two for
    an even one), short of the band's ends by about half its width; a wider band leaves no line."""
    skeleton = F.relu(x - soft_dilate(soft_erode(x)))
    for _ in range(iterations):
        x = soft_erode(x)
        delta = F.relu(x - soft_dilate(soft_erode(x)))
        skeleton = skeleton + F.relu(delta - skeleton * delta)
    return skeleton


def cl_dice(probs, target, iterations, valid=None, smooth=1.0):
    """Centreline Dice of foreground maps (N, 1, H, W) in [0, 1]:

        T_prec = (sum S_P V_L + s) / (sum S_P + s),   T_sens = (sum S_L V_P + s) / (sum S_L + s),
        clDice = 2 T_prec T_sens / (T_prec + T_sens),

    P the predicted and L the true map, S their soft skeletons, V the maps themselves; sums over the batch
    and over the pixels where `valid` (same shape) is 1. T_sens falls where a true centreline crosses a gap
    in the prediction (a broken membrane), T_prec where a predicted centreline runs through a true cell."""
    valid = torch.ones_like(target) if valid is None else valid
    pred_skeleton = soft_skeleton(probs, iterations) * valid
    true_skeleton = soft_skeleton(target, iterations) * valid
    precision = ((pred_skeleton * target).sum() + smooth) / (pred_skeleton.sum() + smooth)
    sensitivity = ((true_skeleton * probs).sum() + smooth) / (true_skeleton.sum() + smooth)
    return 2.0 * precision * sensitivity / (precision + sensitivity)


class WeightedBCEClDiceLoss(WeightedBCEDiceLoss):
    """Dice, U-Net's border-weighted BCE and a topology term (K = 1):

        L = L_Dice + L_wBCE + lambda * (1 - clDice),

    clDice (`cl_dice`) of the foreground (the membranes of isbi2012) over the pixels of non-zero border weight,
    with `iterations` erosions (the skeleton reaches bands up to 2 * iterations + 1 px wide). The term
    punishes a gap in a thin structure by the length of centreline it cuts, not by its few pixels."""

    def __init__(self, w0=10.0, sigma=5.0, cells="background", weight=0.5, iterations=10):
        super().__init__(w0, sigma, cells)
        if weight < 0 or iterations < 1:
            raise UserError(f"clDice needs weight >= 0 and iterations >= 1, got {weight} and {iterations}")
        self.weight, self.iterations = float(weight), int(iterations)

    def forward(self, logits, target, weights=None):
        if weights is None:
            weights = self.weight_maps(target)
        base = super().forward(logits, target, weights)
        probs = torch.sigmoid(logits.float())
        valid = (weights > 0).to(device=logits.device, dtype=torch.float32).unsqueeze(1)
        topology = cl_dice(probs, target.unsqueeze(1).float(), self.iterations, valid)
        return base + self.weight * (1.0 - topology)


def build_loss(name, num_classes, border_w0=10.0, border_sigma=5.0, border_cells="background"):
    """The loss called ``name`` (one of LOSSES) for a model with ``num_classes`` outputs; the border_*
    settings (BORDER_W0, BORDER_SIGMA, BORDER_CELLS) shape the weight map of "weighted_bce_dice".

    Raises UserError for an unknown name, or for a cross-entropy that does not fit the
    task: "bce" and the "weighted_bce_*" losses need num_classes = 1 and "ce" needs num_classes >= 2.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    key = str(name).strip().lower()
    if key not in LOSSES:
        raise UserError(f"unknown loss {name!r}; choose one of: {', '.join(LOSSES)}")
    if key == "bce" and num_classes != 1:
        raise UserError(f"loss 'bce' is for binary models (1 output channel), but this model has "
                        f"{num_classes} classes; use 'ce' (or 'dice_bce', which switches to CE)")
    if key == "ce" and num_classes == 1:
        raise UserError("loss 'ce' needs at least 2 classes, but this model has 1 output channel; "
                        "use 'bce' (or 'dice_bce')")
    if key == "dice":
        return DiceLoss()
    if key == "bce":
        return BCELoss()
    if key == "ce":
        return CELoss()
    if key == "varce":
        return VarianceConstrainedCELoss()
    if key in ("weighted_bce_dice", "weighted_bce_cldice"):
        if num_classes != 1:
            raise UserError(f"loss '{key}' weighs the borders of binary maps (1 output channel), but "
                            f"this model has {num_classes} classes; use 'dice_bce'")
        weighted = WeightedBCEDiceLoss if key == "weighted_bce_dice" else WeightedBCEClDiceLoss
        return weighted(border_w0, border_sigma, border_cells)
    return DiceBCELoss()
