"""The DigitScapes benchmark's variants: each a config and the overrides that make it differ from its pair.

``softmax`` / ``gmmseg`` are the headline pair (DeepLabV3+ R-18, the main job's protocol); the ablations
change one thing of one of them; the architecture pairs (``<arch>_softmax`` / ``<arch>_gmmseg``) are the
other heads' DigitScapes configs, trained under the same protocol (their base configs say what differs).
A variant is a GMM model when its config is a ``*_gmmseg.yaml``.
"""

from __future__ import annotations

from pathlib import Path

from runs import REPO

CONFIGS = REPO / "configs" / "digitscapes"
SOFTMAX = CONFIGS / "deeplabv3plus_R18_softmax.yaml"
GMMSEG = CONFIGS / "deeplabv3plus_R18_gmmseg.yaml"
BALANCED = ["DATALOADER.SAMPLER_TRAIN", "ClassBalancedSampler"]
BOOTSTRAPPED = ["MODEL.SEM_SEG_HEAD.LOSS_TYPE", "hard_pixel_mining"]
# The main job uses the GMMSeg authors' optimiser (AdamW, decode head at 10x, no decay on norms); this row
# trains the decode head at the backbone's rate instead (the previous protocol)
HEAD_LR_1X = ["SOLVER.HEAD_MULTIPLIER", "1.0"]
# The previous default memory (2,000 features per queue, real features only), under which the GMMSeg
# ablations were run: each of them changes one thing of "gmmseg_memory_empty", not of today's "gmmseg"
# (the authors' memory: 32,000 per queue started full of random unit vectors, the config's default).
EMPTY = ["MODEL.GMM.MEMORY_INIT", "empty", "MODEL.GMM.MEMORY_CAPACITY", "2000"]
# name -> (config, overrides, description)
VARIANTS: dict[str, tuple[Path, list[str], str]] = {
    "softmax": (SOFTMAX, [], "softmax DeepLabV3+ R18"),
    "gmmseg": (GMMSEG, [], "GMMSeg (K = 5, Sinkhorn EM, authors' memory: 32,000 started random)"),
    "gmmseg_memory_empty": (GMMSEG, EMPTY, "GMMSeg, memory 2,000 started empty (previous default)"),
    # the authors' random start with the previous default's capacity: its digit queues are flushed of the
    # random vectors within a few hundred iterations, the 32,000-slot ones not in 3,000 (README, Results)
    "gmmseg_memory_random_2k": (
        GMMSEG,
        ["MODEL.GMM.MEMORY_INIT", "random", "MODEL.GMM.MEMORY_CAPACITY", "2000"],
        "GMMSeg, memory 2,000 started full of random vectors",
    ),
    "softmax_class_balanced": (SOFTMAX, BALANCED, "softmax, class-balanced sampler"),
    "gmmseg_class_balanced": (GMMSEG, EMPTY + BALANCED, "GMMSeg (empty memory), class-balanced sampler"),
    "gmmseg_flat_stds": (
        GMMSEG, EMPTY + ["MODEL.GMM.COV_MOMENTUM", "1.0"], "GMMSeg (empty memory), stds never fitted (flat)"
    ),
    "gmmseg_no_component_loss": (
        GMMSEG, EMPTY + ["MODEL.GMM.COMPONENT_LOSS_WEIGHT", "0.0"], "GMMSeg (empty memory), no component loss"
    ),
    "gmmseg_fast_means": (
        GMMSEG,
        EMPTY + ["MODEL.GMM.MEAN_MOMENTUM", "0.9", "MODEL.GMM.UPDATE_INTERVAL", "1"],
        "GMMSeg (empty memory), fast means (momentum 0.9, M-step every iteration)",
    ),
    "softmax_head_lr1": (SOFTMAX, HEAD_LR_1X, "softmax, head lr x1 (not the authors' x10)"),
    "gmmseg_head_lr1": (
        GMMSEG, EMPTY + HEAD_LR_1X, "GMMSeg (empty memory), head lr x1 (not the authors' x10)"
    ),
    "gmmseg_K1": (GMMSEG, EMPTY + ["MODEL.GMM.NUM_COMPONENTS", "1"], "GMMSeg (empty memory), K = 1"),
    "gmmseg_vanilla_em": (
        GMMSEG, EMPTY + ["MODEL.GMM.E_STEP", "vanilla"], "GMMSeg (empty memory), vanilla EM"
    ),
    "gmmseg_memory0": (
        GMMSEG, ["MODEL.GMM.MEMORY_INIT", "empty", "MODEL.GMM.MEMORY_CAPACITY", "0"], "GMMSeg, no memory"
    ),
    "gmmseg_discriminative": (GMMSEG, ["MODEL.GMM.FIT", "backprop"], "discriminative GMMSeg (backprop)"),
    "softmax_posthoc_gmm": (SOFTMAX, [], "softmax + GMM fitted afterwards"),
    "softmax_bootstrapped": (SOFTMAX, BOOTSTRAPPED, "softmax, bootstrapped loss (hardest 20%)"),
    "gmmseg_bootstrapped": (
        GMMSEG, EMPTY + BOOTSTRAPPED, "GMMSeg (empty memory), bootstrapped loss (hardest 20%)"
    ),
    "fpn_softmax": (CONFIGS / "fpn_R18_softmax.yaml", [], "softmax FPN R18"),
    "fpn_gmmseg": (CONFIGS / "fpn_R18_gmmseg.yaml", [], "GMMSeg FPN R18"),
    "segformer_softmax": (CONFIGS / "segformer_B0_softmax.yaml", [], "softmax SegFormer MiT-B0"),
    "segformer_gmmseg": (CONFIGS / "segformer_B0_gmmseg.yaml", [], "GMMSeg SegFormer MiT-B0"),
    "upernet_softmax": (CONFIGS / "upernet_R18_softmax.yaml", [], "softmax UperNet R18"),
    "upernet_gmmseg": (CONFIGS / "upernet_R18_gmmseg.yaml", [], "GMMSeg UperNet R18"),
    "ocrnet_softmax": (CONFIGS / "ocrnet_HRNetW18_softmax.yaml", [], "softmax OCRNet HRNet-W18-Small"),
    "ocrnet_gmmseg": (CONFIGS / "ocrnet_HRNetW18_gmmseg.yaml", [], "GMMSeg OCRNet HRNet-W18-Small"),
}  # fmt: skip
HEADLINE = ("softmax", "gmmseg")
