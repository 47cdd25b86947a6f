"""The set-up script: pins, the sdist patch, the detectron2._C stand-in, and the idempotent fast path."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import install  # noqa: E402


def _load_standin():
    spec = importlib.util.spec_from_file_location(
        "standin", REPO / "tools" / "install" / "detectron2_C_standin.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pins_cover_the_stack_in_one_place():
    pins = install.read_pins()
    for name in (
        "torch",
        "torchvision",
        "pb1-detectron2",
        "pillow",
        "fvcore",
        "iopath",
        "pycocotools",
        "opencv-python-headless",
        "scipy",
        "scikit-learn",
        "matplotlib",
        "tensorboard",
        "pytest",
        "maskformer2",
        "timm",
        "h5py",
    ):
        assert name in pins, name
    assert pins["torch"].startswith("torch===")  # exact match: never the local +cpu wheel
    assert install.pinned_version(pins["pillow"]).startswith("9.")  # detectron2 v0.6 needs pillow<10


def test_bad_pin_line_is_reported(tmp_path):
    bad = tmp_path / "pins.txt"
    bad.write_text("torch>=2\n")
    with pytest.raises(install.StepFailed, match="torch>=2"):
        install.read_pins(bad)


def test_standin_ops_raise_naming_the_op():
    standin = _load_standin()
    with pytest.raises(NotImplementedError, match="'deform_conv_forward' is unavailable"):
        standin.deform_conv_forward(1, 2)
    with pytest.raises(NotImplementedError, match="'box_iou_rotated'"):
        standin.box_iou_rotated()
    with pytest.raises(AttributeError):
        standin.__path__  # noqa: B018  (not a package: import machinery must see that)
    assert "stand-in" in standin.get_compiler_version() and standin.has_cuda() is False


def test_installed_detectron2_imports_and_reports_missing_ops_clearly():
    import detectron2
    from detectron2 import _C

    assert detectron2.__version__.startswith("0.6")
    if getattr(_C, "IS_STANDIN", False):
        import torch
        from detectron2.layers.rotated_boxes import pairwise_iou_rotated

        with pytest.raises(NotImplementedError, match="'box_iou_rotated' is unavailable"):
            pairwise_iou_rotated(torch.zeros(1, 5), torch.zeros(1, 5))


def test_sdist_patch_drops_extensions_and_adds_standin(tmp_path):
    (tmp_path / "detectron2").mkdir()
    (tmp_path / "setup.py").write_text(
        "setup(\n    ext_modules=get_extensions(),\n"
        '    cmdclass={"build_ext": torch.utils.cpp_extension.BuildExtension},\n)\n'
    )
    install._patch_sdist_setup(tmp_path)
    text = (tmp_path / "setup.py").read_text()
    assert "ext_modules=[]," in text and "cmdclass" not in text
    assert (tmp_path / "detectron2" / "_C.py").read_text().startswith('"""Stand-in for ``detectron2._C``')
    with pytest.raises(install.StepFailed, match="no longer contains"):
        install._patch_sdist_setup(tmp_path)  # already patched: the expected text is gone


def test_second_run_takes_the_fast_path():
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "install.py")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "environment up to date" in proc.stdout or "environment ready" in proc.stdout


def test_maskformer2_patch_drops_url_requirements_and_the_cuda_extension(tmp_path, monkeypatch):
    monkeypatch.delenv("GMMSEG_MASK2FORMER_CUDA_OPS", raising=False)
    (tmp_path / "setup.py").write_text(
        "setup(\n"
        "    install_requires=[\n"
        '        "detectron2 @ https://github.com/facebookresearch/detectron2/archive/v0.6.zip",\n'
        '        "scipy>=1.7.3",\n'
        '        "panopticapi @ https://github.com/xvjiarui/panopticapi/archive/master.zip",\n'
        '        "lvis @ https://github.com/lvis-dataset/lvis-api/archive/master.zip",\n'
        "    ],\n"
        "    ext_modules=get_extensions(),\n"
        ")\n"
    )
    install._patch_maskformer2_setup(tmp_path)
    text = (tmp_path / "setup.py").read_text()
    assert "@ https://" not in text and '"scipy>=1.7.3"' in text
    assert "ext_modules=[]," in text
    with pytest.raises(install.StepFailed, match="three URL requirements"):
        install._patch_maskformer2_setup(tmp_path)  # already patched: the sdist is not what we expect


def test_every_project_package_is_installed_and_checked():
    """setup.py installs each top-level package of projects/GMMSeg, and step_gmmseg checks each one, so an
    environment installed before a package was added gets it on the next run."""
    from setuptools import find_packages

    top_level = {p for p in find_packages(str(REPO / "projects" / "GMMSeg")) if "." not in p}
    assert set(install.PROJECT_PACKAGES) == top_level == {"gmmseg", "gmmseg_datasets"}
    setup_text = (REPO / "setup.py").read_text()
    for package in install.PROJECT_PACKAGES:
        assert f'"{package}", "{package}.*"' in setup_text
