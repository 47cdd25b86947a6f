"""HRNet written in the structure of the official HRNet-Image-Classification code (``cls_hrnet.py``), for
tests only: its state dict has the official names (``None`` where a branch has no transition or fuse layer,
the classification head ``incre_modules`` / ``downsamp_modules`` / ``final_layer`` / ``classifier``), and its
forward returns the last stage's four branches, which ``D2HRNet`` must reproduce. Sizes are read from
timm's ``cfg_cls`` (the official experiment YAMLs' values)."""

from __future__ import annotations

from torch import Tensor, nn

EXPANSION = {"BASIC": 1, "BOTTLENECK": 4}
HEAD_CHANNELS = (32, 64, 128, 256)  # bottleneck widths of the classification head (x4 after expansion)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, relu: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))


class Block(nn.Module):
    """Basic (two 3x3) or bottleneck (1x1, 3x3, 1x1 with 4x expansion) residual block, official names."""

    def __init__(self, kind: str, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * EXPANSION[kind]
        self.conv1 = nn.Conv2d(cin, planes, 3 if kind == "BASIC" else 1, stride if kind == "BASIC" else 1,
                               1 if kind == "BASIC" else 0, bias=False)  # fmt: skip
        self.bn1 = nn.BatchNorm2d(planes)
        out2 = planes if kind == "BOTTLENECK" else cout
        self.conv2 = nn.Conv2d(planes, out2, 3, 1 if kind == "BASIC" else stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out2)
        if kind == "BOTTLENECK":
            self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = _conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if hasattr(self, "conv3"):
            out = self.bn3(self.conv3(self.relu(out)))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def _layer(kind: str, cin: int, planes: int, blocks: int) -> nn.Sequential:
    cout = planes * EXPANSION[kind]
    return nn.Sequential(*[Block(kind, cin if i == 0 else cout, planes) for i in range(blocks)])


class HighResolutionModule(nn.Module):
    """Parallel branches, then every output branch sums all inputs brought to its resolution."""

    def __init__(self, kind: str, blocks: tuple[int, ...], channels: tuple[int, ...]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(_layer(kind, c, c, b) for c, b in zip(channels, blocks))
        n = len(channels)
        self.fuse_layers = None if n == 1 else nn.ModuleList()
        for i in range(n if n > 1 else 0):
            row = nn.ModuleList()
            for j in range(n):
                if j > i:  # coarser: 1x1 conv, then nearest upsampling
                    up = nn.Upsample(scale_factor=2 ** (j - i), mode="nearest")
                    row.append(nn.Sequential(*_conv_bn(channels[j], channels[i], 1), up))
                elif j == i:
                    row.append(None)
                else:  # finer: stride-2 3x3 convs, ReLU between them, the last one to channels[i]
                    steps = [_conv_bn(channels[j], channels[j], 3, 2, relu=True) for _ in range(i - j - 1)]
                    row.append(nn.Sequential(*steps, _conv_bn(channels[j], channels[i], 3, 2)))
            self.fuse_layers.append(row)
        self.relu = nn.ReLU()

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        if self.fuse_layers is None:
            return xs
        out = []
        for i, row in enumerate(self.fuse_layers):
            total = xs[0] if i == 0 else row[0](xs[0])
            for j in range(1, len(xs)):
                total = total + (xs[j] if i == j else row[j](xs[j]))
            out.append(self.relu(total))
        return out


class ReferenceHRNet(nn.Module):
    """The official classification HRNet of size ``cfg`` (one of timm's ``cfg_cls`` entries)."""

    def __init__(self, cfg: dict, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        s1 = cfg["stage1"]
        self.layer1 = _layer(s1["block_type"], 64, s1["num_channels"][0], s1["num_blocks"][0])
        previous = [s1["num_channels"][0] * EXPANSION[s1["block_type"]]]
        for k in (2, 3, 4):
            stage = cfg[f"stage{k}"]
            channels = [c * EXPANSION[stage["block_type"]] for c in stage["num_channels"]]
            transition = nn.ModuleList()
            for i, c in enumerate(channels):
                if i < len(previous):
                    transition.append(None if c == previous[i] else _conv_bn(previous[i], c, 3, relu=True))
                else:  # a new branch: stride-2 3x3 convs from the coarsest one, the last one to c
                    steps = i + 1 - len(previous)
                    transition.append(nn.Sequential(*[
                        _conv_bn(previous[-1], c if s == steps - 1 else previous[-1], 3, 2, relu=True)
                        for s in range(steps)
                    ]))  # fmt: skip
            setattr(self, f"transition{k - 1}", transition)
            modules = [
                HighResolutionModule(stage["block_type"], stage["num_blocks"], tuple(channels))
                for _ in range(stage["num_modules"])
            ]
            setattr(self, f"stage{k}", nn.Sequential(*modules))
            previous = channels
        self.incre_modules = nn.ModuleList(
            _layer("BOTTLENECK", c, h, 1) for c, h in zip(previous, HEAD_CHANNELS)
        )
        self.downsamp_modules = nn.ModuleList(
            nn.Sequential(nn.Conv2d(4 * a, 4 * b, 3, 2, 1), nn.BatchNorm2d(4 * b), nn.ReLU())
            for a, b in zip(HEAD_CHANNELS, HEAD_CHANNELS[1:])
        )
        self.final_layer = nn.Sequential(
            nn.Conv2d(4 * HEAD_CHANNELS[-1], 2048, 1), nn.BatchNorm2d(2048), nn.ReLU()
        )
        self.classifier = nn.Linear(2048, num_classes)

    def forward(self, x: Tensor) -> list[Tensor]:
        """The four branches of the last stage (the classification head is not run)."""
        x = self.layer1(self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))))
        ys = [x]
        for k in (2, 3, 4):
            transition = getattr(self, f"transition{k - 1}")
            xs = [ys[i] if t is None else t(ys[-1]) for i, t in enumerate(transition)]  # new branch: coarsest
            ys = getattr(self, f"stage{k}")(xs)
        return ys
