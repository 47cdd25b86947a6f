"""diag_gaussian_log_prob against torch.distributions (float64 references)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch.distributions import Independent, Normal

from gmmseg.gmm import diag_gaussian_log_prob


def reference(x: torch.Tensor, means: torch.Tensor, stds: torch.Tensor) -> torch.Tensor:
    dist = Independent(Normal(means.double(), stds.double()), 1)
    return dist.log_prob(x.double()[:, None, :])


def make(n: int, m: int, d: int, std_scale: float, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(m, d, generator=g, dtype=torch.float64)
    x = means[torch.randint(m, (n,), generator=g)] + std_scale * torch.randn(
        n, d, generator=g, dtype=torch.float64
    )
    stds = std_scale * (0.5 + torch.rand(m, d, generator=g, dtype=torch.float64))
    return x.to(dtype), means.to(dtype), stds.to(dtype)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("std_scale", [1e-3, 0.1, 1.0, 1e3])
def test_matches_torch_distributions_float64(seed: int, std_scale: float) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    n, m, d = (int(v) for v in torch.randint(1, 40, (3,), generator=g))
    x, means, stds = make(n, m, d, std_scale, seed)
    ours = diag_gaussian_log_prob(x, means, stds)
    ref = reference(x, means, stds)
    assert ours.dtype == torch.float64 and ours.shape == (n, m)
    scale = ref.abs().amax().clamp_min(1.0)
    assert ((ours - ref).abs().amax() / scale) < 1e-10


@pytest.mark.parametrize("std_scale", [1e-3, 0.1, 1.0, 1e3])
def test_float32_close_to_float64_reference(std_scale: float) -> None:
    x, means, stds = make(300, 20, 64, std_scale, seed=7)
    ref = reference(x, means, stds)
    ours = diag_gaussian_log_prob(x.float(), means.float(), stds.float())
    assert ours.dtype == torch.float32
    # relative to the magnitude of the log-likelihoods (which cross zero, so no elementwise ratio)
    assert ((ours.double() - ref).abs().amax() / ref.abs().amax()) < 1e-5


def test_far_from_origin_is_accurate_in_float32() -> None:
    # data and means offset by a large constant: the centring keeps the expansion accurate
    x, means, stds = make(200, 10, 16, 0.1, seed=3)
    x, means = x + 100.0, means + 100.0
    ref = reference(x, means, stds)
    ours = diag_gaussian_log_prob(x.float(), means.float(), stds.float())
    assert ((ours.double() - ref).abs().amax() / ref.abs().amax()) < 1e-4


def test_half_inputs_are_upcast() -> None:
    x, means, stds = make(50, 6, 8, 0.5, seed=1, dtype=torch.float16)
    ours = diag_gaussian_log_prob(x, means, stds)
    assert ours.dtype == torch.float32
    ref = reference(x, means, stds)  # of the same (half-rounded) values
    assert ((ours.double() - ref).abs().amax() / ref.abs().amax()) < 1e-5


def test_mixed_dtypes_promote() -> None:
    x, means, stds = make(10, 3, 4, 1.0, seed=2)
    assert diag_gaussian_log_prob(x.float(), means, stds).dtype == torch.float64


def test_chunked_path_equals_autograd_path() -> None:
    x, means, stds = make(103, 9, 5, 0.3, seed=5)
    chunked = diag_gaussian_log_prob(x, means, stds, chunk_size=10)
    with torch.enable_grad():
        full = diag_gaussian_log_prob(x.clone().requires_grad_(), means, stds)
    torch.testing.assert_close(chunked, full.detach(), rtol=0, atol=1e-12)
    assert torch.allclose(chunked, reference(x, means, stds), rtol=0, atol=1e-10)


def test_never_above_normaliser() -> None:
    # x exactly at the means: the Mahalanobis term is 0 and must not go negative through round-off
    _, means, stds = make(1, 64, 64, 0.01, seed=4, dtype=torch.float32)
    out = diag_gaussian_log_prob(means, means, stds).diagonal().double()
    log_norm = -stds.double().log().sum(1) - 32 * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64))
    assert torch.all(out - log_norm <= 1e-6 * log_norm.abs())
    torch.testing.assert_close(out, log_norm, rtol=1e-3, atol=0)


def test_gradcheck_in_x() -> None:
    x, means, stds = make(6, 4, 3, 0.7, seed=9)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: diag_gaussian_log_prob(t, means, stds), (x,))
    # and the gradient equals the analytic one: d/dx sum_m log N = -sum_m (x - mu_m) / s_m^2
    out = diag_gaussian_log_prob(x, means, stds).sum()
    (grad,) = torch.autograd.grad(out, x)
    analytic = -((x[:, None, :] - means) / stds.square()).sum(1)
    torch.testing.assert_close(grad, analytic.detach())


def test_empty_and_bad_shapes() -> None:
    x, means, stds = make(0, 3, 4, 1.0, seed=0)
    assert diag_gaussian_log_prob(x, means, stds).shape == (0, 3)
    with pytest.raises(ValueError):
        diag_gaussian_log_prob(torch.zeros(3, 4), torch.zeros(2, 5), torch.ones(2, 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    x, means, stds = make(500, 30, 64, 0.2, seed=11, dtype=torch.float32)
    cpu = diag_gaussian_log_prob(x, means, stds)
    gpu = diag_gaussian_log_prob(x.cuda(), means.cuda(), stds.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-2)


def test_no_nmd_intermediate_in_memory() -> None:
    """Peak RSS growth stays far below the (N, M, D) broadcast (which would be 256 MiB here)."""
    code = textwrap.dedent(
        """
        import torch
        torch.set_num_threads(1)
        from gmmseg.gmm import diag_gaussian_log_prob

        def status_kib(field):
            for line in open("/proc/self/status"):
                if line.startswith(field + ":"):
                    return int(line.split()[1])

        n, m, d = 16384, 64, 64
        x = torch.randn(n, d); mu = torch.randn(m, d); s = torch.rand(m, d) + 0.5
        diag_gaussian_log_prob(x[:10], mu, s)  # warm-up (lazy init, thread pools)
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark
        before = status_kib("VmRSS")
        out = diag_gaussian_log_prob(x, mu, s)
        print((status_kib("VmHWM") - before) * 1024)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    grown = int(res.stdout.strip().splitlines()[-1])
    output_bytes = 16384 * 64 * 4
    assert grown < 4 * output_bytes, grown  # broadcast would be 64x the output
