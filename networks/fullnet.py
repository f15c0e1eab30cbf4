"""FullNet (Qu et al., "Improving Nuclei/Gland Instance Segmentation in Histopathology Images by Full
Resolution Neural Network and Spatial Constrained Loss", MICCAI 2019), the full-resolution comparison network.

The opposite design to CE-Net's: no pooling and no striding anywhere, so every feature map keeps the input's
resolution; the receptive field grows through dilated convolutions instead. A 3x3 convolution to 24 channels,
then 7 dense blocks of 6 layers (growth rate 24; each layer a dilated 3x3 convolution, LeakyReLU, BatchNorm and
dropout 0.1, its output concatenated to its input), each block followed by a 1x1 transition convolution that
halves the channels, and a final 3x3 convolution to the output channels.

The blocks' dilation rates (1, 2, 4, 8, 16, 4, 1) are "hybrid": within a block the layers use rates that share
no common factor (rate 2 -> 1, 2, 3, 1, 2, 3), so that stacked dilated convolutions leave no pixel unseen (the
gridding artefact of a constant rate).
"""
import torch
import torch.nn as nn

FIRST_CHANNELS = 24
GROWTH_RATE = 24
LAYERS_PER_BLOCK = 6
COMPRESSION = 0.5
DROPOUT = 0.1
BLOCK_RATES = (1, 2, 4, 8, 16, 4, 1)
HYBRID_DILATIONS = {
    1: (1, 1, 1, 1, 1, 1),
    2: (1, 2, 3, 1, 2, 3),
    4: (1, 2, 3, 5, 6, 7),
    8: (2, 5, 7, 9, 11, 14),
    16: (10, 13, 16, 17, 19, 21),
}


class DenseLayer(nn.Module):
    """Dilated 3x3 conv -> LeakyReLU -> BatchNorm -> dropout; returns the input with the new maps appended."""

    def __init__(self, in_channels, growth_rate, dilation, dropout):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, growth_rate, 3, padding=dilation, dilation=dilation)
        self.act = nn.LeakyReLU(inplace=True)
        self.norm = nn.BatchNorm2d(growth_rate)
        self.drop = nn.Dropout2d(dropout) if dropout else nn.Identity()

    def forward(self, x):
        return torch.cat([x, self.drop(self.norm(self.act(self.conv(x))))], dim=1)


class DenseBlock(nn.Sequential):
    """LAYERS_PER_BLOCK dense layers at the hybrid dilations of `rate`, then the channel-halving 1x1 transition."""

    def __init__(self, in_channels, rate, growth_rate=GROWTH_RATE, dropout=DROPOUT):
        layers, channels = [], in_channels
        for dilation in HYBRID_DILATIONS[rate]:
            layers.append(DenseLayer(channels, growth_rate, dilation, dropout))
            channels += growth_rate
        self.out_channels = int(channels * COMPRESSION)
        layers.append(nn.Conv2d(channels, self.out_channels, 1))
        super().__init__(*layers)


class FullNet(nn.Module):
    """Returns `num_classes` channels of logits at the input's resolution, for any input size."""

    def __init__(self, num_classes=1, in_channels=3, block_rates=BLOCK_RATES):
        super().__init__()
        self.num_classes = num_classes
        self.first = nn.Conv2d(in_channels, FIRST_CHANNELS, 3, padding=1)
        blocks, channels = [], FIRST_CHANNELS
        for rate in block_rates:
            blocks.append(DenseBlock(channels, rate))
            channels = blocks[-1].out_channels
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Conv2d(channels, num_classes, 3, padding=1)

    def forward(self, x):
        return self.classifier(self.blocks(self.first(x)))
