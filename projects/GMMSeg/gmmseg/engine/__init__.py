"""Training engine: the trainer and a launcher that also runs multi-process on CPU (gloo)."""

from .launch import launch
from .trainer import GMMSegTrainer, wrap_distributed

__all__ = ["GMMSegTrainer", "launch", "wrap_distributed"]
