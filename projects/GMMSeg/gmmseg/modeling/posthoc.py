"""Statistics of a trained softmax model's penultimate features, for post-hoc scores.

Two post-hoc models use them: the Mahalanobis anomaly baseline (``anomaly_scores.MahalanobisStats``) and
the paper's "GMM fitted after softmax training" ablation (``PosthocGMM``): per class, a mixture of K
diagonal Gaussians fitted by maximum-likelihood EM to the frozen features, which then replaces the softmax
classifier (uniform class prior, class score = best component, as GMMSeg) and gives the same anomaly score
``-max_c log p(x|c)``. The paper reports 31.6 vs 46.0 mIoU for this against GMMSeg on ADE20K: features
trained for a linear softmax are not Gaussian per class.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader
from detectron2.modeling import build_model
from detectron2.structures import ImageList
from torch import Tensor

from gmmseg.gmm import diag_gaussian_log_prob, fit_gmm

__all__ = [
    "PosthocGMM",
    "fit_posthoc_gmm",
    "labelled_penultimate_features",
    "statistics_config",
    "training_set_features",
]


def statistics_config(config_file: str, opts: list[str]) -> CfgNode:
    """The frozen, validated config of a trained softmax model whose statistics are to be fitted; the
    post-hoc test keys are cleared (the files they name are what is being made)."""
    from gmmseg import setup_cfg  # loads the glue (models); set-up registers the datasets

    cleared = ["TEST.ANOMALY_SCORES", "[]", "TEST.MAHALANOBIS_STATS", "", "TEST.POSTHOC_GMM", ""]
    return setup_cfg(config_file, [*opts, *cleared])


def training_set_features(cfg: CfgNode, max_images: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """``labelled_penultimate_features`` of the model ``cfg`` describes (weights ``MODEL.WEIGHTS``) over
    its first training set, read without augmentation."""
    from gmmseg.data.dataset_mapper import TrainLabelsMapper

    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    mapper = TrainLabelsMapper(cfg, is_train=False)
    loader = build_detection_test_loader(cfg, cfg.DATASETS.TRAIN[0], mapper=mapper)
    head = cfg.MODEL.SEM_SEG_HEAD
    yield from labelled_penultimate_features(model, loader, head.NUM_CLASSES, head.IGNORE_VALUE, max_images)


def labelled_penultimate_features(
    model: torch.nn.Module, loader, num_classes: int, ignore_value: int, max_images: int | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """For each image of ``loader`` (batches with ``sem_seg``), the features that enter the head's
    ``predictor`` layer at the head's resolution, (P, F) float64, and their labels (P,) (downsampled by
    nearest neighbour; ignored and out-of-range pixels dropped)."""
    predictor = getattr(model.sem_seg_head, "predictor", None)
    if not isinstance(predictor, torch.nn.Module):
        raise ValueError("the model's head has no `predictor` layer: post-hoc statistics need a softmax head")
    captured: list[Tensor] = []
    handle = predictor.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0].detach()))
    logger = logging.getLogger("gmmseg")
    try:
        with torch.no_grad():
            seen = 0
            for index, batch in enumerate(loader):
                captured.clear()
                # the training forward's preprocessing: normalise, pad images and labels alike
                divisibility = model.backbone.size_divisibility
                images = [(x["image"].to(model.device) - model.pixel_mean) / model.pixel_std for x in batch]
                images = ImageList.from_tensors(images, divisibility)
                targets = [x["sem_seg"].to(model.device) for x in batch]
                targets = ImageList.from_tensors(targets, divisibility, pad_value=ignore_value).tensor
                model.sem_seg_head(model.backbone(images.tensor))
                for feats, target in zip(captured[-1], targets):
                    if max_images is not None and seen >= max_images:
                        return
                    f, h, w = feats.shape
                    labels = F.interpolate(target[None, None].float(), size=(h, w), mode="nearest")
                    labels = labels.long().reshape(-1)
                    keep = (labels >= 0) & (labels < num_classes)
                    yield feats.reshape(f, h * w).T.double()[keep], labels[keep]
                    seen += 1
                if index % 100 == 0:
                    logger.info("penultimate features: %d images", seen)
    finally:
        handle.remove()


class PosthocGMM:
    """Per-class mixtures (means, stds (C, K, F)) over a softmax model's penultimate features."""

    def __init__(self, means: Tensor, stds: Tensor) -> None:
        if means.shape != stds.shape or means.dim() != 3:
            raise ValueError(
                f"means and stds must both be (C, K, F), got {tuple(means.shape)}, {tuple(stds.shape)}"
            )
        self.means, self.stds = means.float(), stds.float()

    @classmethod
    def load(cls, path: str) -> PosthocGMM:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            return cls(state["means"], state["stds"])
        except (OSError, KeyError, RuntimeError) as err:
            raise ValueError(
                f"{path}: not a post-hoc GMM file (tools/fit_posthoc_gmm.py writes one): {err}"
            ) from err

    def save(self, path: str) -> None:
        torch.save({"means": self.means, "stds": self.stds}, path)

    def class_scores(self, features: Tensor) -> Tensor:
        """Best-component log-likelihood of each class, ``log p(x|c)`` as GMMSeg scores classes:
        (N, F, h, w) features -> (N, C, h, w)."""
        num_classes, k, dim = self.means.shape
        n, f, h, w = features.shape
        if f != dim:
            raise ValueError(f"the post-hoc GMM has {dim}-d mixtures but the features have {f} channels")
        means, stds = self.means.to(features.device), self.stds.to(features.device)
        flat = features.permute(0, 2, 3, 1).reshape(-1, f).float()
        comp = diag_gaussian_log_prob(flat, means.reshape(-1, dim), stds.reshape(-1, dim))
        return comp.view(n, h, w, num_classes, k).amax(dim=-1).permute(0, 3, 1, 2)


def fit_posthoc_gmm(
    features: list[Tensor], num_components: int, *, seed: int = 0, n_iters: int = 100, **kwargs: Any
) -> PosthocGMM:
    """Fit one K-component diagonal GMM (uniform weights, as GMMSeg's) per class to ``features[c]``
    (N_c, F) by maximum-likelihood EM; a class without features raises ValueError."""
    generator = torch.Generator().manual_seed(seed)
    means, stds = [], []
    for c, x in enumerate(features):
        if x.shape[0] < num_components:
            raise ValueError(
                f"class {c} has {x.shape[0]} features, fewer than the {num_components} components"
            )
        fit = fit_gmm(x, num_components, n_iters, learn_weights=False, generator=generator, **kwargs)
        means.append(fit.means)
        stds.append(fit.stds)
    return PosthocGMM(torch.stack(means), torch.stack(stds))
