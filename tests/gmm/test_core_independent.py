"""The GMM core must import without Detectron2."""

from __future__ import annotations

import subprocess
import sys


def test_import_gmm_core_does_not_load_detectron2() -> None:
    code = (
        "import sys, gmmseg.gmm as g; g.GaussianMixtureClassifier(2, 2, 4); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'detectron2'); "
        "assert not bad, bad; print('ok')"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
