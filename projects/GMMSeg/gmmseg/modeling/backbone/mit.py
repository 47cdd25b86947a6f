"""SegFormer's Mix Transformer encoder (MiT-B0 ... B5) as a Detectron2 backbone, built on timm's PVTv2.

MiT and PVTv2 share one design: overlapping patch embeddings (a 7x7 stride-4 convolution, then 3x3 stride-2
ones), spatial-reduction attention (keys and values from a stride-``sr`` convolution + LayerNorm), a
depth-wise 3x3 convolution between the two linear layers of the feed-forward block, and a LayerNorm after
each stage. So ``D2MixTransformer`` builds timm's ``PyramidVisionTransformerV2`` with MiT's hyper-parameters
(``MIT_VARIANTS``, read off the official ``mit_b0`` ... ``mit_b5`` definitions in NVlabs/SegFormer,
``mmseg/models/backbones/mix_transformer.py``) rather than re-implementing it, and keeps its patch embedding
and stages; timm's classification head is not built.

What had to be set for timm to equal MiT (``tests/test_segformer.py`` checks the equality in float64
against a reference written in the official structure, through ``tools/convert_mit_weights.py``):

- MLP ratio 4 in every stage and every size. timm's ``pvt_v2_b0`` ... ``b4`` use (8, 8, 4, 4), PVTv2's;
  only ``pvt_v2_b5`` has MiT's ratios, so ``timm.create_model("pvt_v2_b0")`` is *not* MiT-B0.
- LayerNorm eps: 1e-6 in the blocks (before attention and MLP) and after each stage (MiT's ``norm_layer``);
  PyTorch's default 1e-5 after the patch-embedding convolution and after the spatial-reduction convolution,
  where MiT uses a plain ``nn.LayerNorm``. timm does the same when given ``norm_layer`` with eps 1e-6; it is
  passed explicitly so that a change of timm's default cannot change the model silently.
- Stochastic depth: rates linear in the block index from 0 to ``drop_path_rate`` over all blocks, as MiT's
  (timm's ``calculate_drop_path_rates(..., stagewise=True)`` splits that same ramp per stage); the official
  sizes all use 0.1 (``MODEL.MIT.DROP_PATH_RATE``). No dropout, no attention dropout, q/kv with biases.

What still differs, with no effect on the function: timm computes attention with
``F.scaled_dot_product_attention`` (same scale, head_dim ** -0.5) and names parameters differently
(``stages.2.blocks.5.mlp.dwconv`` for MiT's ``block3.5.mlp.dwconv.dwconv``): the converter maps the names.
Initialisation matches too (truncated normal 0.02 for linear layers, He fan-out normal for convolutions).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import Tensor, nn

__all__ = ["MIT_FEATURES", "MIT_STRIDES", "MIT_VARIANTS", "D2MixTransformer", "MiTSpec"]

MIT_FEATURES = ("res2", "res3", "res4", "res5")
MIT_STRIDES = dict(zip(MIT_FEATURES, (4, 8, 16, 32)))


@dataclass(frozen=True)
class MiTSpec:
    """The hyper-parameters that tell MiT sizes apart; heads, reduction ratios and MLP ratios are shared
    by all official sizes (defaults here)."""

    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratios: tuple[float, float, float, float] = (4.0, 4.0, 4.0, 4.0)


# SegFormer Table 1 / the official mit_b* classes. MODEL.MIT.VARIANT names one.
MIT_VARIANTS: dict[str, MiTSpec] = {
    "B0": MiTSpec(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "B1": MiTSpec(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2)),
    "B2": MiTSpec(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3)),
    "B3": MiTSpec(embed_dims=(64, 128, 320, 512), depths=(3, 4, 18, 3)),
    "B4": MiTSpec(embed_dims=(64, 128, 320, 512), depths=(3, 8, 27, 3)),
    "B5": MiTSpec(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3)),
}
BLOCK_NORM_EPS = 1e-6  # MiT's norm_layer: the blocks' two LayerNorms and each stage's final one


@BACKBONE_REGISTRY.register()
class D2MixTransformer(Backbone):
    """MiT with Detectron2's backbone interface: ``{"res2": stride 4, ..., "res5": stride 32}`` features
    (NCHW, after each stage's LayerNorm) for the names in ``out_features``. Stages after the last one asked
    for are not built, as Detectron2's ResNet does. Parameter names are timm's (``patch_embed.*``,
    ``stages.<i>.{downsample,blocks,norm}.*``); ``tools/convert_mit_weights.py`` writes official weights
    under them."""

    @configurable
    def __init__(
        self,
        *,
        spec: MiTSpec,
        in_channels: int = 3,
        drop_path_rate: float = 0.1,
        out_features: tuple[str, ...] = MIT_FEATURES,
    ) -> None:
        super().__init__()
        from timm.models.pvt_v2 import PyramidVisionTransformerV2  # timm is loaded when a MiT is built

        unknown = [name for name in out_features if name not in MIT_FEATURES]
        if unknown or not out_features:
            raise ValueError(f"out_features {list(out_features)}: expected names among {MIT_FEATURES}")
        mit = PyramidVisionTransformerV2(
            in_chans=in_channels,
            num_classes=0,
            depths=spec.depths,
            embed_dims=spec.embed_dims,
            num_heads=spec.num_heads,
            sr_ratios=spec.sr_ratios,
            mlp_ratios=spec.mlp_ratios,
            qkv_bias=True,
            drop_rate=0.0,
            proj_drop_rate=0.0,
            attn_drop_rate=0.0,
            drop_path_rate=drop_path_rate,
            norm_layer=partial(nn.LayerNorm, eps=BLOCK_NORM_EPS),
        )
        num_stages = max(MIT_FEATURES.index(name) for name in out_features) + 1
        self.patch_embed = mit.patch_embed
        self.stages = nn.Sequential(*list(mit.stages)[:num_stages])
        self._out_features = [name for name in MIT_FEATURES if name in out_features]
        self._out_feature_strides = {name: MIT_STRIDES[name] for name in self._out_features}
        channels = dict(zip(MIT_FEATURES, spec.embed_dims))
        self._out_feature_channels = {name: channels[name] for name in self._out_features}

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec) -> dict:
        mit = cfg.MODEL.MIT
        return {
            "spec": MIT_VARIANTS[mit.VARIANT],
            "in_channels": input_shape.channels,
            "drop_path_rate": mit.DROP_PATH_RATE,
            "out_features": tuple(mit.OUT_FEATURES),
        }

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.patch_embed(x)  # (N, H/4, W/4, C): the first stage reads channels-last tokens
        features = {}
        for name, stage in zip(MIT_FEATURES, self.stages):
            x = stage(x)  # (N, C, H/s, W/s)
            if name in self._out_feature_strides:
                features[name] = x
        return features

    # output_shape: Detectron2's Backbone default, from _out_features and their strides and channels

    @property
    def size_divisibility(self) -> int:
        """Inputs are padded to a multiple of the coarsest stride, so every stage halves its input exactly
        and the stride-4 logits upsample back to the padded image."""
        return 32
