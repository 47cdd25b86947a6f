#!/usr/bin/env python3
"""Idempotent set-up of GMMSeg-D2's Python environment (standard library only).

Creates ``<repo>/.venv`` if missing (``GMMSEG_VENV`` names another place) and installs the stack pinned in
``requirements/pins.txt``, keeping whatever already works: a working torch/torchvision pair, an importable
detectron2. A second run with everything present only compares versions and returns in a second or two.

Usage: ``python3 tools/install.py [--force]``. Environment:
  GMMSEG_VENV                 path of the virtual environment (default: <repo>/.venv)
  GMMSEG_SYSTEM_SITE_PACKAGES 1 = create the venv with --system-site-packages, so that a torch or
                              detectron2 installed system-wide is seen and kept
  GMMSEG_DETECTRON2_SRC       a detectron2 source checkout to build (with its compiled ops) instead of the
                              registry sdist
  GMMSEG_MASK2FORMER_CUDA_OPS 1 = build Mask2Former's deformable-attention CUDA op (needs nvcc and a GPU);
                              otherwise it runs in pure PyTorch
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
PINS = REPO / "requirements" / "pins.txt"
STANDIN = Path(__file__).resolve().parent / "install" / "detectron2_C_standin.py"
STAMP_NAME = ".gmmseg-install.json"

TORCH_PACKAGES = ("torch", "torchvision")
DETECTRON2_SDIST = "pb1-detectron2"
# installed without their declared dependencies, after detectron2 (see requirements/pins.txt)
NO_DEPS_PACKAGES = ("maskformer2", "timm")
# the top-level packages under projects/GMMSeg that ``pip install -e .`` installs (setup.py)
PROJECT_PACKAGES = ("gmmseg", "gmmseg_datasets")


class StepFailed(RuntimeError):
    """A set-up step failed; the message says which and what to do."""


def log(msg: str) -> None:
    print(f"[install] {msg}", flush=True)


def read_pins(path: Path = PINS) -> dict[str, str]:
    """Return {distribution name (lower case): requirement line} from the pins file."""
    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        for sep in ("===", "=="):
            if sep in line:
                name = line.split(sep, 1)[0].strip().lower()
                break
        else:
            raise StepFailed(f"{path}: line {raw!r} is not of the form 'name==version'")
        pins[name] = line
    return pins


def pinned_version(requirement: str) -> str:
    return requirement.split("=")[-1].strip()


def run(cmd: list[str], step: str, advice: str, **kwargs) -> subprocess.CompletedProcess:
    """Run a command; on failure raise StepFailed naming the step, the command and what to do."""
    log(f"{step}: {' '.join(cmd)}")
    proc = subprocess.run(cmd, text=True, **kwargs)
    if proc.returncode != 0:
        raise StepFailed(
            f"step '{step}' failed: `{' '.join(cmd)}` exited with {proc.returncode}.\nWhat to do: {advice}"
        )
    return proc


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def probe(python: Path, code: str) -> tuple[bool, str]:
    """Run a snippet in the venv's interpreter; return (ok, last line of output)."""
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    out = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode == 0, (out[-1] if out else "")


def installed_versions(python: Path, names: list[str]) -> dict[str, str | None]:
    code = (
        "import json, importlib.metadata as m\n"
        f"names = {names!r}\n"
        "out = {}\n"
        "for n in names:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = None\n"
        "print(json.dumps(out))\n"
    )
    ok, line = probe(python, code)
    if not ok:
        raise StepFailed(
            f"step 'inspect environment' failed: {line}\nWhat to do: delete the venv and re-run."
        )
    return json.loads(line)


def fingerprint() -> str:
    digest = hashlib.sha256()
    for path in (PINS, Path(__file__).resolve(), STANDIN, REPO / "setup.py"):
        digest.update(path.read_bytes())
    digest.update(str(REPO).encode())
    return digest.hexdigest()


def step_venv(venv: Path) -> Path:
    python = venv_python(venv)
    if python.exists():
        return python
    cmd = [sys.executable, "-m", "venv", str(venv)]
    if os.environ.get("GMMSEG_SYSTEM_SITE_PACKAGES") == "1":
        cmd.append("--system-site-packages")
    run(
        cmd,
        "create virtual environment",
        "install Python's venv module (Debian/Ubuntu: apt-get install python3-venv) or set GMMSEG_VENV "
        "to a writable path.",
    )
    run(
        [str(python), "-m", "pip", "install", "-q", "--upgrade", "pip", "setuptools", "wheel"],
        "upgrade pip",
        "check that the package registry is reachable (pip config list shows the index in use).",
    )
    return python


def step_torch(python: Path, pins: dict[str, str]) -> None:
    ok, line = probe(
        python,
        "import torch, torchvision, torchvision.ops as o; "
        "o.nms(torch.zeros(1, 4), torch.zeros(1), 0.5); "
        "print(torch.__version__, torchvision.__version__)",
    )
    if ok:
        log(f"torch/torchvision: keeping the working install ({line})")
        return
    run(
        [str(python), "-m", "pip", "install", pins["torch"], pins["torchvision"]],
        "install torch and torchvision",
        "check the registry is reachable and has enough disk space (the CUDA build is about 5 GB; it also "
        "runs on CPU). To use your own build, see the README section 'Using your own detectron2 or torch'.",
    )
    ok, line = probe(
        python, "import torch, torchvision.ops as o; o.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)"
    )
    if not ok:
        raise StepFailed(
            f"step 'install torch and torchvision' failed: they do not import together ({line}).\n"
            "What to do: make sure torch and torchvision come from the same build (requirements/pins.txt)."
        )


def step_python_deps(python: Path, pins: dict[str, str]) -> None:
    skip = set(TORCH_PACKAGES) | {DETECTRON2_SDIST} | set(NO_DEPS_PACKAGES)
    wanted = {name: req for name, req in pins.items() if name not in skip}
    have = installed_versions(python, sorted(wanted))
    missing = [req for name, req in wanted.items() if have.get(name) != pinned_version(req)]
    if not missing:
        log("python dependencies: all pinned versions present")
        return
    run(
        [str(python), "-m", "pip", "install", "-q", *missing],
        "install python dependencies",
        "check the registry is reachable; the pins live in requirements/pins.txt.",
    )


def _detectron2_works(python: Path) -> tuple[bool, str]:
    return probe(
        python,
        "import detectron2, detectron2.layers, detectron2.engine; "
        "from detectron2.projects.deeplab import DeepLabV3PlusHead; "
        "print(detectron2.__version__, detectron2.__file__)",
    )


def _patch_sdist_setup(source: Path) -> None:
    """Drop the C++/CUDA extension (its sources are not in the sdist) and add the _C stand-in."""
    setup_py = source / "setup.py"
    text = setup_py.read_text()
    for old, new in (
        ("ext_modules=get_extensions(),", "ext_modules=[],"),
        ('cmdclass={"build_ext": torch.utils.cpp_extension.BuildExtension},', ""),
    ):
        if old not in text:
            raise StepFailed(
                f"step 'build detectron2' failed: {setup_py} no longer contains {old!r}.\n"
                "What to do: the sdist changed; install detectron2 yourself (README: 'Using your own "
                "detectron2 or torch')."
            )
        text = text.replace(old, new)
    setup_py.write_text(text)
    shutil.copyfile(STANDIN, source / "detectron2" / "_C.py")


def _pip_index_url(python: Path) -> str:
    """The index pip is configured to use (PIP_INDEX_URL, pip.conf), default PyPI."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    proc = subprocess.run([str(python), "-m", "pip", "config", "list"], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip().endswith(".index-url"):
            return value.strip().strip("'\"")
    return "https://pypi.org/simple"


def download_sdist(python: Path, project: str, version: str, dest: Path) -> Path:
    """Fetch ``project==version``'s sdist from the index, checking its sha256.

    ``pip download`` cannot be used: it prepares the package metadata, and recent pips reject the
    metadata of pb1-detectron2 and maskformer2 (direct-URL dependencies), whose setup.py also imports torch.
    """
    import re
    import ssl
    import urllib.request

    step = f"download {project} sdist"
    advice = f"check that the package registry is reachable, or install {project} yourself (README)."
    index = _pip_index_url(python).rstrip("/")
    context = ssl.create_default_context(cafile=os.environ.get("PIP_CERT") or None)
    page_url = f"{index}/{project}/"
    try:
        request = urllib.request.Request(page_url, headers={"Accept": "text/html"})
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            page = response.read().decode()
    except OSError as err:
        raise StepFailed(
            f"step '{step}' failed: cannot read {page_url} ({err}).\nWhat to do: {advice}"
        ) from err
    wanted = {f"{project}-{version}.tar.gz", f"{project.replace('-', '_')}-{version}.tar.gz"}
    for href in re.findall(r'href="([^"]+)"', page):
        url, _, fragment = href.partition("#")
        if url.rsplit("/", 1)[-1] in wanted:
            break
    else:
        raise StepFailed(
            f"step '{step}' failed: no {' or '.join(sorted(wanted))} on {page_url}.\nWhat to do: {advice}"
        )
    url = urllib.parse.urljoin(page_url, url)
    target = dest / url.rsplit("/", 1)[-1]
    log(f"{step}: {url}")
    try:
        with urllib.request.urlopen(url, timeout=300, context=context) as response:
            target.write_bytes(response.read())
    except OSError as err:
        raise StepFailed(
            f"step '{step}' failed: cannot download {url} ({err}).\nWhat to do: {advice}"
        ) from err
    if fragment.startswith("sha256="):
        digest = hashlib.sha256(target.read_bytes()).hexdigest()
        if digest != fragment.split("=", 1)[1]:
            raise StepFailed(f"step '{step}' failed: sha256 mismatch for {url}.\nWhat to do: retry; {advice}")
    return target


def build_patched_sdist(
    python: Path,
    project: str,
    version: str,
    patch: Callable[[Path], None],
    step: str,
    advice: str,
) -> None:
    """Download ``project==version``'s sdist, unpack it, ``patch`` its source tree, and pip-install it into
    the venv without build isolation (its setup.py imports torch) and without its declared dependencies."""
    with tempfile.TemporaryDirectory(prefix=f"gmmseg-{project}-") as tmp:
        tmp_path = Path(tmp)
        archive = download_sdist(python, project, version, tmp_path)
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp_path, filter="data")
            else:  # Python < 3.11.4 has no extraction filters
                tar.extractall(tmp_path)
        source = next(p for p in tmp_path.iterdir() if p.is_dir())
        patch(source)
        run(
            [str(python), "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", str(source)],
            step,
            advice,
        )


def step_detectron2(python: Path, pins: dict[str, str]) -> None:
    ok, line = _detectron2_works(python)
    if ok:
        log(f"detectron2: keeping the working install ({line})")
        return
    advice = (
        "check the registry is reachable. Alternatively build detectron2 yourself (see "
        "https://detectron2.readthedocs.io/en/latest/tutorials/install.html) and re-run, or point "
        "GMMSEG_DETECTRON2_SRC at a source checkout."
    )
    src = os.environ.get("GMMSEG_DETECTRON2_SRC")
    if src:
        run(
            [str(python), "-m", "pip", "install", "--no-build-isolation", "--no-deps", src],
            "build detectron2 from GMMSEG_DETECTRON2_SRC",
            "see the build errors above; detectron2's compiled ops need a C++ compiler (and nvcc for CUDA).",
        )
    else:
        build_patched_sdist(
            python,
            DETECTRON2_SDIST,
            pinned_version(pins[DETECTRON2_SDIST]),
            _patch_sdist_setup,
            "build detectron2 (without compiled ops)",
            advice,
        )
    ok, line = _detectron2_works(python)
    if not ok:
        raise StepFailed(
            f"step 'check detectron2' failed: it does not import ({line}).\nWhat to do: {advice}"
        )
    log(f"detectron2: installed ({line})")


def _patch_maskformer2_setup(source: Path) -> None:
    """Drop maskformer2's direct-URL requirements (pip >= 23.3 refuses to install a registry package that
    declares them; its dependencies are pinned and installed separately) and, unless
    GMMSEG_MASK2FORMER_CUDA_OPS=1, its CUDA extension (Mask2Former then runs its deformable attention in
    pure PyTorch)."""
    setup_py = source / "setup.py"
    lines = setup_py.read_text().splitlines(keepends=True)
    kept = [line for line in lines if " @ https://" not in line]
    if len(lines) - len(kept) != 3:
        raise StepFailed(
            f"step 'build Mask2Former' failed: {setup_py} no longer has its three URL requirements.\n"
            "What to do: the sdist changed; install maskformer2 yourself (README)."
        )
    text = "".join(kept)
    if os.environ.get("GMMSEG_MASK2FORMER_CUDA_OPS") != "1":
        if "ext_modules=get_extensions()," not in text:
            raise StepFailed(f"step 'build Mask2Former' failed: unexpected {setup_py}.")
        text = text.replace("ext_modules=get_extensions(),", "ext_modules=[],")
    setup_py.write_text(text)


def step_mask2former(python: Path, pins: dict[str, str]) -> None:
    """Mask2Former (from its sdist, patched) and timm, without their declared dependencies."""
    wanted = {name: pins[name] for name in NO_DEPS_PACKAGES if name in pins}
    have = installed_versions(python, sorted(wanted))
    missing = {name: req for name, req in wanted.items() if have.get(name) != pinned_version(req)}
    others = [req for name, req in missing.items() if name != "maskformer2"]
    if others:
        run(
            [str(python), "-m", "pip", "install", "-q", "--no-deps", *others],
            "install timm",
            "check the registry is reachable; the pins live in requirements/pins.txt.",
        )
    if "maskformer2" in missing:
        build_patched_sdist(
            python,
            "maskformer2",
            pinned_version(pins["maskformer2"]),
            _patch_maskformer2_setup,
            "build Mask2Former",
            "see the errors above; maskformer2's setup.py needs torch installed first.",
        )
    ok, line = probe(
        python,
        "import warnings; warnings.simplefilter('ignore'); import mask2former, os; "
        "print(mask2former.__version__, os.path.dirname(mask2former.__file__))",
    )
    if not ok:
        raise StepFailed(
            f"step 'check Mask2Former' failed: it does not import ({line}).\n"
            "What to do: it needs detectron2, timm and scipy; see the error above."
        )
    log(f"Mask2Former: {'installed' if 'maskformer2' in missing else 'present'} ({line})")


def step_gmmseg(python: Path) -> None:
    # every package must come from this checkout: an install made before a package was added lacks it
    ok, line = probe(
        python,
        f"import importlib, os; print(*(os.path.realpath(importlib.import_module(p).__file__) "
        f"for p in {list(PROJECT_PACKAGES)!r}))",
    )
    expected = " ".join(
        str((REPO / "projects" / "GMMSeg" / p / "__init__.py").resolve()) for p in PROJECT_PACKAGES
    )
    if ok and line == expected:
        log(f"{', '.join(PROJECT_PACKAGES)}: installed (editable) from this checkout")
        return
    run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(REPO)],
        "install gmmseg (editable)",
        "check that setup.py is intact and the venv's setuptools works.",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--force", action="store_true", help="re-check every step even if the stamp matches")
    args = parser.parse_args(argv)

    start = time.time()
    venv = Path(os.environ.get("GMMSEG_VENV", REPO / ".venv")).resolve()
    stamp = venv / STAMP_NAME
    try:
        pins = read_pins()
        python = step_venv(venv)
        if (
            not args.force
            and stamp.exists()
            and json.loads(stamp.read_text()).get("fingerprint") == fingerprint()
        ):
            versions = installed_versions(python, [*sorted(pins), "gmmseg"])
            stale = [
                n
                for n, req in pins.items()
                if n not in (*TORCH_PACKAGES, DETECTRON2_SDIST) and versions.get(n) != pinned_version(req)
            ]
            if not stale and versions.get("gmmseg") is None:
                stale = ["gmmseg"]
            if not stale:
                log(f"environment up to date ({venv}), checked in {time.time() - start:.1f} s")
                return 0
            log(f"stamp present but {', '.join(stale)} changed; re-checking")
        step_torch(python, pins)
        step_python_deps(python, pins)
        step_detectron2(python, pins)
        step_mask2former(python, pins)
        step_gmmseg(python)
    except StepFailed as err:
        print(f"[install] ERROR: {err}", file=sys.stderr, flush=True)
        return 1
    stamp.write_text(json.dumps({"fingerprint": fingerprint(), "time": time.time()}))
    log(f"environment ready ({venv}) in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
