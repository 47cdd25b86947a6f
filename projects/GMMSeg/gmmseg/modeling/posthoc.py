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
from detectron2.structures import ImageList
from torch import Tensor

from gmmseg.gmm import GaussianMixtureClassifier, fit_gmm

__all__ = ["PosthocGMM", "fit_posthoc_gmm", "labelled_penultimate_features"]


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

    def classifier(self) -> GaussianMixtureClassifier:
        """The fitted mixtures as GMMSeg's classifier (class score = best component)."""
        num_classes, k, dim = self.means.shape
        clf = GaussianMixtureClassifier(num_classes, k, dim)
        clf.update_parameters(self.means, self.stds)
        return clf


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
