"""GMMSeg-D2: Gaussian-mixture generative semantic segmentation for Detectron2.

Layout:
- ``gmmseg.gmm``: the pure-PyTorch core (Gaussian log-likelihoods, Sinkhorn, memory, EM, classifier). It
  imports nothing from Detectron2, so ``import gmmseg.gmm`` works without it.
- everything else is Detectron2 glue: config keys and set-up, dataset registration, data mapper,
  evaluators, models.

The glue is loaded on first use of one of its names (``from gmmseg import setup_cfg`` does it, as does
``import gmmseg.d2``); loading it registers the project's heads and meta-architectures in Detectron2's
registries, as importing a Detectron2 project normally does. Datasets are registered by ``setup_cfg``
(``register_datasets``), an explicit step of set-up.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (all of them Detectron2 glue)
_D2_NAMES = {
    "add_gmmseg_config": "gmmseg.config",
    "validate_gmmseg_config": "gmmseg.config_validation",
    "load_cfg": "gmmseg.engine.setup_cfg",
    "register_datasets": "gmmseg.engine.setup_cfg",
    "setup_cfg": "gmmseg.engine.setup_cfg",
    "register_folder_dataset": "gmmseg.data.folder_dataset",
    "register_all_folder_datasets": "gmmseg.data.folder_dataset",
    "SemanticDatasetMapper": "gmmseg.data.dataset_mapper",
    "SemSegEvaluator": "gmmseg.evaluation.sem_seg",
}

__all__ = sorted(_D2_NAMES)


def __getattr__(name: str) -> Any:
    if name in _D2_NAMES:
        importlib.import_module("gmmseg.d2")  # registers the models once
        return getattr(importlib.import_module(_D2_NAMES[name]), name)
    raise AttributeError(f"module 'gmmseg' has no attribute {name!r}")
