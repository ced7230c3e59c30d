"""Per-latent bandwidth on every backend, and the threshold parameterisations of JumpReLUSAE.

- A ``[d_sae]`` bandwidth whose entries are all equal gives exactly the scalar result, forward and backward.
- A varying per-latent bandwidth gives, latent by latent, the scalar reference with that latent's ε.
- ``threshold_parameterization="log"``: θ = exp(log θ) in float32, not clamped, saved and loaded.
"""
import pytest
import torch

import fastsae
from conftest import BACKENDS
from fastsae import reference as ref

D_IN, D_SAE, B = 11, 29, 13


def pre_near_threshold(threshold, bandwidth, rows=B, seed=0):
    """Random pre-activations with many entries inside each latent's own window (never zeros)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(rows, threshold.numel(), generator=gen) * 4 - 2  # u in (-2, 2): ~1/4 inside |u| < 1/2
    return (threshold + u * bandwidth).to(torch.float32)


def per_latent_bandwidth(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.exp(torch.empty(D_SAE).uniform_(-7, -1, generator=gen))  # 1e-3 .. 0.37


def op_with_grads(op, pre, threshold, bandwidth, backend, gen_seed=5):
    pre = pre.clone().requires_grad_(True)
    threshold = threshold.clone().requires_grad_(True)
    y = op(pre, threshold, bandwidth, backend=backend)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(gen_seed))
    (y * w).sum().backward()
    return y.detach(), pre.grad, threshold.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", [fastsae.jumprelu, fastsae.step], ids=["jumprelu", "step"])
@pytest.mark.parametrize("eps", [1e-3, 0.05])
def test_equal_entries_equal_scalar(op, backend, eps):
    threshold = torch.rand(D_SAE) * 0.1 + 0.01
    pre = pre_near_threshold(threshold, torch.full((D_SAE,), eps))
    scalar = op_with_grads(op, pre, threshold, eps, backend)
    vector = op_with_grads(op, pre, threshold, torch.full((D_SAE,), eps), backend)
    for s, v in zip(scalar, vector):
        assert torch.equal(s, v)
    assert (scalar[2] != 0).any()  # the windows were hit: the θ-gradient was really exercised


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,ref_op", [(fastsae.jumprelu, ref.jumprelu), (fastsae.step, ref.step)],
                         ids=["jumprelu", "step"])
def test_varying_entries_are_per_latent_scalars(op, ref_op, backend):
    eps = per_latent_bandwidth()
    threshold = torch.rand(D_SAE) * 0.1 + 0.01
    pre = pre_near_threshold(threshold, eps, rows=17)
    y, g_pre, g_th = op_with_grads(op, pre, threshold, eps, backend)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    for j in range(D_SAE):  # column j with the scalar ε_j, through the eager reference
        p = pre[:, j:j + 1].clone().requires_grad_(True)
        t = threshold[j:j + 1].clone().requires_grad_(True)
        yj = ref_op(p, t, float(eps[j]))
        (yj * w[:, j:j + 1]).sum().backward()
        torch.testing.assert_close(y[:, j:j + 1], yj.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g_pre[:, j:j + 1], p.grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g_th[j:j + 1], t.grad, rtol=1e-5, atol=1e-5)
    assert (g_th != 0).sum() > D_SAE // 2


def make_sae(backend, bandwidth, dtype=torch.float64, **kw):
    torch.manual_seed(0)
    sae = fastsae.JumpReLUSAE(D_IN, D_SAE, bandwidth=bandwidth, threshold_init=0.05, backend=backend, dtype=dtype,
                              **kw)
    with torch.no_grad():
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
        sae.b_enc.add_(0.05 * torch.randn_like(sae.b_enc))
        sae.b_dec.add_(0.05 * torch.randn_like(sae.b_dec))
        sae.threshold.copy_(torch.rand(D_SAE, dtype=sae.threshold.dtype) * 0.2)
    return sae


def train_grads(sae, x):
    out = sae.training_forward(x)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in sae.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_sae_per_latent_bandwidth_on_every_backend(backend):
    x = torch.randn(B, D_IN, dtype=torch.float64)
    eps = per_latent_bandwidth().double()
    # (1) all-equal [d_sae] bandwidth == scalar, exactly, on this backend
    o_s, g_s = train_grads(make_sae(backend, 0.07), x)
    o_v, g_v = train_grads(make_sae(backend, torch.full((D_SAE,), 0.07, dtype=torch.float64)), x)
    assert torch.equal(o_s.loss, o_v.loss) and torch.equal(o_s.x_hat, o_v.x_hat)
    for name in g_s:
        assert torch.equal(g_s[name], g_v[name]), name
    assert (g_s["threshold"] != 0).any()
    # (2) a varying per-latent bandwidth agrees with the eager reference, forward and every gradient
    o_b, g_b = train_grads(make_sae(backend, eps), x)
    o_e, g_e = train_grads(make_sae("eager", eps), x)
    torch.testing.assert_close(o_b.loss, o_e.loss, rtol=1e-9, atol=1e-9)
    for name in g_e:
        torch.testing.assert_close(g_b[name], g_e[name], rtol=1e-9, atol=1e-9, msg=name)
    # and differs from any single bandwidth where it should: the per-latent ε reaches the θ-gradient
    assert not torch.allclose(g_b["threshold"], g_s["threshold"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_threshold_with_per_latent_bandwidth_on_every_backend(backend):
    """θ = exp(log θ) is a non-leaf tensor: the fused kernels must still route its gradient to log θ."""
    x = torch.randn(B, D_IN, dtype=torch.float64)
    eps = per_latent_bandwidth().double()
    grads = {}
    for be in ("eager", backend):
        sae = make_sae(be, eps)
        log = fastsae.JumpReLUSAE(D_IN, D_SAE, bandwidth=eps, threshold_parameterization="log", backend=be,
                                  dtype=torch.float64)
        with torch.no_grad():
            sae.threshold.clamp_(min=1e-3)  # log θ needs θ > 0
        log.load_state_dict(sae.state_dict())
        out, grads[be] = train_grads(log, x)
    for name in grads["eager"]:
        torch.testing.assert_close(grads[backend][name], grads["eager"][name], rtol=1e-9, atol=1e-9, msg=name)
    assert (grads[backend]["log_threshold"] != 0).any()


def test_log_parameterisation():
    x = torch.randn(B, D_IN, dtype=torch.float64)
    direct = make_sae("eager", 0.05)
    log = fastsae.JumpReLUSAE(D_IN, D_SAE, bandwidth=0.05, threshold_parameterization="log", backend="eager",
                              dtype=torch.float64)
    log.load_state_dict(direct.state_dict())  # a direct `threshold` loads into log θ
    assert "log_threshold" in dict(log.named_parameters()) and "threshold" not in dict(log.named_parameters())
    torch.testing.assert_close(log.threshold, direct.threshold)
    o_d, g_d = train_grads(direct, x)
    o_l, g_l = train_grads(log, x)
    torch.testing.assert_close(o_l.loss, o_d.loss)
    # chain rule: ∂L/∂log θ = θ · ∂L/∂θ
    torch.testing.assert_close(g_l["log_threshold"], direct.threshold.detach() * g_d["threshold"])
    # no clamp in log mode (θ > 0 by construction); direct mode clamps at 0
    with torch.no_grad():
        log.log_threshold.fill_(-30.0)
        direct.threshold.fill_(-1.0)
    log.apply_constraints()
    direct.apply_constraints()
    assert bool((log.log_threshold == -30.0).all()) and bool((direct.threshold == 0).all())
    # and back: a log-θ state dict loads into a direct module
    back = fastsae.JumpReLUSAE(D_IN, D_SAE, backend="eager", dtype=torch.float64)
    back.load_state_dict(log.state_dict())
    torch.testing.assert_close(back.threshold.detach(), log.threshold.detach())
    with pytest.raises(ValueError, match="threshold_parameterization"):
        fastsae.JumpReLUSAE(D_IN, D_SAE, threshold_parameterization="softplus")
    with pytest.raises(ValueError, match="threshold_init"):
        fastsae.JumpReLUSAE(D_IN, D_SAE, threshold_parameterization="log", threshold_init=0.0)


@pytest.mark.parametrize("param", ["direct", "log"])
def test_threshold_stays_float32_whatever_the_compute_dtype(param):
    sae = fastsae.JumpReLUSAE(D_IN, D_SAE, bandwidth="adaptive", threshold_parameterization=param,
                              dtype=torch.bfloat16, backend="eager")
    stored = sae.log_threshold if param == "log" else sae.threshold
    assert sae.W_enc.dtype == torch.bfloat16
    assert stored.dtype == sae.threshold.dtype == sae.bandwidth.dtype == torch.float32
    x = torch.randn(8, D_IN)
    out = sae.training_forward(x)
    out.loss.backward()
    assert stored.grad.dtype == torch.float32
    # .to(dtype) moves the compute dtype only; θ keeps its float32 value (no bf16 round trip)
    f32 = fastsae.JumpReLUSAE(D_IN, D_SAE, threshold_parameterization=param, threshold_init=0.0123)
    f32.to(torch.bfloat16)
    assert f32.W_enc.dtype == torch.bfloat16 and f32.threshold.dtype == torch.float32
    torch.testing.assert_close(f32.threshold.detach(), torch.full((D_SAE,), 0.0123), rtol=1e-6, atol=0)
    f32.to(torch.float64)  # a float64 SAE keeps θ in float64
    assert f32.threshold.dtype == torch.float64 and f32.bandwidth.dtype == torch.float64


@pytest.mark.parametrize("param", ["direct", "log"])
def test_save_load_keeps_parameterisation_and_adapted_bandwidth(param, tmp_path):
    sae = fastsae.JumpReLUSAE(D_IN, D_SAE, bandwidth="adaptive", adaptive=dict(target_hits=4.0),
                              threshold_parameterization=param, backend="eager")
    x = torch.randn(64, D_IN)
    for _ in range(5):
        sae.observe(x, sae.training_forward(x))
    assert not torch.equal(sae.bandwidth, torch.full((D_SAE,), sae.adaptive.eps_init))
    sae.save(tmp_path / "sae")
    back = fastsae.load(tmp_path / "sae", backend="eager")
    assert back.threshold_parameterization == param and back.adaptive == sae.adaptive
    assert torch.equal(back.bandwidth, sae.bandwidth)
    torch.testing.assert_close(back(x), sae(x), rtol=0, atol=0)
