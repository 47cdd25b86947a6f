"""Mixed precision (``SOLVER.AMP.ENABLED``): the GMM stays float32 inside autocast, every model trains with
bfloat16 autocast on the CPU (``gmmseg.compat.AnyDeviceAMPTrainer``), and the float32 path is untouched.

Stated tolerance: a GMMSeg DeepLabV3+ after 20 AMP iterations gives, on the validation images, posteriors
within 0.05 (max abs) of its float32 ones under bfloat16 autocast, and anomaly maps (``-max_c log p(x|c)``)
within 2% of their range: the backbone and decoder run in bfloat16 (8 significant bits), the GMM in
float32. Given the same embeddings, the GMM's outputs under autocast equal the float32 ones bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gmmseg.gmm import (
    GaussianMixtureClassifier,
    OnlineGMM,
    diag_gaussian_log_prob,
    e_step,
    fit_gmm,
    float32_region,
    sinkhorn,
)
from gmmseg_datasets.digitscapes import generate_digitscapes

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "digitscapes"
TINY = [
    *("SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "INPUT.MIN_SIZE_TRAIN", "(64,)"),
    *("INPUT.MIN_SIZE_TEST", "64", "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0"),
    *(
        "SOLVER.CHECKPOINT_PERIOD",
        "100000",
        "MODEL.GMM.UPDATE_INTERVAL",
        "2",
        "MODEL.GMM.MEMORY_CAPACITY",
        "50",
    ),
    *("DATALOADER.NUM_WORKERS", "0", "SEED", "0"),
]
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _gmm_core_outputs(x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Everything the GMM core computes from (N, D) features: log-likelihoods, E-step, memory, M-step."""
    torch.manual_seed(0)
    clf = GaussianMixtureClassifier(3, 2, x.shape[1])
    online = OnlineGMM(clf, capacity=8, max_per_step=4, interval=1)
    component = clf.component_log_prob(x)
    # the training path: autograd needs out-of-place products, which autocast would run in bfloat16
    with_grad = clf.component_log_prob(x.detach().clone().requires_grad_()).detach()
    fit = fit_gmm(x.float(), 2, n_iters=3, generator=torch.Generator().manual_seed(0))
    online.observe(x, labels, torch.ones_like(labels, dtype=torch.bool))
    online.maximise()
    return {
        "component": component,
        "component_with_grad": with_grad,
        "fit_gmm": torch.cat([fit.means, fit.stds]),
        "class": clf.class_log_prob(x),
        "gaussian": diag_gaussian_log_prob(x, clf.means[0], clf.stds[0]),
        "sinkhorn": sinkhorn(component[:, 0], normalize=True),
        "e_step": e_step(component, labels)[0],
        "memory": online.memory.features,
        "sums": online.memory.sums,
        "means": clf.means,
        "stds": clf.stds,
    }


def test_gmm_core_runs_in_float32_under_autocast():
    x = F.normalize(torch.randn(40, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    x = x.bfloat16().float()  # representable in bfloat16: the same input both ways
    labels = torch.arange(40) % 3
    want = _gmm_core_outputs(x, labels)
    with torch.autocast(**BF16):
        got = _gmm_core_outputs(x.bfloat16(), labels)  # low-precision features, as the network gives
        plain = torch.addmm(torch.zeros(40, 6), x, torch.ones(16, 6))  # autocast is on around the core
    assert plain.dtype == torch.bfloat16
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        assert torch.equal(got[name], value), name  # bit for bit: no product ran in bfloat16
    assert want["component"].dtype == torch.float32


def test_float32_region_is_a_plain_call_outside_autocast(monkeypatch):
    """Outside autocast the wrapper enters no autocast region: the float32 path runs the same operations
    as before mixed precision was added, so its numbers are bit-identical."""

    def no_autocast(*args, **kwargs):
        raise AssertionError("autocast entered outside an autocast region")

    calls = []
    wrapped = float32_region(lambda *a, **k: calls.append((a, k)) or "result")
    monkeypatch.setattr(torch, "autocast", no_autocast)
    assert wrapped(1, key=2) == "result" and calls == [((1,), {"key": 2})]
    x = torch.randn(5, 4)
    assert x.float() is x  # the boundary's .float() is the identity on float32 tensors
    _gmm_core_outputs(F.normalize(x, dim=-1), torch.tensor([0, 1, 2, 0, 1]))


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("amp")
    generate_digitscapes(str(root), seed=0, image_size=64, counts={"train": 8, "val": 2})
    return root


def _train(config: str, iters: int, out: Path, extra: tuple[str, ...] = ()):
    """GMMSegTrainer with AMP on for ``iters`` iterations; returns (trainer, per-iteration losses)."""
    from detectron2.engine import HookBase

    from gmmseg import setup_cfg
    from gmmseg.engine import GMMSegTrainer

    opts = [
        *TINY,
        "SOLVER.MAX_ITER",
        str(iters),
        "SOLVER.AMP.ENABLED",
        "True",
        "OUTPUT_DIR",
        str(out),
        *extra,
    ]
    cfg = setup_cfg(CONFIGS / f"{config}.yaml", opts)
    torch.manual_seed(0)
    trainer = GMMSegTrainer(cfg)
    trainer.resume_or_load(resume=False)
    losses: list[dict[str, float]] = []

    class RecordLosses(HookBase):
        def after_step(self) -> None:
            histories = self.trainer.storage.histories()
            losses.append({k: v.latest() for k, v in histories.items() if k.startswith(("loss", "total"))})

    trainer.register_hooks([RecordLosses()])
    trainer.train()
    return trainer, losses


def _assert_finite(trainer, losses: list[dict[str, float]], iters: int) -> None:
    assert len(losses) == iters and all(math.isfinite(v) for step in losses for v in step.values())
    state = trainer.model.state_dict()
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, bad


@pytest.fixture(scope="module")
def amp_run(datasets, tmp_path_factory):
    """GMMSeg DeepLabV3+ trained 20 iterations with bfloat16 autocast on the CPU."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DETECTRON2_DATASETS", str(datasets))
        yield _train("deeplabv3plus_R18_gmmseg", 20, tmp_path_factory.mktemp("run"))


def test_amp_training_has_no_nan_or_inf(amp_run):
    from gmmseg.compat import AnyDeviceAMPTrainer
    from gmmseg.engine.hooks import GMMEMHook

    trainer, losses = amp_run
    assert isinstance(trainer._trainer, AnyDeviceAMPTrainer) and trainer._trainer.dtype == torch.bfloat16
    assert not trainer._trainer.grad_scaler.is_enabled()  # bfloat16 needs no loss scaling
    _assert_finite(trainer, losses, 20)
    assert losses[-1]["loss_sem_seg"] < losses[0]["loss_sem_seg"]  # it learns
    gmm = trainer.model.sem_seg_head.gmm_predictor.gmm
    assert gmm.means.dtype == gmm.stds.dtype == torch.float32
    assert torch.isfinite(gmm.means).all() and (gmm.stds > 0).all() and torch.isfinite(gmm.stds).all()
    torch.testing.assert_close(gmm.means.norm(dim=-1), torch.ones(gmm.means.shape[:2]))
    (hook,) = [h for h in trainer._hooks if isinstance(h, GMMEMHook)]
    memory = hook.online.memory
    assert int(memory.count.sum()) > 0 and torch.isfinite(memory.features).all()
    assert torch.isfinite(memory.sums).all() and memory.features.dtype == torch.float32


def test_autocast_and_float32_class_scores_agree(amp_run, datasets, monkeypatch):
    from gmmseg.engine import GMMSegTrainer

    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    trainer, _ = amp_run
    model = trainer.model.eval()
    predictor = model.sem_seg_head.gmm_predictor
    dtypes: dict[str, torch.dtype] = {}
    normalise = predictor.normalise

    def recording_normalise(projected):  # the projection's output (at inference not the Conv2d module's)
        dtypes["projection"] = projected.dtype
        return normalise(projected)

    monkeypatch.setattr(predictor, "normalise", recording_normalise)
    hooks = [
        predictor.register_forward_hook(
            lambda m, i, o: dtypes.update({k: v.dtype for k, v in o.items() if k != "logits"})
        ),
    ]
    loader = GMMSegTrainer.build_test_loader(trainer.cfg.clone(), "digitscapes_val")
    try:
        for batch in loader:
            (full,) = model.inference_outputs(batch)
            with torch.autocast(**BF16):
                (mixed,) = model.inference_outputs(batch)
            assert dtypes["projection"] == torch.bfloat16  # the network ran in bfloat16 ...
            for key in ("embeddings", "component_log_prob", "class_log_prob"):  # ... the GMM in float32
                assert dtypes[key] == torch.float32, key
            posterior = (mixed["logits"].float().softmax(0) - full["logits"].softmax(0)).abs().max()
            spread = float(full["anomaly"].max() - full["anomaly"].min())
            assert posterior <= 0.05
            assert (mixed["anomaly"] - full["anomaly"]).abs().max() <= 0.02 * spread
            assert (mixed["logits"].argmax(0) == full["logits"].argmax(0)).float().mean() >= 0.95
    finally:
        for hook in hooks:
            hook.remove()
        model.train()


@pytest.mark.parametrize(
    "config",
    [
        "deeplabv3plus_R18_softmax",
        "fpn_R18_gmmseg",
        "fpn_R18_softmax",
        "segformer_B0_gmmseg",
        "mask2former_R18_gmmseg",
        "mask2former_R18_softmax",
    ],
)
def test_every_model_trains_with_amp(datasets, tmp_path, monkeypatch, config):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    trainer, losses = _train(config, 3, tmp_path)
    _assert_finite(trainer, losses, 3)


def test_amp_dtype_and_its_config_key(datasets, tmp_path, monkeypatch):
    from gmmseg import setup_cfg
    from gmmseg.compat import AnyDeviceAMPTrainer, amp_dtype
    from gmmseg.config_validation import ConfigValueError

    assert amp_dtype("cpu") == torch.bfloat16 and amp_dtype("cuda:0") == torch.float16
    assert amp_dtype("cpu", "float16") == torch.float16
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    with pytest.raises(ConfigValueError, match="SOLVER.AMP.DTYPE = 'half' is invalid"):
        setup_cfg(CONFIGS / "deeplabv3plus_R18_gmmseg.yaml", [*TINY, "SOLVER.AMP.DTYPE", "half"])
    # float16 on the CPU: loss scaling on, its state checkpointed and restored
    trainer, losses = _train("deeplabv3plus_R18_softmax", 2, tmp_path, ("SOLVER.AMP.DTYPE", "float16"))
    amp = trainer._trainer
    assert isinstance(amp, AnyDeviceAMPTrainer) and amp.dtype == torch.float16
    assert amp.grad_scaler.is_enabled() and "scale" in amp.state_dict()["grad_scaler"]
    amp.load_state_dict(amp.state_dict())
    amp.load_state_dict({k: v for k, v in amp.state_dict().items() if k != "grad_scaler"})  # older checkpoint
