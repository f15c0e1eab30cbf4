"""CE-Net (Gu et al., IEEE TMI 2019) and its Table VI ablations as one parameterised network.

Encoder: ResNet-34 without its pooling/classifier. Context extractor: DAC and/or RMP (or an
Inception block for the comparison rows). Decoder: four residual-summed decoder blocks and a
transposed-convolution head. The forward pass returns logits; the loss and the predictor apply
the sigmoid/softmax, which keeps BCE-with-logits stable and bf16 autocast safe.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

CONTEXTS = ("none", "dac", "dac_noatrous", "rmp", "dac_rmp", "inception", "inception_res")

ENCODER_CHANNELS = (64, 128, 256, 512)
RMP_POOL_SIZES = (2, 3, 5, 6)


class ResNet34Encoder(nn.Module):
    """torchvision's ResNet-34 minus avgpool/fc.

    The submodule names are torchvision's own, so an ImageNet state dict loads into this module
    without renaming a single key.
    """

    def __init__(self, in_channels=3):
        super().__init__()
        resnet = torchvision.models.resnet34(weights=None)
        self.conv1 = resnet.conv1
        if in_channels != 3:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4

    def forward(self, x):
        """Return [e1, e2, e3, e4] at strides 4, 8, 16, 32."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        e1 = self.layer1(x)
        e2 = self.layer2(e1)
        e3 = self.layer3(e2)
        e4 = self.layer4(e3)
        return [e1, e2, e3, e4]


def _zero_conv_biases(module):
    # The context blocks add their branches onto the encoder features; zero biases make each
    # branch start as a pure function of its input rather than adding a random constant shift.
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d) and layer.bias is not None:
            nn.init.zeros_(layer.bias)


class DACBlock(nn.Module):
    """Dense Atrous Convolution block (paper Fig. 3): four cascaded branches plus the identity.

    With dilations (1, 3, 5) the branches see receptive fields of 3, 7, 9 and 19 pixels of the
    stride-32 map. ``dilations=(1, 1, 1)`` gives the "DAC w/o atrous" ablation with the same
    parameter count.
    """

    def __init__(self, channels=512, dilations=(1, 3, 5)):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = (
            nn.Conv2d(channels, channels, 3, padding=rate, dilation=rate) for rate in dilations)
        # One 1x1 projection shared by the three longer branches, as in the paper's Fig. 3.
        self.project = nn.Conv2d(channels, channels, 1)
        _zero_conv_biases(self)

    def forward(self, x):
        a = self.conv1(x)
        ab = self.conv2(a)
        abc = self.conv3(ab)
        branch1 = F.relu(a)
        branch2 = F.relu(self.project(self.conv2(x)))
        branch3 = F.relu(self.project(ab))
        branch4 = F.relu(self.project(abc))
        return x + branch1 + branch2 + branch3 + branch4


def _pool_to_at_least_one_cell(x, size):
    # A window larger than the map would be an error in max_pool2d; clamping it per side turns
    # it into a global max along that side, which is the limit of the pooling it stands for.
    # At the paper's 448 px input (14 x 14 map) no clamping happens.
    kernel = (min(size, x.shape[-2]), min(size, x.shape[-1]))
    return F.max_pool2d(x, kernel_size=kernel, stride=kernel)


class RMPBlock(nn.Module):
    """Residual Multi-kernel Pooling (paper Fig. 4): four max-pool scales, one shared 1x1 conv to
    a single channel each, upsampled and concatenated with the input (C -> C + 4).

    The four pooled maps come first and the input last, as in the authors' released model: the
    decoder's first 1x1 conv sees channels in this order, so their weights only fit this order."""

    def __init__(self, channels=512, pool_sizes=RMP_POOL_SIZES):
        super().__init__()
        self.pool_sizes = tuple(pool_sizes)
        self.conv = nn.Conv2d(channels, 1, 1)
        _zero_conv_biases(self)

    @property
    def out_channels_added(self):
        return len(self.pool_sizes)

    def forward(self, x):
        size = x.shape[-2:]
        maps = []
        for pool in self.pool_sizes:
            pooled = self.conv(_pool_to_at_least_one_cell(x, pool))
            maps.append(bilinear_resize(pooled, size))
        return torch.cat(maps + [x], dim=1)


def bilinear_resize(x, size):
    """F.interpolate(x, size, mode="bilinear", align_corners=False), as two matrix products.

    The values are the same up to float rounding. The reason is the backward: PyTorch's CUDA kernel for
    bilinear upsampling adds gradients atomically, in any order, and has no deterministic variant, so
    DETERMINISTIC runs would stop at it; a matrix product's backward is deterministic."""
    rows = _linear_weights(x.shape[-2], size[0], x)
    columns = _linear_weights(x.shape[-1], size[1], x)
    return torch.einsum("nchw,hy,wx->ncyx", x, rows, columns)


def _linear_weights(source, target, like):
    """(source, target) matrix W of 1-D linear interpolation: resized = original @ W. Row i is where input
    sample i goes, obtained by resizing the unit vector e_i with PyTorch's own kernel (a forward pass,
    which is deterministic), so the two agree on every convention (half-pixel centres, edge clamping)."""
    unit_vectors = torch.eye(source, dtype=like.dtype, device=like.device)[None]
    return F.interpolate(unit_vectors, size=target, mode="linear", align_corners=False)[0]


def _conv_relu(in_channels, out_channels, kernel_size):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
                         nn.ReLU(inplace=True))


class InceptionBlock(nn.Module):
    """Inception-v1-style block on the 512-channel stride-32 map (Table VI comparison rows).

    The paper names the block but gives no widths, so this is a design choice made to mirror
    DAC: four parallel branches whose receptive fields grow like DAC's (1x1; 1x1->3x3;
    1x1->3x3->3x3, i.e. 5x5; 3x3 max-pool->1x1), each 128 channels with ReLU, concatenated back
    to 512 and fused by a 1x1 conv + ReLU, so input and output widths equal DAC's. Unlike DAC it
    has no dilation, which is the point of the comparison. ``residual=True`` adds the input
    (the Inception-ResNet row).
    """

    def __init__(self, channels=512, residual=False):
        super().__init__()
        width = channels // 4
        self.residual = residual
        self.branch1 = _conv_relu(channels, width, 1)
        self.branch3 = nn.Sequential(_conv_relu(channels, width, 1), _conv_relu(width, width, 3))
        self.branch5 = nn.Sequential(_conv_relu(channels, width, 1), _conv_relu(width, width, 3),
                                     _conv_relu(width, width, 3))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1),
                                         _conv_relu(channels, width, 1))
        self.fuse = _conv_relu(4 * width, channels, 1)
        _zero_conv_biases(self)

    def forward(self, x):
        branches = [self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)]
        out = self.fuse(torch.cat(branches, dim=1))
        return x + out if self.residual else out


class DecoderBlock(nn.Module):
    """1x1 reduce to a quarter, 3x3 transposed conv (x2 upsampling), 1x1 to out_channels;
    each followed by BN + ReLU. The quarter-width bottleneck keeps the decoder light."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        mid = in_channels // 4
        self.reduce = nn.Conv2d(in_channels, mid, 1)
        self.norm1 = nn.BatchNorm2d(mid)
        self.upsample = nn.ConvTranspose2d(mid, mid, 3, stride=2, padding=1, output_padding=1)
        self.norm2 = nn.BatchNorm2d(mid)
        self.expand = nn.Conv2d(mid, out_channels, 1)
        self.norm3 = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        x = F.relu(self.norm1(self.reduce(x)))
        x = F.relu(self.norm2(self.upsample(x)))
        return F.relu(self.norm3(self.expand(x)))


def _head(num_classes):
    """Stride-2 map -> full resolution logits."""
    return nn.Sequential(
        nn.ConvTranspose2d(ENCODER_CHANNELS[0], 32, 4, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(32, num_classes, 3, padding=1),
    )


def _context_blocks(context, channels):
    """(dac, inception, rmp) for a context name; absent blocks are None."""
    if context not in CONTEXTS:
        raise ValueError(f"unknown context {context!r}; expected one of {', '.join(CONTEXTS)}")
    dac = None
    if context in ("dac", "dac_rmp"):
        dac = DACBlock(channels, dilations=(1, 3, 5))
    elif context == "dac_noatrous":
        dac = DACBlock(channels, dilations=(1, 1, 1))
    inception = None
    if context in ("inception", "inception_res"):
        inception = InceptionBlock(channels, residual=context == "inception_res")
    rmp = RMPBlock(channels) if context in ("rmp", "dac_rmp") else None
    return dac, inception, rmp


class CENet(nn.Module):
    """CE-Net (context="dac_rmp") and the Table VI rows: "none" is the Backbone (ResNet-34 encoder
    + decoder), "dac", "dac_noatrous", "rmp", "inception", "inception_res" add one extractor.

    Input sides must be multiples of 32; the output has the input's height and width and
    ``num_classes`` channels of logits.
    """

    def __init__(self, num_classes=1, in_channels=3, context="dac_rmp"):
        super().__init__()
        self.num_classes = num_classes
        self.context_name = context
        c1, c2, c3, c4 = ENCODER_CHANNELS
        self.encoder = ResNet34Encoder(in_channels)
        self.dac, self.inception, self.rmp = _context_blocks(context, c4)
        context_channels = c4 + (self.rmp.out_channels_added if self.rmp is not None else 0)
        self.decoder4 = DecoderBlock(context_channels, c3)
        self.decoder3 = DecoderBlock(c3, c2)
        self.decoder2 = DecoderBlock(c2, c1)
        self.decoder1 = DecoderBlock(c1, c1)
        self.head = _head(num_classes)

    def encode(self, x):
        """[e1, e2, e3, e4]: 64, 128, 256, 512 channels at strides 4, 8, 16, 32."""
        return self.encoder(x)

    def context(self, e4):
        """The context extractor applied to the deepest encoder map."""
        for block in (self.dac, self.inception, self.rmp):
            if block is not None:
                e4 = block(e4)
        return e4

    def forward(self, x):
        e1, e2, e3, e4 = self.encode(x)
        d4 = self.decoder4(self.context(e4)) + e3
        d3 = self.decoder3(d4) + e2
        d2 = self.decoder2(d3) + e1
        d1 = self.decoder1(d2)
        return self.head(d1)
