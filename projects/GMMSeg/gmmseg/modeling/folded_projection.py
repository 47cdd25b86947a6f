"""The GMM predictor's 1x1 projection at inference: one matrix product that writes channels-last output.

In training the projection is Detectron2's ``Conv2d`` (1x1 convolution, norm, activation), whose
(N, D, H, W) output is permuted to (N, H, W, D) for the per-pixel LayerNorm, which copies it (a permuted
tensor is not contiguous). At inference an eval-mode BatchNorm is a fixed affine map per channel, so
``norm(conv(x))`` is ``x @ W'.T + b'`` with the norm folded into the weights: one batched GEMM that reads
the (N, C_in, H*W) features as transposed matrices writes (N, H*W, D) directly, with neither the permute
copy nor the norm's pass over the features. Equal to the convolution up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d
from torch import Tensor, nn

__all__ = ["folded_weights", "project_channels_last"]


def folded_weights(conv: nn.Conv2d) -> tuple[Tensor, Tensor] | None:
    """``(W' (D, C_in), b' (D,))`` with ``norm(conv(x)) = W' x + b'`` per pixel for a 1x1 ``conv`` (and
    its Detectron2 ``norm``, if any), or None when that is not a fixed map: another kernel, stride or
    grouping, or a norm with batch statistics (training-mode BatchNorm, GroupNorm, LayerNorm, ...)."""
    if (
        tuple(conv.kernel_size) != (1, 1)
        or tuple(conv.stride) != (1, 1)
        or tuple(conv.padding) != (0, 0)
        or conv.groups != 1
    ):
        return None
    weight = conv.weight.flatten(1)
    bias = conv.bias if conv.bias is not None else weight.new_zeros(weight.shape[0])
    norm = getattr(conv, "norm", None)
    if norm is None:
        return weight, bias
    if isinstance(norm, FrozenBatchNorm2d):
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        shift = norm.bias - norm.running_mean * scale
    elif (
        isinstance(norm, nn.modules.batchnorm._BatchNorm)
        and not norm.training
        and norm.running_mean is not None
        and norm.running_var is not None
    ):
        scale = (norm.running_var + norm.eps).rsqrt()
        if norm.affine:
            scale = scale * norm.weight
        shift = -norm.running_mean * scale + (norm.bias if norm.affine else 0.0)
    else:
        return None
    return weight * scale[:, None], bias * scale + shift


def project_channels_last(conv: nn.Conv2d, x: Tensor) -> Tensor | None:
    """``activation(norm(conv(x)))`` for (N, C_in, H, W) ``x`` as (N, H, W, D), contiguous, or None when
    ``folded_weights`` cannot fold ``conv``'s norm (the caller then runs ``conv`` itself)."""
    folded = folded_weights(conv)
    if folded is None:
        return None
    weight, bias = folded
    n, _, h, w = x.shape
    # (N, H*W, C_in) transposed views: the GEMM reads them as they lie, no copy
    out = torch.baddbmm(
        bias.to(x.dtype), x.flatten(2).transpose(1, 2), weight.t().to(x.dtype).expand(n, -1, -1)
    )
    activation = getattr(conv, "activation", None)
    if activation is F.relu:
        out = out.relu_()
    elif activation is not None:
        out = activation(out)
    return out.view(n, h, w, -1)
