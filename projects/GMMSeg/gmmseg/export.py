"""Export of a trained segmentor by tracing: one image in, class posteriors and an anomaly map out.

The contract of an exported model (TorchScript ``model.ts`` or ONNX ``model.onnx``), as Detectron2's
``TracingAdapter`` (``tools/deploy/export_model.py``) sets it for its own models:

- input ``image``: one (3, H, W) float32 tensor of raw pixel values (0-255) in the config's
  ``INPUT.FORMAT`` channel order, resized as for inference (``INPUT.MIN_SIZE_TEST``) but not normalised:
  subtracting ``MODEL.PIXEL_MEAN``, dividing by ``MODEL.PIXEL_STD`` and padding to the backbone's
  ``size_divisibility`` are part of the exported graph, so any H and W work;
- output ``sem_seg``: (C, H, W) class posteriors (softmax of the head's logits), at the input's resolution;
- output ``anomaly``: (H, W) one anomaly score (higher = more anomalous) at the input's resolution: by
  default the model's first score (``TEST.ANOMALY_SCORES``, else its default): ``gmm``
  (``-max_c log p(x|c)``) for GMMSeg models, ``msp`` (``1 - max_c p(c|x)``) for softmax models;
  ``score`` names another one the model gives.

What is traced is ``PosteriorSemanticSegmentor.forward`` itself, so the exported model computes what the
eager one does; resizing the outputs to the original image size (the eager model does it when the input
carries ``height`` / ``width``) is left to the caller, as in Detectron2's exports.

Per-pixel heads (DeepLabV3+, FPN, SegFormer, softmax or GMM) trace to a graph that takes any H and W.
Three cases hold for the traced size only (``fixed_size``): sliding-window inference
(``TEST.SLIDING_WINDOW`` loops over windows in Python), the ``gmm_fullres`` score (bands of rows sized in
Python) and Mask2Former, whose deformable attention (the pure-PyTorch path here: the compiled op is
absent, and an autograd Function calling it could not be exported anyway) loops over the feature maps'
sizes in Python. Such a model is exported for, and must be run at, one image size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gmmseg.compat import tracing_adapter

__all__ = [
    "EXPORT_FORMATS",
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "ExportedModel",
    "eager_outputs",
    "export_model",
    "exported_score",
    "fixed_size",
    "load_exported",
    "max_abs_differences",
]

INPUT_NAME = "image"
OUTPUT_NAMES = ("sem_seg", "anomaly")
EXPORT_FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx"}
# the lowest ONNX opset with every operator the per-pixel models use (bilinear resize, LayerNorm)
ONNX_OPSET = 17

ExportedModel = Callable[[Tensor], tuple[Tensor, Tensor]]


def exported_score(model: nn.Module, score: str | None = None) -> str:
    """The anomaly score the export returns: ``score`` if the model gives it, else its first score."""
    names = tuple(getattr(model, "anomaly_score_names", ()))
    if not names:
        raise ValueError(f"{type(model).__name__} gives no anomaly score: it cannot be exported here")
    if score is None:
        return names[0]
    if score not in names:
        raise ValueError(f"anomaly score {score!r}: this model gives {list(names)} (TEST.ANOMALY_SCORES)")
    return score


def fixed_size(model: nn.Module, score: str | None = None) -> bool:
    """Whether the trace of ``model`` exporting ``score`` holds for the traced image size only:
    sliding-window inference, the ``gmm_fullres`` score (scored in bands of rows sized in Python), and
    Mask2Former's deformable attention (its pure-PyTorch path iterates over the feature maps' sizes)."""
    if getattr(model, "sliding_window", None) is not None or score == "gmm_fullres":
        return True
    return any(type(m).__name__ == "MSDeformAttn" for m in model.modules())


def _inference(score: str) -> Callable[[nn.Module, list[dict[str, Tensor]]], tuple[Tensor, Tensor]]:
    """What is traced: the model's own forward on one image, reduced to (posteriors, one anomaly map)."""

    def inference(model: nn.Module, inputs: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
        result = model(inputs)[0]
        return result["sem_seg"], result["anomaly_scores"][score]

    return inference


@torch.no_grad()
def eager_outputs(model: nn.Module, image: Tensor, score: str) -> tuple[Tensor, Tensor]:
    """The eager model's (posteriors, anomaly) for a (3, H, W) raw image, at the image's resolution."""
    return _inference(score)(model, [{INPUT_NAME: image}])


class _NoCompiledDeformableAttention:
    """Stands for Mask2Former's ``MSDeformAttnFunction`` without its compiled op: fails before the
    autograd Function is entered (and recorded by the tracer), so the caller falls back to
    ``ms_deform_attn_core_pytorch`` and only that is traced."""

    @staticmethod
    def apply(*args: Any) -> Tensor:
        raise RuntimeError("MultiScaleDeformableAttention is not compiled")


@contextlib.contextmanager
def _pure_pytorch_deformable_attention() -> Iterator[None]:
    """While tracing, Mask2Former's deformable attention takes its pure-PyTorch path directly (it tries the
    compiled op first, and the failed attempt would stay in the trace as a Python call)."""
    try:
        from mask2former.modeling.pixel_decoder.ops.functions import ms_deform_attn_func
        from mask2former.modeling.pixel_decoder.ops.modules import ms_deform_attn
    except ImportError:  # Mask2Former not installed
        yield
        return
    if ms_deform_attn_func.MSDA is not None:  # compiled: it cannot be traced to ONNX / TorchScript anyway
        yield
        return
    original = ms_deform_attn.MSDeformAttnFunction
    ms_deform_attn.MSDeformAttnFunction = _NoCompiledDeformableAttention
    try:
        yield
    finally:
        ms_deform_attn.MSDeformAttnFunction = original


def export_model(
    model: nn.Module,
    image: Tensor,
    output_dir: str | Path,
    fmt: str = "torchscript",
    score: str | None = None,
) -> Path:
    """Trace ``model`` (eval mode) on the (3, H, W) raw ``image`` and save it in ``output_dir`` as
    ``model.ts`` (``fmt`` "torchscript") or ``model.onnx`` ("onnx", with H and W dynamic); returns the
    file. The model is switched to eval mode and its parameters stop requiring gradients (inference only)."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {sorted(EXPORT_FORMATS)}, got {fmt!r}")
    score = exported_score(model, score)
    model.eval().requires_grad_(False)
    # in eval mode itself: the ONNX exporter restores the adapter's mode, recursively, when it is done
    adapter = tracing_adapter()(model, [{INPUT_NAME: image}], _inference(score)).eval()
    path = Path(output_dir) / EXPORT_FORMATS[fmt]
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torchscript":
        with _pure_pytorch_deformable_attention():
            traced = torch.jit.trace(adapter, (image,), check_trace=False)
        torch.jit.save(traced, str(path))
        return path
    with _pure_pytorch_deformable_attention():
        torch.onnx.export(
            adapter,
            (image,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={
                INPUT_NAME: {1: "height", 2: "width"},
                "sem_seg": {1: "height", 2: "width"},
                "anomaly": {0: "height", 1: "width"},
            },
            opset_version=ONNX_OPSET,
            dynamo=False,  # tracing, as TracingAdapter is made for (the dynamo exporter needs onnxscript)
        )
    import onnx

    onnx.checker.check_model(str(path), full_check=True)  # a well-formed graph with consistent types
    return path


def load_exported(path: str | Path) -> ExportedModel:
    """A function (3, H, W) raw image -> (posteriors, anomaly) running the exported file on the CPU:
    TorchScript through ``torch.jit.load``, ONNX through onnxruntime."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run_onnx(image: Tensor) -> tuple[Tensor, Tensor]:
            outputs = session.run(list(OUTPUT_NAMES), {INPUT_NAME: image.detach().cpu().numpy()})
            return torch.from_numpy(outputs[0]), torch.from_numpy(outputs[1])

        return run_onnx
    module = torch.jit.load(str(path), map_location="cpu")

    def run_torchscript(image: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            posteriors, anomaly = module(image)
        return posteriors, anomaly

    return run_torchscript


def max_abs_differences(
    model: nn.Module, exported: ExportedModel, images: Sequence[Tensor], score: str
) -> dict[str, Any]:
    """Largest absolute differences between the exported and the eager model's outputs over ``images``:
    ``{"sem_seg": float, "anomaly": float, "anomaly_range": float, "images": int}``; ``anomaly_range`` is
    the largest spread (max - min) of the eager anomaly maps, the scale to read the anomaly difference on.
    A shape mismatch raises ValueError."""
    worst = {"sem_seg": 0.0, "anomaly": 0.0, "anomaly_range": 0.0, "images": len(images)}
    for image in images:
        expected = eager_outputs(model, image, score)
        got = exported(image)
        for name, want, have in zip(OUTPUT_NAMES, expected, got):
            if tuple(want.shape) != tuple(have.shape):
                raise ValueError(f"{name}: exported shape {tuple(have.shape)}, eager {tuple(want.shape)}")
            diff = (want.detach().cpu().float() - have.float()).abs().max().item()
            worst[name] = max(worst[name], diff)
        spread = (expected[1].max() - expected[1].min()).item()
        worst["anomaly_range"] = max(worst["anomaly_range"], spread)
    return worst
