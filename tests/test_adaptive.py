"""The adaptive-bandwidth rule (fastsae/adaptive.py): it finds ε* = H / (B p(θ)), stays in its bounds,
changes by at most max_factor per update, and follows a shifted distribution."""
import math

import pytest
import torch

import fastsae
from fastsae import adaptive

D_SAE = 7
B = 4096  # the training batch the hits are counted for


def gaussian_pre(n, sigma, gen):
    """Pre-activations N(0, σ_j²) per latent: density at θ = 0 is 1 / (σ_j √(2π))."""
    return torch.randn(n, sigma.numel(), generator=gen) * sigma


def run(rule, sigma, theta, steps, gen, bandwidth=None, state=None, rows=512, history=None):
    bandwidth = torch.full((sigma.numel(),), rule.eps_init) if bandwidth is None else bandwidth
    state = adaptive.new_state(sigma.numel(), torch.float32) if state is None else state
    for _ in range(steps):
        before = bandwidth.clone()
        adaptive.update(rule, bandwidth, state, gaussian_pre(rows, sigma, gen), theta, B)
        if history is not None:
            history.append((before, bandwidth.clone()))
    return bandwidth, state


def test_options_are_validated():
    with pytest.raises(ValueError, match="target_hits"):
        adaptive.AdaptiveBandwidth(target_hits=0)
    with pytest.raises(ValueError, match="eps_init"):
        adaptive.AdaptiveBandwidth(eps_min=1e-3, eps_init=1e-4)
    with pytest.raises(ValueError, match="max_factor"):
        adaptive.AdaptiveBandwidth(max_factor=1.0)
    with pytest.raises(ValueError, match="decay"):
        adaptive.AdaptiveBandwidth(decay=1.0)
    with pytest.raises(ValueError, match="band"):
        adaptive.AdaptiveBandwidth(band=0.5)
    with pytest.raises(ValueError, match="sample_rows"):
        adaptive.AdaptiveBandwidth(sample_rows=0)
    with pytest.raises(ValueError, match="unknown options"):
        adaptive.AdaptiveBandwidth.from_config({"target": 3})
    rule = adaptive.AdaptiveBandwidth(target_hits=8, every=3)
    assert adaptive.AdaptiveBandwidth.from_config(rule.config()) == rule


def test_band_density_counts_the_open_interval():
    pre = torch.tensor([[0.0, 1.0], [0.5, 1.2], [-0.49, 3.0], [1.0, 0.9]])
    theta = torch.tensor([0.0, 1.0])
    width = torch.tensor([1.0, 0.5])
    # latent 0: |pre| < 0.5 -> 0.0 and -0.49 (0.5 is on the open edge); latent 1: |pre - 1| < 0.25 -> 1.0, 1.2, 0.9
    torch.testing.assert_close(adaptive.band_density(pre, theta, width), torch.tensor([2 / 4, 3 / (4 * 0.5)]))


def test_converges_to_the_target_hit_count():
    gen = torch.Generator().manual_seed(0)
    sigma = torch.logspace(-1.5, 0.5, D_SAE)  # densities at θ differ by 100x between latents
    rule = adaptive.AdaptiveBandwidth(target_hits=16, eps_init=1e-3, eps_min=1e-5, eps_max=1.0)
    eps, _ = run(rule, sigma, torch.zeros(D_SAE), 300, gen)
    want = rule.target_hits * sigma * math.sqrt(2 * math.pi) / B
    torch.testing.assert_close(eps, want, rtol=0.2, atol=0)
    # and that is what it means: about target_hits kernel hits per batch of B rows, for every latent
    hits = adaptive.expected_hits(gaussian_pre(200_000, sigma, gen), torch.zeros(D_SAE), eps, B)
    torch.testing.assert_close(hits, torch.full((D_SAE,), 16.0), rtol=0.25, atol=0)


def test_stays_in_bounds_and_rate_limited():
    gen = torch.Generator().manual_seed(1)
    # latents 0-1 see no pre-activation near θ (rare/dead): ε must grow to eps_max and stop there;
    # latents 2-3 are extremely concentrated at θ: ε must shrink to eps_min and stop there.
    sigma = torch.tensor([1.0, 0.5, 1e-7, 1e-6, 0.1, 0.2, 0.3])
    theta = torch.tensor([50.0, 80.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    rule = adaptive.AdaptiveBandwidth(target_hits=16, eps_init=1e-2, eps_min=1e-3, eps_max=5e-2, max_factor=1.2)
    history = []
    eps, _ = run(rule, sigma, theta, 120, gen, history=history)
    for before, after in history:
        assert bool((after >= rule.eps_min).all()) and bool((after <= rule.eps_max).all())
        ratio = after / before
        assert bool((ratio <= rule.max_factor * (1 + 1e-6)).all()) and bool((ratio >= 1 / rule.max_factor / (1 + 1e-6)).all())
    assert eps[:2].tolist() == [pytest.approx(rule.eps_max)] * 2
    assert eps[2:4].tolist() == [pytest.approx(rule.eps_min)] * 2


def test_std_cap_keeps_the_window_inside_the_distribution():
    gen = torch.Generator().manual_seed(2)
    sigma = torch.full((D_SAE,), 0.01)
    # huge target: the hit rule alone would want ε ≫ σ; the cap holds it at max_std_fraction · σ
    rule = adaptive.AdaptiveBandwidth(target_hits=4096, eps_init=1e-3, eps_max=1.0, max_std_fraction=0.5)
    eps, _ = run(rule, sigma, torch.zeros(D_SAE), 200, gen)
    torch.testing.assert_close(eps, torch.full((D_SAE,), 0.005), rtol=0.1, atol=0)


def test_reacts_to_a_shifted_distribution():
    gen = torch.Generator().manual_seed(3)
    sigma = torch.full((D_SAE,), 0.1)
    rule = adaptive.AdaptiveBandwidth(target_hits=16, eps_init=1e-3, eps_min=1e-5, eps_max=1.0)
    eps, state = run(rule, sigma, torch.zeros(D_SAE), 200, gen)
    settled = eps.clone()
    # The pre-activations spread out 10x (density at θ drops 10x): ε must widen about 10x.
    eps, state = run(rule, sigma * 10, torch.zeros(D_SAE), 300, gen, bandwidth=eps, state=state)
    torch.testing.assert_close(eps / settled, torch.full((D_SAE,), 10.0), rtol=0.25, atol=0)
    # ... and the threshold moving into the tail (density there ~e^-2 of the mode's) widens it again.
    theta = torch.full((D_SAE,), 2.0)  # 2σ of the new distribution
    widened = eps.clone()
    eps, _ = run(rule, sigma * 10, theta, 300, gen, bandwidth=eps, state=state)
    torch.testing.assert_close(eps / widened, torch.full((D_SAE,), math.exp(2.0)), rtol=0.3, atol=0)


def test_module_observe_updates_only_adaptive_saes():
    torch.manual_seed(0)
    x = torch.randn(256, 9)
    fixed = fastsae.JumpReLUSAE(9, D_SAE, bandwidth=0.01, backend="eager")
    out = fixed.training_forward(x)
    fixed.observe(x, out)
    assert torch.equal(fixed.bandwidth, torch.full((D_SAE,), 0.01))

    sae = fastsae.JumpReLUSAE(9, D_SAE, bandwidth="adaptive", adaptive=dict(eps_init=1e-3, every=2),
                              backend="eager")
    assert sae.bandwidth.shape == (D_SAE,) and sae.bandwidth.dtype == torch.float32
    sae.observe(x, sae.training_forward(x))  # call 1: updates
    first = sae.bandwidth.clone()
    assert not torch.equal(first, torch.full((D_SAE,), 1e-3))
    sae.observe(x, sae.training_forward(x))  # call 2: skipped (every=2)
    assert torch.equal(sae.bandwidth, first)
    for _ in range(50):
        sae.observe(x, sae.training_forward(x))
    rule = sae.adaptive
    assert bool((sae.bandwidth >= rule.eps_min).all()) and bool((sae.bandwidth <= rule.eps_max).all())
    # the kernels take the adapted per-latent ε as is
    out = sae.training_forward(x)
    out.loss.backward()
    assert torch.isfinite(sae.threshold.grad).all()


def test_module_rejects_bad_bandwidth_options():
    with pytest.raises(ValueError, match="bandwidth"):
        fastsae.JumpReLUSAE(4, 5, bandwidth="wide")
    with pytest.raises(ValueError, match="adaptive"):
        fastsae.JumpReLUSAE(4, 5, bandwidth=0.01, adaptive=dict(target_hits=3))
    with pytest.raises(ValueError, match="target_hits"):
        fastsae.JumpReLUSAE(4, 5, bandwidth="adaptive", adaptive=dict(target_hits=-1))
    sae = fastsae.JumpReLUSAE(4, 5, bandwidth=adaptive.AdaptiveBandwidth(eps_init=0.02))
    assert torch.equal(sae.bandwidth, torch.full((5,), 0.02))


def test_fastsae_train_adapts_the_bandwidth():
    """Through the real training loop (which calls observe after every step), on a bf16 SAE."""
    from fastsae.data import synthetic
    from fastsae.training import train

    data = synthetic(4096, 16, 24, active=3, seed=0)
    sae = fastsae.JumpReLUSAE(16, 32, bandwidth="adaptive", adaptive=dict(eps_init=1e-3, eps_max=0.2),
                              dtype=torch.bfloat16, backend="eager")
    train(sae, data, steps=30, batch_size=256, progress=False)
    rule = sae.adaptive
    assert sae.bandwidth.dtype == torch.float32 and sae.threshold.dtype == torch.float32
    assert int(sae._adaptive_steps) == 30
    assert bool((sae.bandwidth >= rule.eps_min).all()) and bool((sae.bandwidth <= rule.eps_max).all())
    # started far too narrow for 256-row batches: every latent's window widened (by at most 1.1x per step)
    assert bool((sae.bandwidth > 1e-3).all()) and bool((sae.bandwidth <= 1e-3 * 1.1 ** 30 * 1.0001).all())
