"""Capturing a softmax head's penultimate features: the input of its ``predictor`` (classifier) layer.

Post-hoc models (the Mahalanobis score, the post-hoc GMM) read these features, both when they are fitted
(``posthoc.labelled_penultimate_features``) and at inference (``PosteriorSemanticSegmentor``). Heads do
not return them, so they are caught by a forward pre-hook on the classifier; ``PenultimateFeatures`` is
the one place that hook is registered.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["PenultimateFeatures", "penultimate_layer"]


def penultimate_layer(head: nn.Module) -> nn.Module | None:
    """The classifier layer whose input is the penultimate features: a per-pixel head's ``predictor``
    (Detectron2's softmax heads), or None when the head has none."""
    predictor = getattr(head, "predictor", None)
    return predictor if isinstance(predictor, nn.Module) else None


class PenultimateFeatures:
    """Keeps the input of ``layer`` from its last call in eval mode (training calls are not kept: nothing
    there reads them, and they would hold a batch's features between iterations).

    ``pop()`` hands the features over and forgets them, so a stale batch is never read twice; ``remove()``
    (or leaving a ``with`` block) unhooks the layer.
    """

    def __init__(self, layer: nn.Module) -> None:
        self._features: Tensor | None = None
        self._handle = layer.register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        if not module.training:
            self._features = inputs[0].detach()

    def pop(self) -> Tensor:
        """The (N, F, h, w) features of the layer's last eval call; RuntimeError when it was not called."""
        features, self._features = self._features, None
        if features is None:
            raise RuntimeError("the head's predictor was not called: no penultimate features")
        return features

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> PenultimateFeatures:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()
