"""Installs GMMSeg-D2's packages from ``projects/GMMSeg``, Detectron2-project style: ``gmmseg`` (the runtime)
and ``gmmseg_datasets`` (offline dataset generation and preparation, used by ``datasets/prepare_*.py``).

The dependency stack (torch, torchvision, detectron2, ...) is installed by ``tools/install.py`` from the
pins in ``requirements/pins.txt``; ``install_requires`` stays empty so that an existing torch/detectron2
is never replaced behind the user's back.
"""

from setuptools import find_packages, setup

setup(
    name="gmmseg",
    version="0.1.0",
    description="GMMSeg: Gaussian-mixture generative semantic segmentation for Detectron2",
    package_dir={"": "projects/GMMSeg"},
    packages=find_packages(
        "projects/GMMSeg", include=["gmmseg", "gmmseg.*", "gmmseg_datasets", "gmmseg_datasets.*"]
    ),
    python_requires=">=3.10",
)
