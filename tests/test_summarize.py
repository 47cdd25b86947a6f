"""tools/summarize.py: the results table and the per-group IoU table from saved metrics."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("summarize", REPO / "tools" / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_run(root: Path, name: str, ious: list[float]) -> Path:
    sem_seg = {"mIoU": sum(ious) / len(ious), "ECE": 3.0}
    sem_seg.update({f"IoU-class {i}": v for i, v in enumerate(ious)})
    sem_seg.update({f"ACC-class {i}": 50.0 for i in range(len(ious))})
    metrics = {"val": {"sem_seg": sem_seg}, "ood": {"anomaly": {"gmm/AUROC": 90.0}}}
    out = root / name
    (out / "inference").mkdir(parents=True)
    (out / "inference" / "metrics.json").write_text(json.dumps(metrics))
    return out


def test_groups_table_averages_the_chosen_classes(tmp_path, capsys):
    a = _write_run(tmp_path, "a", [80.0, 60.0, 10.0, 20.0, 30.0])
    b = _write_run(tmp_path, "b", [90.0, 70.0, 0.0, 0.0, 60.0])
    assert _tool().main([str(a), str(b), "--groups", "big=0-1", "small=2,4", "--per-class"]) == 0
    out = capsys.readouterr().out
    assert "| a | val | 40.00 | 70.00 | 20.00 | 80.00 | 60.00 | 10.00 | 20.00 | 30.00 |" in out
    assert "| b | val | 44.00 | 80.00 | 30.00 | 90.00 | 70.00 | 0.00 | 0.00 | 60.00 |" in out
    groups_table = out[out.index("| model | dataset | mIoU | big mIoU | small mIoU | class 0 |") :]
    assert "| a | ood |" not in groups_table  # no per-class IoUs there


def test_bad_group_and_out_of_range_class_are_clear_errors(tmp_path):
    run = _write_run(tmp_path, "a", [1.0, 2.0])
    tool = _tool()
    with pytest.raises(SystemExit):
        tool.main([str(run), "--groups", "digits"])  # argparse: NAME=CLASSES expected
    with pytest.raises(SystemExit, match="class 5 but val has 2 classes"):
        tool.main([str(run), "--groups", "x=0-5"])
    with pytest.raises(SystemExit, match="missing"):
        tool.main([str(tmp_path / "none")])


def test_groups_leave_out_absent_classes_as_miou_does(tmp_path, capsys):
    """A class with neither pixels nor predictions has IoU NaN; mIoU leaves it out, so do the groups."""
    run = _write_run(tmp_path, "a", [80.0, float("nan"), 10.0])
    assert _tool().main([str(run), "--groups", "first=0-1", "absent=1"]) == 0
    assert "| a | val | nan | 80.00 | nan |" in capsys.readouterr().out
