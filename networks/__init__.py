"""The model registry, the logits -> probabilities head, and encoder weight loading.

Every script builds its network through ``build_model`` so that model names, titles and the
binary/multi-class output convention live in one place.
"""
import os
import sys

import torch

from errors import UserError
from networks.cenet import CENet
from networks.fullnet import FullNet
from networks.unet import UNet


def _cenet(context):
    def build(num_classes, in_channels):
        return CENet(num_classes=num_classes, in_channels=in_channels, context=context)
    return build


MODELS = {
    "cenet": _cenet("dac_rmp"),
    "backbone": _cenet("none"),
    "backbone_dac": _cenet("dac"),
    "backbone_dac_noatrous": _cenet("dac_noatrous"),
    "backbone_rmp": _cenet("rmp"),
    "backbone_inception": _cenet("inception"),
    "backbone_inception_res": _cenet("inception_res"),
    "unet": lambda num_classes, in_channels: UNet(num_classes=num_classes, in_channels=in_channels),
    "fullnet": lambda num_classes, in_channels: FullNet(num_classes=num_classes, in_channels=in_channels),
}

MODEL_TITLES = {
    "cenet": "CE-Net",
    "backbone": "Backbone",
    "backbone_dac": "Backbone+DAC",
    "backbone_dac_noatrous": "Backbone+DAC w/o atrous",
    "backbone_rmp": "Backbone+RMP",
    "backbone_inception": "Backbone+Inception block",
    "backbone_inception_res": "Backbone+Inception-ResNet block",
    "unet": "U-Net",
    "fullnet": "FullNet",
}


def build_model(name, num_classes=1, in_channels=3):
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name](num_classes, in_channels)


def probabilities(logits):
    """Binary (one channel) ends in a sigmoid, multi-class in a softmax over the class axis."""
    if logits.shape[1] == 1:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=1)


# ---------------------------------------------------------------------------------------------
# Encoder weights
# ---------------------------------------------------------------------------------------------

# Key prefixes added by DataParallel/DDP and torch.compile; encoder weights may also sit under our own
# CE-Net's "encoder." when taken from one of its checkpoints.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# The CE-Net authors' module names (CE_Net_ in their networks/cenet.py) -> this repository's CENet. Their
# released .th files are state dicts of that network saved under nn.DataParallel ("module." first).
AUTHORS_NAMES = (
    ("firstconv.", "encoder.conv1."), ("firstbn.", "encoder.bn1."),
    *((f"encoder{n}.", f"encoder.layer{n}.") for n in (1, 2, 3, 4)),
    ("dblock.dilate1.", "dac.conv1."), ("dblock.dilate2.", "dac.conv2."), ("dblock.dilate3.", "dac.conv3."),
    ("dblock.conv1x1.", "dac.project."), ("spp.conv.", "rmp.conv."),
    *((f"decoder{n}.{theirs}.", f"decoder{n}.{ours}.") for n in (1, 2, 3, 4)
      for theirs, ours in (("conv1", "reduce"), ("deconv2", "upsample"), ("conv3", "expand"))),
    ("finaldeconv1.", "head.0."), ("finalconv2.", "head.2."), ("finalconv3.", "head.4."),
)


def is_authors_state_dict(state_dict):
    """Whether a (wrapper-stripped) state dict uses the authors' names: their encoder and DAC block."""
    keys = [key for key in state_dict if isinstance(key, str)]
    return any(key.startswith("firstconv.") for key in keys) and any(key.startswith("dblock.") for key in keys)


def from_authors_names(state_dict):
    """The authors' tensor names renamed to ours; a name no rule covers is kept, so that loading reports it."""
    renamed = {}
    for key, value in state_dict.items():
        for theirs, ours in AUTHORS_NAMES:
            if key.startswith(theirs):
                key = ours + key[len(theirs):]
                break
        renamed[key] = value
    return renamed
_KEY_PREFIXES = WRAPPER_PREFIXES + ("encoder.",)
_WRAPPER_KEYS = ("state_dict", "model")


def _fetch_imagenet_state_dict():
    """torchvision's ImageNet ResNet-34 (from the torch hub cache, else downloaded).

    A module-level function so tests can replace it instead of touching the network.
    """
    import contextlib
    import io

    import torchvision
    weights = torchvision.models.ResNet34_Weights.IMAGENET1K_V1
    # torch.hub announces every download attempt on stdout; offline that line is noise next to
    # our own single warning, so it is held back and only the outcome is reported.
    with contextlib.redirect_stdout(io.StringIO()):
        return weights.get_state_dict(progress=False)


def _short_reason(error):
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    reason = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return reason if len(reason) <= 120 else reason[:117] + "..."


def strip_prefixes(key, prefixes):
    """`key` without any of `prefixes` at its start, in any order and repetition
    ('module._orig_mod.encoder.conv1.weight' -> 'conv1.weight' with all three)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                stripped = True
    return key


def _unwrap(state, label):
    """The tensor dict inside a checkpoint, with wrapper prefixes removed and fc.* dropped."""
    while isinstance(state, dict):
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if wrapper is None:
            break
        state = state[wrapper]
    if not isinstance(state, dict):
        raise UserError(f"no ResNet-34 encoder weights found in {label} (it holds a "
                        f"{type(state).__name__}, not a state dict)")
    cleaned = {}
    for key, value in state.items():
        if not isinstance(key, str) or not torch.is_tensor(value):
            continue
        key = strip_prefixes(key, _KEY_PREFIXES)
        if not key.startswith("fc."):
            cleaned[key] = value
    return cleaned


def _adapt_first_conv(weight, in_channels):
    """Turn RGB conv1 filters into filters for ``in_channels`` inputs.

    Each new input channel gets the RGB mean scaled by 3 / in_channels, so the filter's summed
    weight is unchanged: a grey image fed to the adapted filter gives exactly the response the
    RGB filter gives to that grey image copied to three channels, and the ImageNet statistics
    of bn1 stay valid.
    """
    mean = weight.mean(dim=1, keepdim=True) * (3.0 / in_channels)
    return mean.repeat(1, in_channels, 1, 1)


def _counted(key):
    # BatchNorm step counters are bookkeeping, not weights; old torchvision files lack them.
    return not key.endswith("num_batches_tracked")


def _load_into_encoder(encoder, state, label):
    """Copy matching tensors into ``encoder``; return the status line."""
    target = encoder.state_dict()
    matched = {}
    for key, value in state.items():
        if key not in target:
            continue
        expected = target[key].shape
        if key == "conv1.weight" and value.dim() == 4 and value.shape[1] == 3 and expected[1] != 3:
            value = _adapt_first_conv(value, expected[1])
        if value.shape != expected:
            raise UserError(f"pretrained weights {label}: {key} has shape {tuple(value.shape)}, "
                            f"the ResNet-34 encoder expects {tuple(expected)}")
        matched[key] = value
    wanted = [key for key in target if _counted(key)]
    loaded = [key for key in matched if _counted(key)]
    if not loaded:
        raise UserError(f"no ResNet-34 encoder weights found in {label}")
    encoder.load_state_dict(matched, strict=False)
    return f"encoder: loaded {len(loaded)}/{len(wanted)} tensors from {label}"


def _load_imagenet(encoder):
    try:
        state = _fetch_imagenet_state_dict()
    except Exception as error:  # no network, no cache, broken file: all mean "train from scratch"
        print("WARNING: ImageNet weights for ResNet-34 could not be loaded "
              f"({_short_reason(error)}); training from RANDOM initialisation. Put a ResNet-34 "
              ".pth in weights/ and pass --pretrained weights/resnet34.pth to use them.",
              file=sys.stderr)
        return "encoder: random initialisation (ImageNet weights unavailable)"
    return _load_into_encoder(encoder, _unwrap(state, "ImageNet"), "torchvision ImageNet (IMAGENET1K_V1)")


def _load_file(encoder, path):
    if not os.path.isfile(path):
        raise UserError(f"pretrained weights file {path} not found (pass a ResNet-34 .pth, "
                        "'imagenet' or 'none')")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"pretrained weights file {path} could not be read ({_short_reason(error)})")
    return _load_into_encoder(encoder, _unwrap(state, path), path)


def load_encoder_weights(model, source):
    """Initialise ``model.encoder`` from ``source``: "none", "imagenet" or a .pth path.

    Returns a one-line status for the caller to print. An unreachable ImageNet download only
    warns (stderr) and leaves the random initialisation; a bad file is a UserError.
    """
    source = "none" if source is None else str(source)
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        return f"{type(model).__name__} has no pretrained encoder; --pretrained {source} ignored"
    if source.lower() == "none":
        return "encoder: random initialisation (--pretrained none)"
    if source.lower() == "imagenet":
        return _load_imagenet(encoder)
    return _load_file(encoder, source)
