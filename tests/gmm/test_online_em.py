"""OnlineGMM on its own: observe (E-step + enqueue) and maximise (M-step) against direct float64
computations on the memory's contents, only the classes seen changing, the memory_init and capacity-0
variants, and the state_dict round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Independent, Normal

from gmmseg.gmm import EStep, FeatureMemory, GaussianMixtureClassifier, OnlineGMM, m_step

C, K, D = 4, 3, 8


def _classifier(seed: int = 0) -> GaussianMixtureClassifier:
    clf = GaussianMixtureClassifier(C, K, D, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    clf.update_parameters(F.normalize(torch.randn(C, K, D, generator=g), dim=-1), 0.2 + torch.rand(C, K, D))
    return clf


def _batch(seed: int, n: int = 60, classes=(0, 2)):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(n, D, generator=g), dim=1)
    labels = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=g)]
    correct = torch.rand(n, generator=g) > 0.25
    return emb, labels, correct


def _own_log_prob64(clf: GaussianMixtureClassifier, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, K) log N(x | mu_ck, s_ck) of each item's own class, by torch.distributions in float64."""
    dist = Independent(Normal(clf.means.double()[labels], clf.stds.double()[labels]), 1)
    return dist.log_prob(x.double()[:, None, :])


def _reference_m_step(queues, means, stds, mean_momentum, cov_momentum, var_floor):
    """GMMSeg's M-step for one queue's stored features (n, D), directly in float64."""
    f = queues.double()
    new_mean = f.sum(0) / f.sum(0).norm()
    mixed = mean_momentum * means.double() + (1 - mean_momentum) * new_mean
    var = (f - new_mean).square().mean(0) + var_floor
    return mixed / mixed.norm(), cov_momentum * stds.double() + (1 - cov_momentum) * var.sqrt()


@pytest.mark.parametrize("method", ["sinkhorn", "vanilla"])
def test_observe_runs_the_e_step_unless_given_and_enqueues_the_correct_items(method):
    clf = _classifier()
    online = OnlineGMM(clf, e_step=EStep(method), capacity=100, max_per_step=0, interval=10)
    emb, labels, correct = _batch(0)
    written, marked = online.observe(emb, labels, correct)
    assert written == int(correct.sum()) and marked == 2
    assert online.seen.tolist() == [True, False, True, False]
    # the same E-step run by the caller and passed in gives the same memory
    given = OnlineGMM(clf, e_step=EStep(method), capacity=100, max_per_step=0, interval=10)
    assignment = EStep(method).assign(clf.component_log_prob(emb), labels)
    given.observe(emb, labels, correct, assignment)
    for key, value in online.state_dict().items():
        assert torch.equal(given.state_dict()[key], value), key
    # each queue holds exactly its correct items, in batch order
    for c in (0, 2):
        for k in range(K):
            chosen = (labels == c) & correct & (assignment == k)
            assert torch.equal(online.memory.queue(c, k), emb[chosen])
    if method == "vanilla":  # plain EM: the most likely own component, from an independent computation
        own = _own_log_prob64(clf, emb, labels)
        assert torch.equal(assignment, own.argmax(dim=1))


def test_enqueue_correct_only_false_takes_every_labelled_item_and_skips_the_rest():
    online = OnlineGMM(_classifier(), enqueue_correct_only=False, capacity=100, max_per_step=0)
    emb, labels, correct = _batch(1)
    labels[:5] = -1  # unlabelled
    labels[5:8] = C  # outside [0, C)
    written, _ = online.observe(emb, labels, torch.zeros_like(correct))
    assert written == len(labels) - 8 == int(online.memory.count.sum())


@pytest.mark.parametrize("cov_momentum", [0.0, 0.3])
def test_maximise_is_the_m_step_on_the_memory_for_the_classes_seen_only(cov_momentum):
    clf = _classifier()
    online = OnlineGMM(
        clf,
        capacity=30,
        max_per_step=7,
        interval=2,
        mean_momentum=0.9,
        cov_momentum=cov_momentum,
        var_floor=0.02,
    )
    for s in range(3):
        online.observe(*_batch(s))
    assert online.seen.tolist() == [True, False, True, False]
    means0, stds0 = clf.means.clone(), clf.stds.clone()
    queues = {(c, k): online.memory.queue(c, k).clone() for c in range(C) for k in range(K)}
    shift = online.maximise()
    for (c, k), queue in queues.items():
        if c in (1, 3) or len(queue) == 0:  # not seen, or an empty queue: untouched
            assert torch.equal(clf.means[c, k], means0[c, k]) and torch.equal(clf.stds[c, k], stds0[c, k])
            continue
        mean, std = _reference_m_step(queue, means0[c, k], stds0[c, k], 0.9, cov_momentum, 0.02)
        torch.testing.assert_close(clf.means[c, k].double(), mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(clf.stds[c, k].double(), std, rtol=0, atol=1e-6)
    moved = (clf.means - means0)[[0, 2]].norm(dim=-1).mean().item()
    assert shift == pytest.approx(moved) and shift > 0
    assert not online.seen.any()  # cleared: a second M-step without new data changes nothing
    means1 = clf.means.clone()
    assert online.maximise() == 0.0 and torch.equal(clf.means, means1)


def test_maximise_with_every_class_seen_is_exactly_m_step():
    clf = _classifier()
    online = OnlineGMM(clf, capacity=20, max_per_step=0, mean_momentum=0.9, enqueue_correct_only=False)
    emb, labels, correct = _batch(2, n=200, classes=(0, 1, 2, 3))
    online.observe(emb, labels, correct)
    assert online.seen.all()
    expected = m_step(online.memory, clf.means, clf.stds, mean_momentum=0.9)
    online.maximise()
    assert torch.equal(clf.means, expected[0]) and torch.equal(clf.stds, expected[1])


@pytest.mark.parametrize("memory_init", ["empty", "random"])
def test_classes_present_but_never_enqueued_change_only_with_the_random_memory(memory_init):
    clf = _classifier()
    online = OnlineGMM(clf, capacity=30, max_per_step=5, memory_init=memory_init, seed=0)
    memory0 = {k: v.clone() for k, v in online.state_dict().items()}
    means0, stds0 = clf.means.clone(), clf.stds.clone()
    emb, labels, correct = _batch(3)
    assert online.observe(emb, labels, torch.zeros_like(correct))[0] == 0  # nothing correct: none written
    for key in ("memory.features", "memory.count", "memory.ptr"):
        assert torch.equal(online.state_dict()[key], memory0[key]), key
    online.maximise()
    changed = (clf.stds != stds0).any(dim=-1).any(dim=-1)
    if memory_init == "empty":
        assert not changed.any() and torch.equal(clf.means, means0)
        return
    assert changed.tolist() == [True, False, True, False]  # the classes present, from random vectors
    full_means, full_stds = m_step(online.memory, means0, stds0, mean_momentum=0.999, var_floor=0.01)
    expected = FeatureMemory(C, K, D, capacity=30)
    expected.fill_random(torch.Generator().manual_seed(0))
    assert torch.equal(online.memory.features, expected.features)
    for c in (0, 2):
        assert torch.equal(clf.means[c], full_means[c]) and torch.equal(clf.stds[c], full_stds[c])


def test_capacity_zero_keeps_only_the_steps_since_the_last_m_step():
    online = OnlineGMM(_classifier(), capacity=0, max_per_step=10, interval=2, mean_momentum=0.0)
    assert online.batch_only and online.memory.capacity == 20
    online.observe(*_batch(4))
    assert int(online.memory.count.sum()) > 0
    online.maximise()
    assert int(online.memory.count.sum()) == 0


def test_due_every_interval_and_invalid_settings():
    online = OnlineGMM(_classifier(), capacity=5, interval=3)
    assert [s for s in range(1, 10) if online.due(s)] == [3, 6, 9]
    with pytest.raises(ValueError, match="capacity"):
        OnlineGMM(_classifier(), capacity=0, memory_init="random")
    with pytest.raises(ValueError, match="back-propagation"):
        OnlineGMM(GaussianMixtureClassifier(C, K, D, trainable=True))
    with pytest.raises(ValueError, match="sinkhorn"):
        EStep("kmeans")


def test_state_dict_round_trip_continues_identically():
    """Random sampling draws from the object's own generator: its state travels with the memory."""
    kwargs = dict(capacity=12, max_per_step=4, sampling="random", interval=2)
    clf = _classifier()
    online = OnlineGMM(clf, **kwargs)
    for s in range(3):
        online.observe(*_batch(s))
    state = online.state_dict()
    assert set(state) == {
        "memory.features", "memory.ptr", "memory.count", "memory.sums", "memory.sq_sums", "seen",
        "sampling_generator",
    }  # fmt: skip
    other_clf = _classifier(seed=5)
    other_clf.load_state_dict(clf.state_dict())
    other = OnlineGMM(other_clf, **kwargs)
    other.load_state_dict(state)
    for key, value in state.items():
        assert torch.equal(other.state_dict()[key], value), key
    for s in range(3, 6):  # both continue alike, an M-step included
        for o in (online, other):
            o.observe(*_batch(s))
        if s % 2:
            online.maximise()
            other.maximise()
    for key, value in online.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key
    assert torch.equal(other_clf.means, clf.means) and torch.equal(other_clf.stds, clf.stds)
    with pytest.raises(KeyError, match="unexpected"):
        other.load_state_dict({**state, "memory": {}})
    uniform = OnlineGMM(_classifier(), capacity=12)
    assert "sampling_generator" not in uniform.state_dict()
