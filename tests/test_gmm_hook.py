"""GMMEMHook, the trainer's adapter of OnlineGMM: each step's EM batch (from the predictor's one E-step)
enqueued, the M-step after the interval, on one and on two processes, and its checkpoint state (including
the layout of release 0.1.0)."""

from __future__ import annotations

import os
import types
from dataclasses import fields

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.utils.events import EventStorage

from gmmseg import add_gmmseg_config
from gmmseg.engine.hooks import GMMEMHook, upgrade_em_hook_state
from gmmseg.gmm import EMBatch, EStep, FeatureMemory
from gmmseg.gmm.em import m_step
from gmmseg.modeling import GMMPredictor

C, K, D = 4, 3, 8


def _predictor(seed: int = 0, method: str = "sinkhorn") -> GMMPredictor:
    torch.manual_seed(seed)
    return GMMPredictor(16, C, embed_dim=D, num_components=K, norm="", e_step=EStep(method))


def _step_data(seed: int, n: int = 60, classes=(0, 1)):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(n, D, generator=g), dim=1)
    labels = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=g)]
    correct = torch.rand(n, generator=g) > 0.2
    return emb, labels, correct


def _em_batch(predictor: GMMPredictor, emb, labels, correct) -> EMBatch:
    """What the predictor's losses hand over: the items with their assignment by its E-step."""
    assignment = predictor.e_step.assign(predictor.gmm.component_log_prob(emb), labels)
    return EMBatch(emb, labels, correct, assignment)


def _run_hook(hook: GMMEMHook, predictor: GMMPredictor, steps: list[tuple], rank: int = 0, world: int = 1):
    """Feed each step's (emb, labels, correct), this rank's share, through the predictor's channel
    (``em_observer``, which the hook subscribed to) and the hook, as a training step would."""
    hook.trainer = types.SimpleNamespace(iter=0, storage=None)
    with EventStorage(0) as storage:
        hook.trainer.storage = storage
        for it, (emb, labels, correct) in enumerate(steps):
            share = slice(rank, None, world)
            predictor.em_observer(_em_batch(predictor, emb[share], labels[share], correct[share]))
            hook.trainer.iter = it
            storage.iter = it
            hook.after_step()
        return storage.latest()


def test_means_change_after_the_interval_and_only_for_classes_present():
    predictor = _predictor()
    hook = GMMEMHook(predictor, capacity=50, max_per_step=10, interval=3, mean_momentum=0.5)
    means0, stds0 = predictor.gmm.means.clone(), predictor.gmm.stds.clone()
    steps = [_step_data(s, classes=(0, 2)) for s in range(3)]
    _run_hook(hook, predictor, steps[:2])
    assert torch.equal(predictor.gmm.means, means0)  # no M-step before the interval
    assert hook.online.memory.count[[0, 2]].sum() > 0 and hook.online.memory.count[[1, 3]].sum() == 0
    latest = _run_hook(hook, predictor, steps)
    changed = (predictor.gmm.means != means0).any(dim=-1).any(dim=-1)
    assert changed.tolist() == [True, False, True, False]
    assert torch.equal(predictor.gmm.stds[[1, 3]], stds0[[1, 3]])
    assert torch.isfinite(predictor.gmm.means).all() and (predictor.gmm.stds >= 0.1 - 1e-6).all()
    assert torch.allclose(predictor.gmm.means.norm(dim=-1), torch.ones(C, K), atol=1e-5)
    assert {"gmm/em_time", "gmm/memory_fill", "gmm/mean_shift", "gmm/enqueued"} <= set(latest)


def test_only_correct_pixels_enter_the_memory():
    predictor = _predictor()
    hook = GMMEMHook(predictor, capacity=500, max_per_step=1000, interval=100)
    emb, labels, correct = _step_data(0, n=40)
    _run_hook(hook, predictor, [(emb, labels, correct)])
    assert int(hook.online.memory.count.sum()) == int(correct.sum())


def test_capacity_zero_fits_each_m_step_on_the_batches_since_the_previous_one_only():
    """The paper's "memory 0" ablation: an M-step sees only the features added since the last one."""
    steps = [_step_data(s, classes=(0, 1)) for s in range(4)]
    predictor = _predictor()
    hook = GMMEMHook(predictor, capacity=0, max_per_step=10, interval=2, mean_momentum=0.0)
    assert (
        hook.online.batch_only and hook.online.memory.capacity == 20
    )  # room for 2 steps of at most 10 per queue
    _run_hook(hook, predictor, steps)
    assert int(hook.online.memory.count.sum()) == 0  # emptied by the M-step after step 4
    # the same as a large memory emptied by hand after the first M-step, so that the second one sees
    # only steps 3 and 4
    fresh = _predictor()
    fresh_hook = GMMEMHook(fresh, capacity=1000, max_per_step=10, interval=2, mean_momentum=0.0)
    _run_hook(fresh_hook, fresh, steps[:2])
    fresh_hook.online.memory.reset()
    with EventStorage(2) as storage:
        fresh_hook.trainer.storage = storage
        for it, (emb, labels, correct) in enumerate(steps[2:], start=2):
            fresh.em_observer(_em_batch(fresh, emb, labels, correct))
            fresh_hook.trainer.iter = it
            fresh_hook.after_step()
    assert torch.allclose(predictor.gmm.means, fresh.gmm.means, atol=1e-6)
    assert torch.allclose(predictor.gmm.stds, fresh.gmm.stds, atol=1e-6)
    # while a real memory remembers steps 1 and 2, and so ends elsewhere
    remembering = _predictor()
    _run_hook(
        GMMEMHook(remembering, capacity=1000, max_per_step=10, interval=2, mean_momentum=0.0),
        remembering,
        steps,
    )
    assert not torch.allclose(predictor.gmm.stds, remembering.gmm.stds, atol=1e-6)


def test_class_never_seen_keeps_its_initial_mixture_and_no_nan():
    predictor = _predictor()
    hook = GMMEMHook(predictor, capacity=20, max_per_step=5, interval=1)
    init = predictor.gmm.means[3].clone()
    _run_hook(hook, predictor, [_step_data(s, classes=(0,)) for s in range(4)] + [_step_data(9, n=0)])
    assert torch.equal(predictor.gmm.means[3], init)
    assert torch.isfinite(predictor.gmm.means).all() and torch.isfinite(predictor.gmm.stds).all()


@pytest.mark.parametrize("initial_std", [None, 1.0])
def test_a_class_never_classified_correctly_is_not_locked_out(initial_std):
    """Class 2's pixels are present but never classified correctly, so its queues stay empty and its
    mixture keeps its initial stds while the M-step fits classes 0 and 1 (stds near 0.1 in 64 dims). With
    the default initial stds a pixel at class 2's own mean is still classified as class 2; with the
    reference's initial stds of 1 (which its first M-step replaces, from queues of random vectors) nothing
    could ever be: the fitted classes' log-determinant terms outweigh any distance on the unit sphere."""
    dim = 64
    torch.manual_seed(0)
    predictor = GMMPredictor(16, 3, embed_dim=dim, num_components=2, norm="", initial_std=initial_std)
    hook = GMMEMHook(predictor, capacity=100, max_per_step=20, interval=2)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(40)
    initial = predictor.gmm.stds.clone()
    steps = []
    for _ in range(2):
        noise = 0.05 * torch.randn(len(labels), dim, generator=g)
        steps.append((F.normalize(predictor.gmm.means[labels, 0] + noise, dim=-1), labels, labels != 2))
    _run_hook(hook, predictor, steps)
    assert (predictor.gmm.stds[:2].mean(dim=(1, 2)) < 0.15).all()  # classes 0 and 1 fitted
    assert torch.equal(predictor.gmm.stds[2], initial[2])  # class 2 not
    at_own_mean = predictor.score(predictor.gmm.means[2, 0][None])["logits"].argmax(-1).item()
    assert (at_own_mean == 2) == (initial_std is None)


def test_state_dict_round_trip_restores_memory_and_seen_classes():
    predictor = _predictor()
    hook = GMMEMHook(predictor, capacity=30, max_per_step=7, interval=10)
    _run_hook(hook, predictor, [_step_data(s) for s in range(3)])
    other = GMMEMHook(_predictor(seed=1), capacity=30, max_per_step=7, interval=10)
    other.load_state_dict(hook.state_dict())
    for key, value in hook.online.memory.state_dict().items():
        assert torch.equal(other.online.memory.state_dict()[key], value), key
    assert torch.equal(other.online.seen, hook.online.seen) and other.online.seen[:2].all()


@pytest.mark.parametrize("memory_init", ["empty", "random"])
def test_random_init_updates_classes_present_even_when_nothing_was_enqueued(memory_init):
    """No pixel is classified correctly, so nothing is enqueued. "empty" leaves every mixture as it was;
    "random" (the reference) updates the classes present, 0 and 2, from their queues of random vectors."""
    predictor = _predictor()
    hook = GMMEMHook(predictor, capacity=30, max_per_step=5, interval=2, memory_init=memory_init)
    memory0 = {k: v.clone() for k, v in hook.online.memory.state_dict().items()}
    means0, stds0 = predictor.gmm.means.clone(), predictor.gmm.stds.clone()
    steps = []
    for s in range(2):
        emb, labels, correct = _step_data(s, classes=(0, 2))
        steps.append((emb, labels, torch.zeros_like(correct)))
    _run_hook(hook, predictor, steps)
    for key, value in memory0.items():  # nothing written: the memory is still its initial state
        assert torch.equal(hook.online.memory.state_dict()[key], value), key
    changed = (predictor.gmm.stds != stds0).any(dim=-1).any(dim=-1)
    if memory_init == "empty":
        assert not changed.any() and torch.equal(predictor.gmm.means, means0)
        return
    assert changed.tolist() == [True, False, True, False]
    assert torch.all(hook.online.memory.count == 30)
    expected_means, expected_stds = predictor.gmm.means.clone(), predictor.gmm.stds.clone()
    full_means, full_stds = m_step(hook.online.memory, means0, stds0, mean_momentum=0.999, var_floor=0.01)
    for c in (0, 2):
        torch.testing.assert_close(expected_means[c], full_means[c])
        torch.testing.assert_close(expected_stds[c], full_stds[c])
    assert not hook.online.seen.any()  # cleared by the M-step


def test_random_init_resume_restores_the_saved_memory_not_a_new_draw():
    predictor = _predictor()
    hook = GMMEMHook(predictor, capacity=30, max_per_step=7, interval=2, memory_init="random", seed=0)
    _run_hook(hook, predictor, [_step_data(s) for s in range(3)])
    assert (hook.online.memory.ptr > 0).any()  # real features displaced some random ones
    resumed_predictor = _predictor(seed=1)
    resumed_predictor.load_state_dict(predictor.state_dict())
    resumed = GMMEMHook(resumed_predictor, capacity=30, max_per_step=7, interval=2, memory_init="random")
    assert not torch.equal(
        resumed.online.memory.features, hook.online.memory.features
    )  # a fresh random draw ...
    resumed.load_state_dict(hook.state_dict())
    for key, value in hook.online.memory.state_dict().items():  # ... replaced by the checkpoint's memory
        assert torch.equal(resumed.online.memory.state_dict()[key], value), key
    assert torch.equal(resumed.online.seen, hook.online.seen)
    more = [_step_data(s) for s in range(3, 5)]  # both continue alike (an M-step included)
    _run_hook(hook, predictor, more)
    _run_hook(resumed, resumed_predictor, more)
    assert torch.equal(resumed_predictor.gmm.means, predictor.gmm.means)
    assert torch.equal(resumed.online.memory.features, hook.online.memory.features)


def test_random_init_from_config_is_seeded_by_cfg_seed():
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.MODEL.GMM.MEMORY_CAPACITY, cfg.MODEL.GMM.MEMORY_INIT = 12, "random"

    def memory(seed: int) -> torch.Tensor:
        cfg.SEED = seed
        return GMMEMHook.from_config(cfg, _predictor()).online.memory.features

    expected = FeatureMemory(C, K, D, capacity=12)
    expected.fill_random(torch.Generator().manual_seed(5))
    assert torch.equal(memory(5), expected.features) and torch.equal(memory(5), memory(5))
    assert torch.equal(memory(-1), memory(0)) and not torch.equal(memory(0), memory(5))
    cfg.MODEL.GMM.MEMORY_INIT = "empty"
    assert torch.all(GMMEMHook.from_config(cfg, _predictor()).online.memory.features == 0)
    with pytest.raises(ValueError, match="capacity"):
        GMMEMHook(_predictor(), capacity=0, memory_init="random")
    # from a config, "random" with no memory (the default start with the paper's no-memory ablation) is
    # the batch-only memory: nothing random to start with
    cfg.MODEL.GMM.MEMORY_CAPACITY, cfg.MODEL.GMM.MEMORY_INIT = 0, "random"
    online = GMMEMHook.from_config(cfg, _predictor()).online
    assert online.batch_only and online.memory_init == "empty"
    assert torch.all(online.memory.features == 0)


def test_a_step_without_an_em_batch_is_an_error():
    predictor = _predictor()
    hook = GMMEMHook(predictor, capacity=10)
    assert predictor.em_observer == hook.observe  # the hook subscribed to the predictor's channel
    hook.trainer = types.SimpleNamespace(iter=0, storage=None)
    with pytest.raises(RuntimeError, match="no EM batch"):
        hook.after_step()


def test_backprop_predictors_hand_over_no_em_batch():
    torch.manual_seed(0)
    predictor = GMMPredictor(16, C, embed_dim=D, num_components=K, norm="", fit="backprop")
    received = []
    predictor.em_observer = received.append
    outputs = predictor(torch.randn(1, 16, 4, 4))
    predictor.losses(outputs, torch.randint(0, C, (1, 16, 16)), torch.randn(1, C, 16, 16))
    assert received == []


@pytest.mark.parametrize("sampling", ["uniform", "random"])
def test_checkpoint_state_of_release_0_1_0_loads(sampling):
    """Release 0.1.0 saved the hook's state as {"memory": {features, ptr, count, sums, sq_sums}, "seen",
    "generator"} (written out by hand here); it loads into the current hook, which then continues exactly
    as the hook that saved it."""
    kwargs = dict(capacity=30, max_per_step=7, interval=2, sampling=sampling)
    predictor = _predictor()
    hook = GMMEMHook(predictor, **kwargs)
    _run_hook(hook, predictor, [_step_data(s) for s in range(3)])
    memory = hook.online.memory
    old = {
        "memory": {
            "features": memory.features.clone(),
            "ptr": memory.ptr.clone(),
            "count": memory.count.clone(),
            "sums": memory.sums.clone(),
            "sq_sums": memory.sq_sums.clone(),
        },
        "seen": hook.online.seen.clone(),
        "generator": hook.online.state_dict()["sampling_generator"] if sampling == "random" else None,
    }
    assert hook.online.seen.any()  # step 3 is after the last M-step: some classes wait for the next one
    upgraded = upgrade_em_hook_state(old)
    assert set(upgraded) == set(hook.state_dict())
    assert upgrade_em_hook_state(upgraded) == upgraded  # the current layout is left as it is

    resumed_predictor = _predictor(seed=1)
    resumed_predictor.load_state_dict(predictor.state_dict())
    resumed = GMMEMHook(resumed_predictor, **kwargs)
    resumed.load_state_dict(old)
    for key, value in hook.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    more = [_step_data(s) for s in range(3, 6)]
    _run_hook(hook, predictor, more)
    _run_hook(resumed, resumed_predictor, more)
    assert torch.equal(resumed_predictor.gmm.means, predictor.gmm.means)
    assert torch.equal(resumed_predictor.gmm.stds, predictor.gmm.stds)
    for key, value in hook.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def _two_process_worker(rank: int, init_file: str, steps, out_dir: str, method: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        predictor = _predictor(method=method)
        hook = GMMEMHook(predictor, capacity=40, max_per_step=6, interval=2, mean_momentum=0.9)
        _run_hook(hook, predictor, steps, rank=rank, world=2)
        torch.save(
            {"means": predictor.gmm.means, "stds": predictor.gmm.stds, "memory": hook.online.state_dict()},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sinkhorn", "vanilla"])
def test_two_processes_match_each_other_and_one_process_with_their_e_steps(tmp_path, method):
    """Both processes enqueue the gathered batch with the assignments each one's E-step gave its share
    (those of its component loss), so they stay identical, and equal one process fed that global batch.
    With the vanilla E-step (per item) that is also one process running the E-step on the global batch;
    with Sinkhorn (an equipartition over the items it is given) the shares' assignments differ from it."""
    steps = [_step_data(s, n=50, classes=(0, 1, 2)) for s in range(5)]
    args = (str(tmp_path / "init"), steps, str(tmp_path), method)
    mp.spawn(_two_process_worker, args=args, nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))

    predictor = _predictor(method=method)
    hook = GMMEMHook(predictor, capacity=40, max_per_step=6, interval=2, mean_momentum=0.9)
    hook.trainer = types.SimpleNamespace(iter=0, storage=None)
    differs = False
    with EventStorage(0) as storage:
        hook.trainer.storage = storage
        for it, (emb, labels, correct) in enumerate(steps):
            # the global batch in the order the gather produces: rank 0's share, then rank 1's
            shares = [_em_batch(predictor, emb[r::2], labels[r::2], correct[r::2]) for r in range(2)]
            batch = EMBatch(*(torch.cat([getattr(b, f.name) for b in shares]) for f in fields(EMBatch)))
            whole = _em_batch(predictor, batch.embeddings, batch.labels, batch.correct).assignment
            if method == "vanilla":  # the E-step on the global batch gives the same assignments
                assert torch.equal(batch.assignment, whole)
            differs |= not torch.equal(batch.assignment, whole)
            predictor.em_observer(batch)
            hook.trainer.iter = storage.iter = it
            hook.after_step()
    assert differs == (method == "sinkhorn")

    for key in ("means", "stds"):
        assert torch.equal(r0[key], r1[key]), key
    assert torch.allclose(r0["means"], predictor.gmm.means, atol=1e-6)
    assert torch.allclose(r0["stds"], predictor.gmm.stds, atol=1e-6)
    assert not torch.equal(predictor.gmm.means, _predictor().gmm.means)  # EM did run
    for key, value in hook.online.state_dict().items():
        assert torch.equal(r0["memory"][key], r1["memory"][key]), key
        assert torch.allclose(r0["memory"][key].double(), value.double(), atol=1e-9), key
