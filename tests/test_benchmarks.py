"""The benchmark scripts run end to end in their quick mode (a pipeline check, not the numbers)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"


def _load(name: str):
    """``benchmarks/<name>.py`` as a module. The scripts import one another as the running script's
    neighbours (``python benchmarks/x.py`` puts benchmarks/ first on sys.path); here the test does."""
    import importlib

    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


def _run(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_gmm_core_quick():
    out = _run("gmm_core.py", "--quick", "--threads", "1").stdout
    assert "### Component log-likelihoods" in out or "log-likelihood" in out.lower()
    assert "looped (reference)" in out


@pytest.mark.slow
def test_speed_quick_measures_both_classifiers(tmp_path):
    table, raw = tmp_path / "speed.md", tmp_path / "speed.json"
    pairs = ["digitscapes/deeplabv3plus_R18", "digitscapes/mask2former_R18"]
    out = _run(
        "speed.py", "--quick", "--threads", "1", "--pairs", *pairs, "--output", str(table), "--json", str(raw)
    ).stdout
    assert "### Inference, one 128x256 image" in out and "### Training step" in out
    assert "looped (reference)" in out  # the GMM core tables are part of the same run
    assert table.read_text().count("| digitscapes/") == 6  # 2 inference rows per pair + 1 training row
    measured = json.loads(raw.read_text())
    assert {(r["pair"], r["kind"]) for r in measured["inference"]} == {
        (p, k) for p in pairs for k in ("softmax", "gmmseg")
    }
    for row in measured["inference"]:
        assert row["seconds"] > 0 and row["peak"] >= 0 and row["params"] > 0
    gmm_rows = [r for r in measured["training"] if r["kind"] == "gmmseg"]
    assert len(gmm_rows) == 2
    for row in gmm_rows:  # the hook's cost was measured on a real EM batch
        assert row["e_step_enqueue"] > 0 and row["m_step"] > 0 and row["pixels"] > 0
    for rows in (measured["inference"], measured["training"]):  # softmax and GMM were timed in rounds
        for row in (r for r in rows if r["kind"] == "gmmseg"):
            low, high = row["ratio_range"]
            assert 0 < low <= row["ratio"] <= high
    assert all("e_step_enqueue" not in r for r in measured["training"] if r["kind"] == "softmax")
    # issue 17's yardstick: the log-likelihood kernel against one (N, D) x (D, C*K) GEMM, table and JSON
    assert "log-likelihood / one GEMM" in out
    for key in ("ours_float32", "ours_float64"):
        row = measured["loglik"]["rows"][key]
        low, high = row["gemm_ratio_range"]
        assert row["gemm_seconds"] > 0 and 0 < low <= row["gemm_ratio"] <= high, key
    assert "gemm_ratio" not in measured["loglik"]["rows"]["broadcast_float32"]


@pytest.mark.slow
def test_profile_gmm_head_splits_the_call_and_lists_the_extra_operators(tmp_path):
    report = tmp_path / "profile.md"
    _run(
        "profile_gmm_head.py", "--size", "64", "128", "--rounds", "1", "--top", "12", "--output", str(report)
    )
    text = report.read_text()
    for row in ("| backbone |", "| head |", "| rest |", "| total |"):
        assert row in text
    assert "`aten::addmm`" in text or "`aten::addmm_`" in text or "`aten::baddbmm`" in text
    assert text.count("\n| `") == 12  # the top 12 operators


@pytest.mark.slow
def test_digitscapes_benchmark_quick_runs_resumes_and_reports(tmp_path):
    out = tmp_path / "bench"
    args = ["--quick", "--output", str(out), "--only", "gmmseg_memory0", "softmax_posthoc_gmm"]
    stdout = _run("digitscapes.py", *args).stdout
    assert "softmax + GMM fitted afterwards" in stdout
    rows = json.loads((out / "results.json").read_text())["rows"]
    # softmax (needed by the post-hoc variant) was added: msp and entropy rows, then one row each
    assert [(r["variant"], r["score"]) for r in rows] == [
        ("softmax", "msp"),
        ("softmax", "entropy"),
        ("gmmseg_memory0", "gmm"),
        ("softmax_posthoc_gmm", "gmm"),
    ]
    for row in rows:
        for key in ("mIoU", "ECE", "AUROC", "AP", "FPR95", "near/AP", "far/FPR95", "sIoU", "PPV", "mean_F1"):
            assert 0.0 <= row[key] <= 100.0, (row["variant"], key)
    assert (out / "results.png").stat().st_size > 0
    assert (out / "results.md").read_text().count("\n| ") == 6  # header, separator, 4 rows
    # a second run reuses the finished variants: nothing is trained or evaluated again
    logs = {p: p.stat().st_size for p in out.glob("*/log.txt")}
    _run("digitscapes.py", *args)
    assert {p: p.stat().st_size for p in out.glob("*/log.txt")} == logs


@pytest.mark.slow
def test_digitscapes_benchmark_quick_over_seeds_reports_mean_and_spread(tmp_path):
    out = tmp_path / "bench"
    _run(
        "digitscapes.py",
        "--quick",
        "--output",
        str(out),
        "--only",
        "gmmseg",
        "--seeds",
        "0",
        "1",
        "--name",
        "s",
    )
    assert (out / "gmmseg" / "done.json").is_file() and (out / "gmmseg_seed1" / "done.json").is_file()
    report = json.loads((out / "s.json").read_text())
    assert report["seeds"] == [0, 1] and len(report["rows"]) == 1
    row = report["rows"][0]
    per_seed = [
        json.loads((out / d / "inference" / "metrics.json").read_text())["digitscapes_val"]["sem_seg"]["mIoU"]
        for d in ("gmmseg", "gmmseg_seed1")
    ]
    assert row["mIoU_seeds"] == per_seed
    assert row["mIoU"] == pytest.approx(sum(per_seed) / 2)
    assert row["mIoU_std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2**0.5)
    table = (out / "s.md").read_text()
    assert (
        "seeds 0, 1 where given: mean ± sample standard deviation" in table
        and f"{row['mIoU']:.2f} ± " in table
    )
    assert (out / "s.png").stat().st_size > 0 and not (out / "results.md").exists()


def test_progress_counts_only_the_iterations_this_invocation_trains():
    """Finished or resumed runs leave the total instead of filling the bar in no time, which would
    make the pace, hence the time left, wildly optimistic."""
    bench = _load("digitscapes")
    progress = bench.Progress(3 * 600)
    progress.skip(600)  # a finished run, reused
    progress.skip(200)  # a run resumed at iteration 200
    progress.advance(400)
    assert (progress.bar.total, progress.bar.n) == (1000, 400)
    progress.close()


def test_seed_statistics_match_statistics_module_and_survive_absent_classes():
    """A class absent from a short run has IoU NaN: the group mean skips it like mIoU does, and the
    spread over seeds is NaN instead of a crash (statistics.stdev raises on NaN)."""
    import math
    import statistics

    from gmmseg.evaluation.report import group_mean_iou

    bench = _load("digitscapes")
    values = [30.87, 31.2, 29.95]
    assert bench.sample_std(values) == pytest.approx(statistics.stdev(values), rel=1e-12)
    assert math.isnan(bench.sample_std([1.0, float("nan")]))
    assert bench.group_mean_iou is group_mean_iou  # the stuff / digit columns use the shared helper
    sem_seg = {"IoU-a": 10.0, "IoU-b": float("nan"), "IoU-c": 30.0}
    assert group_mean_iou(sem_seg, ["a", "b", "c"]) == pytest.approx(20.0)
    assert math.isnan(group_mean_iou(sem_seg, ["b"]))


def test_time_pair_interleaves_in_alternating_order_and_takes_the_median_ratio():
    """Drift in the machine's speed must hit both sides of a ratio: the calls alternate AB, BA, AB."""
    import time

    import torch

    gmm_core = _load("gmm_core")
    calls = []

    def baseline():
        calls.append("a")
        time.sleep(0.01)

    def candidate():
        calls.append("b")
        time.sleep(0.03)

    timing = gmm_core.time_pair(baseline, candidate, torch.device("cpu"), repeats=3)
    assert "".join(calls) == "ab" + "ab" + "ba" + "ab"  # a warm-up of each, then three rounds
    assert len(timing["baseline_times"]) == len(timing["candidate_times"]) == 3
    ratios = sorted(b / a for a, b in zip(timing["baseline_times"], timing["candidate_times"]))
    assert timing["ratio"] == ratios[1] and timing["ratio_range"] == [ratios[0], ratios[-1]]
    assert 1.5 < timing["ratio"] < 4.0  # 30 ms against 10 ms, with slack for a busy machine


def test_loglik_against_one_gemm_is_timed_in_rounds_and_tabled():
    """The ratio to one (N, D) x (D, M) GEMM comes from interleaved rounds (``time_pair``) on the same
    dtype; the table prints it for our kernel only."""
    import torch

    gmm_core = _load("gmm_core")
    x, means, stds = gmm_core.loglik_inputs(512, 3, 2, 8, torch.float64, torch.device("cpu"))
    with torch.no_grad():
        row = gmm_core.gemm_ratio(x, means, stds, repeats=3)
    low, high = row["gemm_ratio_range"]
    assert row["gemm_seconds"] > 0 and 0 < low <= row["gemm_ratio"] <= high
    common = {"seconds": 1e-3, "peak": 0, "analytic": 1, "err_max": 0.0, "err_rel": 0.0}
    rows = {
        "ours_float32": {**common, "gemm_ratio": 1.5, "gemm_ratio_range": [1.25, 2.0]},
        "broadcast_float32": {**common, "seconds": 0.1},
        "ours_float64": {**common, "peak": None, **row},
    }
    table = gmm_core.loglik_table(
        {"n": 512, "classes": 3, "components": 2, "dim": 8, "device": "cpu", "rows": rows}
    )
    assert "log-likelihood / one GEMM (range)" in table and "| 1.50 (1.25-2.00) |" in table
    assert table.count("\n| ") == 5 and "x | - |" in table  # header, separator, 3 rows; broadcast: no ratio


def test_close_variants_get_more_seeds_when_within_three_seed_stds():
    """A variant is repeated with more seeds when its difference from GMMSeg could be seed noise."""
    bench = _load("digitscapes")
    reference = {"mIoU": 40.0, "mIoU_std": 0.5, "AUROC": 85.0, "AUROC_std": 1.0}
    assert bench.needs_more_seeds({"mIoU": 41.4, "AUROC": 70.0}, reference)  # 1.4 < 3 x 0.5
    assert bench.needs_more_seeds({"mIoU": 30.0, "AUROC": 87.9}, reference)  # AUROC 2.9 < 3 x 1.0
    assert not bench.needs_more_seeds({"mIoU": 41.6, "AUROC": 81.9}, reference)  # both beyond 3 stds
    assert not bench.needs_more_seeds({"mIoU": 40.0, "AUROC": None}, {"mIoU": 40.0})  # no spread known


def test_close_seeds_plan_runs_every_variant_once_then_the_headline_pair_with_more_seeds():
    bench = _load("digitscapes")
    plan = bench.first_pass(["softmax", "gmmseg", "gmmseg_K1"], [0, 1, 2], close_seeds=True)
    assert plan == [("softmax", 0), ("gmmseg", 0), ("gmmseg_K1", 0)] + [
        (n, s) for s in (1, 2) for n in ("softmax", "gmmseg")
    ]
    assert bench.first_pass(["gmmseg"], [0, 1], close_seeds=False) == [("gmmseg", 0), ("gmmseg", 1)]


def test_convergence_reads_the_periodic_evaluations_and_applies_the_tolerance(tmp_path):
    conv = _load("convergence")
    records = [
        {"iteration": 9, "total_loss": 1.0},
        {"iteration": 99, "digitscapes_val/sem_seg/mIoU": 20.5, "digitscapes_anomaly_val/sem_seg/mIoU": 1.0},
        {"iteration": 199, "sem_seg/mIoU": 30.25},
        {"iteration": 300, "sem_seg/mIoU": 31.0},  # the final evaluation, in after_train
    ]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert conv.curve(tmp_path, 300) == [(100, 20.5), (200, 30.25), (300, 31.0)]
    assert conv.converged(40.0, 40.9, 1.0) and conv.converged(40.0, 39.0, 1.0)
    assert not conv.converged(40.0, 41.2, 1.0)


@pytest.mark.slow
def test_convergence_quick_trains_both_heads_twice_and_plots(tmp_path):
    out = tmp_path / "bench"
    stdout = _run("convergence.py", "--quick", "--output", str(out), "--eval-period", "2").stdout
    assert "| softmax DeepLabV3+ R18 |" in stdout
    report = json.loads((out / "convergence.json").read_text())
    assert [r["variant"] for r in report["rows"]] == ["softmax", "gmmseg"]
    for row in report["rows"]:
        assert (row["iters"], row["long_iters"]) == (4, 8)
        # metrics.json is written every 20 iterations: of evaluations 2 apart only the last is kept
        assert row["curve"][-1] == [8, pytest.approx(row["long_mIoU"])]
    assert (out / "convergence.png").stat().st_size > 0


def test_settings_key_follows_the_merged_config_not_the_file_text(tmp_path):
    """A base config's change invalidates finished runs; a comment does not."""
    settings_key = _load("runs").settings_key

    base = (REPO / "configs" / "digitscapes" / "Base-DigitScapes-DeepLabV3plus.yaml").read_text()
    (tmp_path / "Base.yaml").write_text(base)
    leaf = tmp_path / "leaf.yaml"
    leaf.write_text('_BASE_: "Base.yaml"\n')
    key = settings_key("gmmseg", leaf, ["SEED", "0"])
    leaf.write_text('# a comment\n_BASE_: "Base.yaml"\nOUTPUT_DIR: "elsewhere"\n')
    assert settings_key("gmmseg", leaf, ["SEED", "0"]) == key
    assert settings_key("gmmseg", leaf, ["SEED", "1"]) != key
    (tmp_path / "Base.yaml").write_text(base.replace("BASE_LR: 0.001", "BASE_LR: 0.002"))
    assert settings_key("gmmseg", leaf, ["SEED", "0"]) != key


def _recorded_row(bench, variant: str, score: str, per_seed: dict[int, float]) -> dict:
    """A row as digitscapes.py records it, every metric given ``per_seed[seed] + offset``."""
    metrics = {
        seed: {key: value + i for i, key in enumerate(bench.METRICS)} for seed, value in per_seed.items()
    }
    row = {"variant": variant, "description": variant, "score": score, "seeds": list(per_seed)}
    for key in bench.METRICS:
        values = [metrics[s][key] for s in per_seed]
        row[key] = sum(values) / len(values)
        if len(values) > 1:
            row[f"{key}_std"] = 0.0  # wrong on purpose: the merge must recompute it from the values
            row[f"{key}_seeds"] = values
    return row


def test_merge_seeds_pools_seeds_across_tables_and_recomputes_mean_and_sample_std(tmp_path):
    """Seed 0 from one table, seeds 1 and 2 from another: the statistics of the three values (numpy's
    ``ddof=1`` as the independent reference); a repeated identical seed counts once, a differing one fails."""
    import numpy as np

    bench = _load("digitscapes")
    merge_seeds = _load("merge_seeds")
    first = {"iters": 3000, "quick": False, "rows": [_recorded_row(bench, "gmmseg", "gmm", {0: 59.13})]}
    later = {
        "iters": 3000,
        "quick": False,
        "rows": [_recorded_row(bench, "gmmseg", "gmm", {1: 58.0, 2: 60.5, 0: 59.13})],
    }
    (row,) = merge_seeds.merge([first, later])
    assert row["seeds"] == [0, 1, 2]
    for i, key in enumerate(bench.METRICS):
        values = np.array([59.13, 58.0, 60.5]) + i
        assert row[key] == pytest.approx(values.mean())
        assert row[f"{key}_std"] == pytest.approx(values.std(ddof=1))
        assert row[f"{key}_seeds"] == pytest.approx(list(values))
    clash = {"iters": 3000, "quick": False, "rows": [_recorded_row(bench, "gmmseg", "gmm", {0: 59.0})]}
    with pytest.raises(SystemExit, match="seed 0"):
        merge_seeds.merge([first, clash])
    paths = []
    for i, table in enumerate([first, {**later, "iters": 1000}]):
        paths.append(tmp_path / f"t{i}.json")
        paths[-1].write_text(json.dumps(table))
    with pytest.raises(SystemExit, match="one schedule"):
        merge_seeds.main([str(p) for p in paths])


def test_merge_seeds_renames_recorded_variants_at_once_and_describes_them_as_today(tmp_path):
    """Tables recorded before a default changed: the two GMMSeg memories swap names (both renames apply to
    the recorded names, not one after the other), and rows take today's descriptions."""
    bench = _load("digitscapes")
    merge_seeds = _load("merge_seeds")
    old_default = _recorded_row(bench, "gmmseg", "gmm", {0: 59.13})
    authors = _recorded_row(bench, "gmmseg_memory_random_32k", "gmm", {0: 60.0})
    authors["description"] = "a description of the time"
    table = {"iters": 3000, "quick": False, "rows": [old_default, authors]}
    rename = {"gmmseg": "gmmseg_memory_empty", "gmmseg_memory_random_32k": "gmmseg"}
    rows = {row["variant"]: row for row in merge_seeds.merge([table], rename)}
    assert set(rows) == {"gmmseg", "gmmseg_memory_empty"}
    assert rows["gmmseg"]["mIoU"] == 60.0 and rows["gmmseg_memory_empty"]["mIoU"] == 59.13
    assert rows["gmmseg"]["description"] == bench.VARIANTS["gmmseg"][2]
    assert rows["gmmseg_memory_empty"]["description"] == bench.VARIANTS["gmmseg_memory_empty"][2]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    for bad in (["gmmseg=no_such_variant"], ["gmmseg"]):
        with pytest.raises(SystemExit, match="--rename"):
            merge_seeds.main([str(path), "--output", str(tmp_path), "--rename", *bad])


def test_memory_state_counts_real_features_among_random_unit_vectors(tmp_path):
    """A queue of random unit vectors (as MEMORY_INIT random starts it) into which 60 of 100 slots were
    overwritten by features near the component's mean: 60% real, the std reported as fitted, and a
    checkpoint without the EM hook's state refused by name."""
    memory_state = _load("memory_state")
    gen = torch.Generator().manual_seed(0)
    classes, capacity, dim = 2, 100, 64
    means = torch.nn.functional.normalize(torch.randn(classes, 1, dim, generator=gen), dim=-1)
    features = torch.nn.functional.normalize(torch.randn(classes, 1, capacity, dim, generator=gen), dim=-1)
    near = means[0, 0] + 0.05 * torch.randn(60, dim, generator=gen)
    features[0, 0, :60] = torch.nn.functional.normalize(near, dim=-1)
    stds = torch.stack([torch.full((1, dim), 0.11), torch.full((1, dim), 0.16)])
    model = {"head.gmm.means": means, "head.gmm.stds": stds}
    hook = {
        "memory.features": features,
        "memory.ptr": torch.tensor([[60], [0]]),
        "memory.count": torch.full((classes, 1), capacity),
    }
    state = memory_state.memory_state(model, hook, threshold=0.3)
    assert state["real_share"][0] == pytest.approx(0.6, abs=0.02)
    assert state["real_share"][1] == pytest.approx(0.0, abs=0.02)
    assert state["std"] == pytest.approx([0.11, 0.16])
    assert state["written"] == [60.0, 0.0]
    assert "| 0 | 0.110 | 60% | 60 |" in memory_state.markdown("run", state, None)
    path = tmp_path / "model_final.pth"
    torch.save({"model": model, "trainer": {"hooks": {}}}, path)
    with pytest.raises(SystemExit, match="no GMMEMHook state"):
        memory_state.main([str(path)])


def test_memory_state_turn_left_and_queue_scores_against_direct_computations():
    """Turn left = the angle between a fitted mean and its queue's normalised mean (a mean 60 degrees away
    from the features it holds); the top class of each queue feature against torch.distributions; the
    last class is reported as "no object" for a Mask2Former checkpoint, and empty queues count nothing."""
    memory_state = _load("memory_state")
    gen = torch.Generator().manual_seed(1)
    classes, comps, capacity, dim = 3, 2, 40, 8
    e0, e1 = torch.eye(dim)[0], torch.eye(dim)[1]
    means = torch.nn.functional.normalize(torch.randn(classes, comps, dim, generator=gen), dim=-1)
    means[0, 0] = 0.5 * e0 + (3**0.5 / 2) * e1  # 60 degrees from e0
    features = torch.nn.functional.normalize(
        torch.randn(classes, comps, capacity, dim, generator=gen), dim=-1
    )
    features[0, 0] = e0  # a queue that holds e0 only
    stds = 0.2 + 0.3 * torch.rand(classes, comps, dim, generator=gen)
    count = torch.tensor([[capacity, 25], [capacity, 0], [10, capacity]])
    model = {"sem_seg_head.predictor.class_predictor.gmm.means": means, "x.class_predictor.gmm.stds": stds}
    hook = {"memory.features": features, "memory.ptr": count % capacity, "memory.count": count}
    state = memory_state.memory_state(model, hook, threshold=0.3)
    filled = torch.arange(capacity).view(1, 1, -1) < count.unsqueeze(-1)
    normal = torch.distributions.Normal(means.double(), stds.double())  # (C, K, D)
    for c in range(classes):
        x = features[c][filled[c]].double()
        log_prob = normal.log_prob(x[:, None, None, :]).sum(-1).amax(-1)  # (slots, C)
        top = log_prob.argmax(-1)
        assert state["scored_own"][c] == pytest.approx((top == c).double().mean().item())
        assert state["scored_last"][c] == pytest.approx((top == classes - 1).double().mean().item())
        angles = []
        for k in range(comps):
            if count[c, k] == 0:
                continue
            queue_mean = features[c, k, : count[c, k]].double().sum(0)
            cos = queue_mean @ means[c, k].double() / queue_mean.norm() / means[c, k].double().norm()
            angles.append(math.degrees(math.acos(cos.clamp(-1, 1).item())))
        assert state["turn_left"][c] == pytest.approx(sum(angles) / len(angles), abs=1e-3)
        if c == 0:
            assert angles[0] == pytest.approx(60.0, abs=1e-4)  # the queue holding e0 only
    assert state["no_object"]
    table = memory_state.markdown("run", state, ["a", "b"])
    assert "scored no object" in table and "| no object |" in table


def test_convergence_takes_the_short_runs_from_a_recorded_table_only_at_their_schedule(tmp_path):
    bench = _load("digitscapes")
    conv = _load("convergence")
    rows = [
        _recorded_row(bench, "softmax", "msp", {0: 65.18}),
        _recorded_row(bench, "gmmseg", "gmm", {1: 58.0, 0: 59.13}),
    ]
    path = tmp_path / "headline.json"
    path.write_text(json.dumps({"iters": 3000, "quick": False, "rows": rows}))
    assert conv.recorded_miou(path, 3000) == {"softmax": 65.18, "gmmseg": 59.13}  # seed 0, not the mean
    with pytest.raises(SystemExit, match="not T = 1000"):
        conv.recorded_miou(path, 1000)
    path.write_text(json.dumps({"iters": 3000, "quick": False, "rows": rows[1:]}))
    with pytest.raises(SystemExit, match="no row for softmax"):
        conv.recorded_miou(path, 3000)


def test_device_check_reads_a_run_and_flags_non_finite_losses(tmp_path):
    """``device_check.py``'s row of one training run: median step time from ``metrics.json``, the final
    metrics of the chosen score, and a NaN or inf in any logged loss turning ``finite_losses`` off."""
    device_check = _load("device_check")
    out = tmp_path / "gmmseg_amp1"
    (out / "inference").mkdir(parents=True)
    logged = [
        {"iteration": 0, "time": 0.5, "total_loss": 2.0, "loss_sem_seg": 1.9},
        {"iteration": 1, "time": 0.3, "total_loss": 1.5, "loss_sem_seg": 1.4},
        {"iteration": 2, "time": 0.4, "total_loss": 1.2, "loss_sem_seg": 1.1},
    ]
    (out / "metrics.json").write_text("\n".join(json.dumps(e) for e in logged) + "\n")
    final = {
        "digitscapes_val": {"sem_seg": {"mIoU": 42.0, "ECE": 1.5}},
        "digitscapes_anomaly_val": {"anomaly": {"gmm/AUROC": 80.0, "gmm/AP": 20.0, "gmm/FPR95": 50.0}},
    }
    (out / "inference" / "metrics.json").write_text(json.dumps(final))
    row = device_check.training_row("gmmseg", True, out, 12.0, "gmm")
    assert row["s_per_iter"] == 0.4 and row["mIoU"] == 42.0 and row["AUROC"] == 80.0
    assert row["finite_losses"] and row["logged_losses"] == 6
    table = device_check.training_table([row], "test device", 3)
    assert "| gmmseg | on | 12 | 0.4000 | 42.00 | 1.50 | gmm | 80.00 | 20.00 | 50.00 | yes (6) |" in table
    logged[1]["loss_sem_seg"] = float("nan")
    (out / "metrics.json").write_text("\n".join(json.dumps(e) for e in logged) + "\n")
    assert not device_check.training_row("gmmseg", True, out, 12.0, "gmm")["finite_losses"]
