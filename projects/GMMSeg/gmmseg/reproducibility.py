"""Same seed, same numbers on any x86-64 CPU: pin Intel MKL's code branch before torch loads it.

Why: on CPU, GMMSeg's Gaussian log-likelihoods (``gmm.gaussian``) and the EM steps are matrix products that
PyTorch hands to MKL's ``sgemm``, and MKL chooses its kernels by CPU vendor and instruction set: AVX-512
kernels on an Intel CPU that has them, AVX2 ones on an Intel CPU without, one generic path on AMD CPUs. The
kernels round differently, so the same GMMSeg run trains to different weights on an Intel and on an AMD
machine (the softmax DeepLabV3+ model does not call MKL and was unaffected). MKL's Conditional Numerical
Reproducibility (CNR) fixes the branch when ``MKL_CBWR`` is set before MKL's first call.

Why ``COMPATIBLE`` and not ``AVX2``: MKL's documentation says branches other than ``AUTO`` and
``COMPATIBLE`` exist only on Intel CPUs; on an AMD CPU, or an Intel one without AVX2, ``MKL_CBWR=AVX2``
silently falls back to ``AUTO`` (``MKL_VERBOSE=1`` prints ``CNR:AUTO``: measured on an AMD EPYC with torch
2.13's MKL 2024.2), which keeps the vendor-dependent path. ``COMPATIBLE`` is a single SSE2 path (without
the approximate ``rcpps``/``rsqrtps``) on every x86-64 CPU. Measured: 20 GMMSeg iterations give identical
weights and GMM memory natively on AMD and with MKL made to take its Intel AVX-512, AVX2 and SSE4.2 paths
(``tests/test_reproducibility.py``); under ``AVX2`` or ``AUTO``, AMD and Intel differ in 211 of 238
tensors. The cost is small (``benchmarks/mkl_cbwr.py``).

What this does not pin: PyTorch's own vectorised kernels (``ATEN_CPU_CAPABILITY``) and oneDNN's
convolutions (``ONEDNN_MAX_CPU_ISA``) also pick code by instruction set, for every model: an AVX-512 and an
AVX2-only CPU train to different numbers. Results also change with the number of threads (oneDNN splits
reductions by thread), so reproducibility needs the same thread count (``OMP_NUM_THREADS``).

Opt out: ``GMMSEG_MKL_CBWR=off`` leaves ``MKL_CBWR`` alone (MKL's fastest, machine-dependent dispatch), and
a ``MKL_CBWR`` set by the user (e.g. ``AUTO``: deterministic on one machine) is kept as it is.

This module imports no torch: entry points call :func:`pin_mkl_branch` before anything loads torch.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

__all__ = ["DEFAULT_BRANCH", "OPT_OUT_VARIABLE", "mkl_branch", "pin_mkl_branch"]

DEFAULT_BRANCH = "COMPATIBLE"
OPT_OUT_VARIABLE = "GMMSEG_MKL_CBWR"
_OFF = {"off", "0", "false", "no", "none"}
# MKL_CBWR_* branch constants (mkl_cbwr_get(MKL_CBWR_BRANCH)); 1 is MKL_CBWR_BRANCH_OFF, CNR not enabled
_BRANCHES = {0: "OFF", 1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1"}
_BRANCHES.update({8: "SSE4_2", 9: "AVX", 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 14: "AVX512_E1"})

logger = logging.getLogger(__name__)


def _branch_name(value: str) -> str:
    """``"BRANCH=AVX2,STRICT"`` -> ``"AVX2"``: the branch part of an ``MKL_CBWR`` value."""
    first = value.split(",")[0].strip().upper()
    return first.split("=", 1)[1].strip() if first.startswith("BRANCH=") else first


def mkl_branch() -> str | None:
    """The CNR branch MKL is running (``"COMPATIBLE"``, ``"AUTO"``, ``"OFF"``, ...), or None where that
    cannot be read (a torch without MKL). Loads torch, and fixes MKL's branch if MKL has not run yet.

    It asks MKL itself (``mkl_serv_cbwr_get``, exported by ``libtorch_cpu``) because ``MKL_CBWR`` only says
    what was asked for: MKL falls back to ``AUTO`` without a word for a branch the CPU cannot take."""
    import torch

    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        get = ctypes.CDLL(path).mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    get.restype = ctypes.c_int
    code = int(get(1))  # MKL_CBWR_BRANCH
    return _BRANCHES.get(code, f"branch {code}")


def pin_mkl_branch(default: str = DEFAULT_BRANCH) -> str | None:
    """Set ``MKL_CBWR`` to ``default`` unless the user set it or opted out (``GMMSEG_MKL_CBWR=off``);
    return the value in effect (None when unset).

    MKL reads ``MKL_CBWR`` at its first call, so this must run before torch does any MKL work: in practice
    first thing in an entry point, before importing torch or Detectron2. If torch is already loaded, MKL's
    branch is checked and a warning is logged when it is not the requested one."""
    if os.environ.get(OPT_OUT_VARIABLE, "").strip().lower() in _OFF:
        return os.environ.get("MKL_CBWR") or None
    if not os.environ.get("MKL_CBWR"):
        os.environ["MKL_CBWR"] = default
    value = os.environ["MKL_CBWR"]
    if "torch" in sys.modules:
        running = mkl_branch()
        if running is None:
            logger.warning(
                "torch was imported before gmmseg.reproducibility.pin_mkl_branch(): MKL_CBWR=%s may not "
                "take effect, and CPU results may then differ between Intel and AMD machines",
                value,
            )
        elif running != _branch_name(value):
            logger.warning(
                "MKL is running CNR branch %s, not MKL_CBWR=%s: MKL had already run before "
                "pin_mkl_branch(), or the CPU cannot take that branch (branches other than AUTO and "
                "COMPATIBLE exist on Intel CPUs only); CPU results may differ between machines",
                running,
                value,
            )
    return value
