"""Pure-PyTorch core of GMMSeg (no Detectron2 import): Gaussian log-likelihoods, Sinkhorn, memory, EM."""

from .classifier import GaussianMixtureClassifier, unfitted_std
from .diagnostics import MixtureDiagnostics, mean_angle_degrees, mixture_statistics
from .em import GMMFit, e_step, fit_gmm, kmeans_plusplus, m_step, m_step_from_statistics
from .gaussian import diag_gaussian_log_prob
from .memory import FeatureMemory, gather_from_all_processes, linspace_indices
from .online_em import EMBatch, EStep, OnlineGMM
from .precision import autocast_active, float32_region
from .sinkhorn import normalize_by_max_abs, sinkhorn

__all__ = [
    "EMBatch",
    "EStep",
    "FeatureMemory",
    "GMMFit",
    "GaussianMixtureClassifier",
    "MixtureDiagnostics",
    "OnlineGMM",
    "diag_gaussian_log_prob",
    "e_step",
    "autocast_active",
    "fit_gmm",
    "float32_region",
    "gather_from_all_processes",
    "kmeans_plusplus",
    "linspace_indices",
    "m_step",
    "m_step_from_statistics",
    "mean_angle_degrees",
    "mixture_statistics",
    "normalize_by_max_abs",
    "sinkhorn",
    "unfitted_std",
]
