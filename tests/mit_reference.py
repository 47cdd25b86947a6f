"""A reference Mix Transformer in the structure and parameter names of SegFormer's official code
(NVlabs/SegFormer ``mmseg/models/backbones/mix_transformer.py``), written for the tests: the official
checkpoints' key layout (``patch_embed1.proj.weight``, ``block1.0.attn.kv.weight``,
``block1.0.mlp.dwconv.dwconv.weight``, ``norm1.weight``, ``head.weight``, ...) and its forward, so
that ``D2MixTransformer`` loaded through ``tools/convert_mit_weights.py`` can be compared with it output for
output.

The facts it encodes, from the official code: patch embeddings are a conv (7x7 stride 4, then 3x3 stride 2,
padding k // 2) and a LayerNorm with PyTorch's default eps 1e-5; attention has biased q and kv, a
stride-``sr`` conv + LayerNorm (eps 1e-5) for keys and values when ``sr > 1``, scale head_dim ** -0.5; the
MLP is fc1, a depth-wise 3x3 conv (with bias) on the token grid, GELU, fc2; blocks are pre-norm residual
with LayerNorm eps 1e-6; each stage ends with a LayerNorm eps 1e-6; the classifier ``head`` is a linear
layer (in the ImageNet checkpoints, not used for features). Evaluation-mode only: no stochastic depth.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

BLOCK_EPS = 1e-6


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)
        height, width = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, sr_ratio: int) -> None:
        super().__init__()
        self.heads, self.sr_ratio = heads, sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        n, tokens, dim = x.shape
        head_dim = dim // self.heads
        q = self.q(x).reshape(n, tokens, self.heads, head_dim).transpose(1, 2)
        source = x
        if self.sr_ratio > 1:
            grid = x.transpose(1, 2).reshape(n, dim, height, width)
            source = self.norm(self.sr(grid).flatten(2).transpose(1, 2))
        k, v = self.kv(source).reshape(n, -1, 2, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) * head_dim**-0.5).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(n, tokens, dim))


class DWConv(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        n, _, dim = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(n, dim, height, width)).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), height, width)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, sr_ratio: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_EPS)
        self.attn = Attention(dim, heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        x = x + self.attn(self.norm1(x), height, width)
        return x + self.mlp(self.norm2(x), height, width)


class ReferenceMiT(nn.Module):
    """``patch_embed{1..4}``, ``block{1..4}``, ``norm{1..4}`` and ``head``, as the official module."""

    def __init__(
        self,
        embed_dims: tuple[int, ...],
        depths: tuple[int, ...],
        num_heads: tuple[int, ...] = (1, 2, 5, 8),
        sr_ratios: tuple[int, ...] = (8, 4, 2, 1),
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        in_channels = 3
        for stage, (dim, depth, heads, sr) in enumerate(zip(embed_dims, depths, num_heads, sr_ratios), 1):
            kernel, stride = (7, 4) if stage == 1 else (3, 2)
            setattr(self, f"patch_embed{stage}", PatchEmbed(in_channels, dim, kernel, stride))
            blocks = nn.ModuleList(Block(dim, heads, sr, mlp_ratio) for _ in range(depth))
            setattr(self, f"block{stage}", blocks)
            setattr(self, f"norm{stage}", nn.LayerNorm(dim, eps=BLOCK_EPS))
            in_channels = dim
        self.head = nn.Linear(embed_dims[-1], num_classes)

    def forward(self, x: Tensor) -> list[Tensor]:
        """The four stage outputs, (N, C_i, H / 2^(i+1), W / 2^(i+1)), after each stage's LayerNorm."""
        outputs = []
        for stage in range(1, 5):
            tokens, height, width = getattr(self, f"patch_embed{stage}")(x)
            for block in getattr(self, f"block{stage}"):
                tokens = block(tokens, height, width)
            tokens = getattr(self, f"norm{stage}")(tokens)
            x = tokens.transpose(1, 2).reshape(len(tokens), -1, height, width)
            outputs.append(x)
        return outputs
