"""Same seed, same numbers whichever MKL code path the CPU would take (``gmmseg.reproducibility``).

GMMSeg trains through ``train_net.py`` in one subprocess per setting (MKL reads its environment once per
process), and every tensor of ``model_final.pth`` (weights, optimizer state, the EM hook's GMM memory) must
be bit-identical between:

- the CPU's own MKL path and MKL limited to AVX2 kernels (``MKL_ENABLE_INSTRUCTIONS=AVX2``; on an Intel
  CPU with AVX-512 this is the difference between an AVX-512 and an AVX2 machine);
- on a non-Intel CPU, also MKL's Intel code paths (AVX-512, AVX2, SSE4.2), reached by pre-loading a two-line
  shim that makes MKL's vendor check (``mkl_serv_intel_cpu_true``, exported by ``libtorch_cpu``) answer
  "Intel": what the same run computes on an Intel machine. MKL dispatches on vendor before instruction set,
  so on an AMD CPU ``MKL_ENABLE_INSTRUCTIONS`` alone changes nothing and only the shim exercises the paths
  that differ. It needs a C compiler; without one those settings are left out (not the test).

The control shows that the comparison can fail: with ``MKL_CBWR=AUTO`` (MKL's own dispatch), two of the
paths above give different weights. It needs a CPU with AVX-512 and either the shim or an Intel CPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gmmseg.reproducibility import DEFAULT_BRANCH
from gmmseg_datasets.digitscapes import generate_digitscapes

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "digitscapes" / "deeplabv3plus_R18_gmmseg.yaml"
TINY = [
    *("SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "12", "SOLVER.CHECKPOINT_PERIOD", "1000"),
    *("SOLVER.WARMUP_ITERS", "1", "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(64,)"),
    *("MODEL.GMM.UPDATE_INTERVAL", "2", "MODEL.GMM.MEMORY_CAPACITY", "50", "DATASETS.TEST", "()"),
    *("TEST.EVAL_PERIOD", "0", "SEED", "3"),
]
SHIM = "int mkl_serv_intel_cpu_true(void) { return 1; }\nint mkl_serv_intel_cpu(void) { return 1; }\n"


def cpu_info() -> tuple[str, set[str]]:
    """(vendor_id, flags) of the first CPU in /proc/cpuinfo; ("", set()) where there is none."""
    vendor, flags = "", set()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return vendor, flags
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return vendor, flags


@pytest.fixture(scope="module")
def tiny_digitscapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    generate_digitscapes(str(root), seed=0, image_size=64, counts={"train": 8, "val": 0, "anomaly_val": 0})
    return root


@pytest.fixture(scope="module")
def intel_shim(tmp_path_factory) -> str | None:
    """Path of the shim library on a non-Intel Linux CPU with a C compiler, else None."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if cpu_info()[0] in ("GenuineIntel", "") or compiler is None:
        return None
    folder = tmp_path_factory.mktemp("shim")
    (folder / "shim.c").write_text(SHIM)
    lib = folder / "libmkl_intel_shim.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(lib), str(folder / "shim.c")], check=True)
    return str(lib)


def train_all(runs: dict[str, dict[str, str]], datasets: Path, out: Path) -> dict[str, dict]:
    """Train GMMSeg once per entry of ``runs`` (name -> extra environment), two at a time with one thread
    each (the same thread count everywhere), and return every tensor of each ``model_final.pth``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MKL_", "GMMSEG_MKL"))}
    base.pop("LD_PRELOAD", None)
    base.update(DETECTRON2_DATASETS=str(datasets), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    names = list(runs)
    for i in range(0, len(names), 2):
        procs = {}
        for name in names[i : i + 2]:
            cmd = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(CONFIG), *TINY]
            cmd += ["OUTPUT_DIR", str(out / name)]
            env = {**base, **runs[name]}
            procs[name] = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        for name, proc in procs.items():
            log, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, f"{name}:\n{log[-4000:]}"
    return {name: tensors(out / name / "model_final.pth") for name in names}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor in a checkpoint, by its path of keys (model, optimizer state, hooks' state)."""
    found: dict[str, torch.Tensor] = {}

    def walk(prefix: str, obj) -> None:
        if torch.is_tensor(obj):
            found[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}/{i}", v)

    walk("", torch.load(path, map_location="cpu", weights_only=False))
    return found


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert set(a) == set(b)
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.slow
def test_gmmseg_training_is_identical_across_mkl_code_paths(tiny_digitscapes, intel_shim, tmp_path):
    vendor, flags = cpu_info()
    paths = {"native": {}, "mkl_avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}}
    if intel_shim:
        paths["intel_avx512"] = {"LD_PRELOAD": intel_shim}
        paths["intel_avx2"] = {"LD_PRELOAD": intel_shim, "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
        paths["intel_sse4_2"] = {"LD_PRELOAD": intel_shim, "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
    # the control: MKL's own dispatch, on two paths that differ on this CPU
    control = None
    if "avx512f" in flags and intel_shim:
        control = ("native", "intel_avx512")
    elif "avx512f" in flags and vendor == "GenuineIntel":
        control = ("native", "mkl_avx2")
    runs = dict(paths)  # MKL_CBWR unset: train_net.py pins the project's branch itself
    if control:
        runs.update({f"auto_{name}": {**paths[name], "MKL_CBWR": "AUTO"} for name in control})
    states = train_all(runs, tiny_digitscapes, tmp_path)

    reference = states["native"]
    assert any("GMMEMHook/memory." in k for k in reference), sorted(reference)[:20]
    assert int(reference["/trainer/hooks/GMMEMHook/memory.count"].sum()) > 0
    for name in paths:
        assert not differing(reference, states[name]), f"{name} differs under MKL_CBWR={DEFAULT_BRANCH}"
    if control is None:
        pytest.skip(f"control not run: needs AVX-512 and the Intel shim or an Intel CPU ({vendor or '?'})")
    changed = differing(states[f"auto_{control[0]}"], states[f"auto_{control[1]}"])
    assert len(changed) > len(reference) // 2, f"MKL_CBWR=AUTO: only {len(changed)} tensors differ"


def _python(code: str, **env: str) -> list[str]:
    """Run ``code`` in a fresh interpreter with MKL_CBWR and GMMSEG_MKL_CBWR unset, plus ``env``; its
    printed lines, then its stderr's."""
    clean = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "GMMSEG_MKL_CBWR")}
    proc = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split() + ["STDERR:" + proc.stderr]


PIN_FIRST = """
import sys
from gmmseg.reproducibility import mkl_branch, pin_mkl_branch
assert "torch" not in sys.modules  # gmmseg and this module load no torch
value = pin_mkl_branch()
import torch
torch.ones(64, 64) @ torch.ones(64, 64)
print(value, mkl_branch())
"""
PIN_LATE = """
import torch
torch.ones(64, 64) @ torch.ones(64, 64)  # MKL runs, and fixes its branch, before the pin
from gmmseg.reproducibility import mkl_branch, pin_mkl_branch
print(pin_mkl_branch(), mkl_branch())
"""


def test_pin_sets_compatible_branch_before_mkl_runs():
    value, running, _ = _python(PIN_FIRST)
    assert value == running == DEFAULT_BRANCH == "COMPATIBLE"


def test_pin_keeps_the_users_mkl_cbwr_and_can_be_turned_off():
    assert _python(PIN_FIRST, MKL_CBWR="AUTO")[:2] == ["AUTO", "AUTO"]
    assert _python(PIN_FIRST, GMMSEG_MKL_CBWR="off")[:2] == ["None", "OFF"]


def test_pin_warns_when_mkl_already_ran():
    value, running, stderr = _python(PIN_LATE)
    assert (value, running) == ("COMPATIBLE", "OFF")
    assert "MKL is running CNR branch OFF, not MKL_CBWR=COMPATIBLE" in stderr


ENTRY_POINTS = [
    "train_net.py",
    "demo.py",
    "tools/fit_mahalanobis.py",
    "tools/fit_posthoc_gmm.py",
    "benchmarks/anomaly_gap.py",
    "benchmarks/digitscapes.py",  # and so benchmarks/convergence.py, which imports it first
    "benchmarks/gmm_core.py",
    "benchmarks/gmm_errors.py",
    "benchmarks/speed.py",
    "benchmarks/profile_gmm_head.py",
    "benchmarks/mkl_cbwr.py",
    "tests/conftest.py",
]


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_entry_points_pin_mkl_before_any_other_import(script):
    """The first statements after the docstring and ``from __future__`` import and call pin_mkl_branch."""
    import ast

    body = ast.parse((REPO / script).read_text()).body
    body = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    body = [s for s in body if not (isinstance(s, ast.ImportFrom) and s.module == "__future__")]
    first, second = body[0], body[1]
    assert isinstance(first, ast.ImportFrom) and first.module == "gmmseg.reproducibility", script
    assert ast.unparse(second) == "pin_mkl_branch()", script


def test_mkl_cbwr_benchmark_quick():
    """The speed benchmark's pipeline (kernel only, one call per setting) and MKL's answer per setting."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "mkl_cbwr.py"), "--no-training", "--rounds", "1"]
    cmd += ["--repeats", "1", "--branches", "off", "COMPATIBLE"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| MKL's branch (`mkl_branch()`) | OFF | COMPATIBLE |" in proc.stdout
    assert "log-likelihood kernel, forward + backward" in proc.stdout
