"""Detectron2 evaluators for GMMSeg (segmentation quality and posterior calibration)."""

from .sem_seg import (
    SemSegEvaluator,
    calibration_bins,
    confusion_matrix,
    expected_calibration_error,
    plot_reliability_diagram,
    segmentation_metrics,
)

__all__ = [
    "SemSegEvaluator",
    "calibration_bins",
    "confusion_matrix",
    "expected_calibration_error",
    "plot_reliability_diagram",
    "segmentation_metrics",
]
