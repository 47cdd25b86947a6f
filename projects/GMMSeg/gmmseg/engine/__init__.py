"""Training engine: the trainer, the config set-up every entry point uses, and a launcher that also runs
multi-process on CPU (gloo; ``gmmseg.compat``)."""

from gmmseg.compat import launch

from .setup_cfg import load_cfg, register_datasets, setup_cfg
from .trainer import GMMSegTrainer

__all__ = ["GMMSegTrainer", "launch", "load_cfg", "register_datasets", "setup_cfg"]
