"""Detectron2 evaluators for GMMSeg (segmentation quality, posterior calibration, anomaly segmentation)."""

from .anomaly import AnomalyEvaluator
from .anomaly_ranking import anomaly_metrics
from .calibration import expected_calibration_error, plot_reliability_diagram
from .score_histogram import ScoreHistogram
from .sem_seg import SemSegEvaluator, confusion_matrix, segmentation_metrics

__all__ = [
    "AnomalyEvaluator",
    "ScoreHistogram",
    "SemSegEvaluator",
    "anomaly_metrics",
    "confusion_matrix",
    "expected_calibration_error",
    "plot_reliability_diagram",
    "segmentation_metrics",
]
