"""Detectron2 evaluators for GMMSeg (segmentation quality, posterior calibration, anomaly segmentation)."""

from .anomaly import AnomalyEvaluator, ScoreHistogram, anomaly_metrics
from .sem_seg import (
    SemSegEvaluator,
    calibration_bins,
    confusion_matrix,
    expected_calibration_error,
    plot_reliability_diagram,
    segmentation_metrics,
)

__all__ = [
    "AnomalyEvaluator",
    "ScoreHistogram",
    "SemSegEvaluator",
    "anomaly_metrics",
    "calibration_bins",
    "confusion_matrix",
    "expected_calibration_error",
    "plot_reliability_diagram",
    "segmentation_metrics",
]
