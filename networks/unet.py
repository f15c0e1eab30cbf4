"""U-Net (Ronneberger et al., MICCAI 2015), the baseline of the CE-Net paper's tables.

Two changes from the 2015 paper, both standard in re-implementations and in the CE-Net
comparison: padded 3x3 convolutions, so the output has the input's size and needs no cropping,
and BatchNorm after every convolution. Input sides must be multiples of 16 (four poolings).
"""
import torch
import torch.nn as nn

DEPTH = 4


def _double_conv(in_channels, out_channels):
    # No conv bias: the BatchNorm right after it has its own shift.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UpStep(nn.Module):
    """2x2 transposed conv halving the channels, concatenation with the skip, double conv."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, 2, stride=2)
        self.conv = _double_conv(in_channels // 2 + out_channels, out_channels)

    def forward(self, x, skip):
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """Widths base, 2*base, ..., 16*base; returns ``num_classes`` channels of logits."""

    def __init__(self, num_classes=1, in_channels=3, base=64):
        super().__init__()
        self.num_classes = num_classes
        widths = [base * 2 ** level for level in range(DEPTH + 1)]
        self.pool = nn.MaxPool2d(2)
        self.down = nn.ModuleList([_double_conv(in_channels, widths[0])])
        self.down.extend(_double_conv(widths[i], widths[i + 1]) for i in range(DEPTH))
        self.up = nn.ModuleList(UpStep(widths[i + 1], widths[i]) for i in reversed(range(DEPTH)))
        self.classifier = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x):
        skips = []
        for level, block in enumerate(self.down):
            if level > 0:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for step in self.up:
            x = step(x, skips.pop())
        return self.classifier(x)
