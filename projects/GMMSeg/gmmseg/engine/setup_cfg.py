"""Building a run's config, the one way every entry point does it: ``setup_cfg``.

``train_net.py``, ``demo.py``, the tools and the benchmarks all call ``setup_cfg(config_file, opts)``:
Detectron2's defaults, GMMSeg-D2's keys, the file (with its ``_BASE_`` chain), the command-line overrides,
then the datasets registered, the values validated and the config frozen, so that a bad value fails at
start with its key named, whichever script reads it. ``load_cfg`` is the first half, for code that only
reads a config (the benchmarks' run keys and iteration counts) and must not depend on the datasets.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from detectron2.config import CfgNode, get_cfg

from gmmseg.config import add_gmmseg_config
from gmmseg.config_validation import validate_gmmseg_config
from gmmseg.data.datasets import register_all_public_datasets
from gmmseg.data.folder_dataset import ensure_registered, register_all_folder_datasets

__all__ = ["load_cfg", "register_datasets", "setup_cfg"]


def load_cfg(config_file: str | os.PathLike, opts: Sequence[str] = ()) -> CfgNode:
    """Defaults + GMMSeg-D2's keys + ``config_file`` + ``opts`` (KEY VALUE ...): not validated, not frozen,
    no dataset registered."""
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_file(str(config_file))
    cfg.merge_from_list(list(opts))
    return cfg


def register_datasets(cfg: CfgNode) -> None:
    """Register the project's datasets: every folder under ``$DETECTRON2_DATASETS`` with a ``meta.json``
    and the paper's public datasets (lazily: nothing is read yet); then make sure each dataset ``cfg``
    names is registered, raising ``DatasetFormatError`` with the path when its folder is missing or broken.

    It reads ``$DETECTRON2_DATASETS`` now, so the variable only has to be set before set-up.
    """
    register_all_folder_datasets()
    register_all_public_datasets()
    for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST):
        ensure_registered(name)


def setup_cfg(config_file: str | os.PathLike, opts: Sequence[str] = ()) -> CfgNode:
    """The frozen config of a run: ``load_cfg``, then ``register_datasets`` and validation (raising
    ``ConfigValueError`` naming the first bad key) before anything is built or written."""
    cfg = load_cfg(config_file, opts)
    register_datasets(cfg)
    validate_gmmseg_config(cfg)
    cfg.freeze()
    return cfg
