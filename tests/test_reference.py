"""The eager reference against float64 autograd and against the pseudo-derivative formulas of DESIGN.md §1."""
import pytest
import torch
import torch.nn.functional as F

from fastsae import reference as ref

D64 = torch.float64


def window_pre(B, d_sae, threshold, eps, frac_window=0.4):
    """Pre-activations with a fraction placed strictly inside the rectangle window |u| < 0.4
    and the rest far from it (|u| > 0.6): none on the window's edges."""
    u_in = (torch.rand(B, d_sae, dtype=D64) - 0.5) * 0.8  # |u| < 0.4
    sign = torch.where(torch.rand(B, d_sae) < 0.5, -1.0, 1.0).to(D64)
    u_out = sign * (0.6 + 3 * torch.rand(B, d_sae, dtype=D64))
    u = torch.where(torch.rand(B, d_sae) < frac_window, u_in, u_out)
    return threshold + u * eps


@pytest.mark.parametrize("per_latent", [False, True])
def test_jumprelu_pseudo_derivatives(per_latent):
    B, d_sae = 9, 13
    theta = (0.05 + torch.rand(d_sae, dtype=D64)).requires_grad_()
    eps = (0.01 + 0.05 * torch.rand(d_sae, dtype=D64)) if per_latent else torch.tensor(0.03, dtype=D64)
    pre = window_pre(B, d_sae, theta.detach(), eps).requires_grad_()
    g = torch.randn(B, d_sae, dtype=D64)
    f = ref.jumprelu(pre, theta, eps)
    assert torch.equal(f, pre * (pre > theta))
    gp, gt = torch.autograd.grad(f, (pre, theta), g)
    u = (pre.detach() - theta.detach()) / eps
    K = ((u > -0.5) & (u < 0.5)).to(D64)
    assert K.sum() > 5  # the test really exercises the window
    assert torch.allclose(gp, g * (pre > theta).to(D64))
    assert torch.allclose(gt, (-(theta.detach() / eps) * K * g).sum(0))


@pytest.mark.parametrize("per_latent", [False, True])
def test_step_pseudo_derivatives(per_latent):
    B, d_sae = 8, 11
    theta = (0.05 + torch.rand(d_sae, dtype=D64)).requires_grad_()
    eps = (0.01 + 0.05 * torch.rand(d_sae, dtype=D64)) if per_latent else 0.02
    pre = window_pre(B, d_sae, theta.detach(), torch.as_tensor(eps, dtype=D64)).requires_grad_()
    g = torch.randn(B, d_sae, dtype=D64)
    h = ref.step(pre, theta, eps)
    assert torch.equal(h, (pre > theta).to(D64))
    gp, gt = torch.autograd.grad(h, (pre, theta), g)
    u = (pre.detach() - theta.detach()) / torch.as_tensor(eps, dtype=D64)
    K = ((u > -0.5) & (u < 0.5)).to(D64)
    assert torch.count_nonzero(gp) == 0  # no gradient to the encoder through the step
    assert torch.allclose(gt, (-(1 / torch.as_tensor(eps, dtype=D64)) * K * g).sum(0))


def test_rectangle_is_open_interval():
    u = torch.tensor([-0.5, -0.4999, 0.0, 0.4999, 0.5], dtype=D64)
    assert ref.rectangle(u).tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def params(d_in, d_sae, dtype=D64):
    torch.manual_seed(1)
    W_dec = torch.randn(d_sae, d_in, dtype=dtype) / d_in**0.5
    return dict(
        W_enc=(W_dec.t().clone() + 0.1 * torch.randn(d_in, d_sae, dtype=dtype)).requires_grad_(),
        b_enc=(0.1 * torch.randn(d_sae, dtype=dtype)).requires_grad_(),
        W_dec=W_dec.requires_grad_(),
        b_dec=(0.1 * torch.randn(d_in, dtype=dtype)).requires_grad_(),
    )


def test_jumprelu_loss_gradients_match_formulas():
    """Every gradient of the JumpReLU loss, against the closed forms of DESIGN.md §1."""
    B, d_in, d_sae, lam = 7, 5, 12, 0.3
    p = params(d_in, d_sae)
    x = torch.randn(B, d_in, dtype=D64)
    pre0 = (x @ p["W_enc"] + p["b_enc"]).detach()
    eps = 0.05 + 0.1 * torch.rand(d_sae, dtype=D64)
    # Place thresholds so that several (row, latent) pairs sit strictly inside the window.
    theta = (pre0[0] - 0.3 * eps).clamp_min(0.01)
    theta = torch.where(torch.rand(d_sae) < 0.5, theta, pre0.abs().mean(0)).requires_grad_()
    out = ref.jumprelu_loss(x, **p, threshold=theta, bandwidth=eps, sparsity_coefficient=lam)
    grads = torch.autograd.grad(out["loss"], [p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], theta])

    u = (pre0 - theta.detach()) / eps
    assert ((u.abs() - 0.5).abs() > 1e-6).all(), "no input on the window's edges"
    K = ((u > -0.5) & (u < 0.5)).to(D64)
    assert K.sum() >= 3
    H = (pre0 > theta.detach()).to(D64)
    f = pre0 * H
    x_hat = f @ p["W_dec"].detach() + p["b_dec"].detach()
    g_xhat = 2 * (x_hat - x) / B
    g_f = g_xhat @ p["W_dec"].detach().t()
    g_pre = g_f * H
    want_theta = (-(theta.detach() / eps) * K * g_f - (lam / B) * (1 / eps) * K).sum(0)
    want = [x.t() @ g_pre, g_pre.sum(0), f.t() @ g_xhat, g_xhat.sum(0), want_theta]
    for name, got, exp in zip(["W_enc", "b_enc", "W_dec", "b_dec", "threshold"], grads, want):
        assert torch.allclose(got, exp, atol=1e-10), name


def test_jumprelu_b_dec_through_encoder():
    """With apply_b_dec_to_input the encoder's b_dec gradient is -(Σ_b g_pre_b) @ W_encᵀ."""
    B, d_in, d_sae = 6, 4, 9
    p = params(d_in, d_sae)
    x = torch.randn(B, d_in, dtype=D64)
    theta = torch.full((d_sae,), 0.05, dtype=D64)
    out = ref.jumprelu_loss(x, **p, threshold=theta, bandwidth=1e-3, sparsity_coefficient=0.0,
                            apply_b_dec_to_input=True)
    (g_bdec,) = torch.autograd.grad(out["loss"], [p["b_dec"]])
    pre = ((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]).detach()
    H = (pre > theta).to(D64)
    x_hat = (pre * H) @ p["W_dec"].detach() + p["b_dec"].detach()
    g_xhat = 2 * (x_hat - x) / B
    g_pre = (g_xhat @ p["W_dec"].detach().t()) * H
    want = g_xhat.sum(0) - p["W_enc"].detach() @ g_pre.sum(0)
    assert torch.allclose(g_bdec, want, atol=1e-10)


def _gradcheck(fn, tensors):
    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("batch_topk", [False, True])
def test_topk_loss_against_float64_autograd(batch_topk):
    """TopK/BatchTopK (with AuxK) are piecewise smooth: finite differences in float64 confirm every gradient.

    AuxK's residual e is detached by definition, so the total gradient is checked as
    grad(MSE) + α·grad(AuxK with e held fixed), each part by finite differences."""
    B, d_in, d_sae, k, alpha = 6, 5, 14, 3, 1 / 32
    p = params(d_in, d_sae)
    x = torch.randn(B, d_in, dtype=D64)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[::3] = True
    fwd = ref.batchtopk_sae_forward if batch_topk else ref.topk_sae_forward

    def mse(*t):
        return ref.mse(fwd(x, *t, k).x_hat, x)

    out = ref.topk_loss(x, *p.values(), k, dead_mask=dead, k_aux=2, batch_topk=batch_topk)
    e = (x - out["x_hat"]).detach()

    def aux(W_enc, b_enc, W_dec, b_dec):
        e_hat = ref.auxk_reconstruction(x - b_dec, W_enc, b_enc, W_dec, dead, 2)
        return ref.auxk_loss(e, e_hat)

    _gradcheck(mse, tuple(p.values()))
    _gradcheck(aux, tuple(p.values()))
    assert out["aux"] > 0
    got = torch.autograd.grad(out["loss"], list(p.values()))
    g_mse = torch.autograd.grad(mse(*p.values()), list(p.values()))
    g_aux = torch.autograd.grad(aux(*p.values()), list(p.values()))
    for a, m, x_ in zip(got, g_mse, g_aux):
        assert torch.allclose(a, m + alpha * x_)
    if not batch_topk:
        pre = F.relu((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"])
        v, i = torch.topk(pre, k)
        f = torch.zeros_like(pre).scatter(1, i, v)
        assert torch.allclose(out["x_hat"], f @ p["W_dec"] + p["b_dec"])
    else:
        assert int((ref.batchtopk_sae_forward(x, *p.values(), k).l0).sum()) <= B * k


def test_auxk_definition():
    """AuxK = ||e - ê||² / ||e - mean e||², ê from the top k_aux dead latents with no b_dec."""
    B, d_in, d_sae = 8, 5, 10
    p = params(d_in, d_sae)
    x = torch.randn(B, d_in, dtype=D64)
    dead = torch.tensor([True, False] * 5)
    out = ref.topk_loss(x, *p.values(), 2, dead_mask=dead, k_aux=3)
    e = (x - out["x_hat"]).detach()
    pre = F.relu((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"])[:, dead]
    v, i = torch.topk(pre, 3)
    e_hat = torch.zeros_like(pre).scatter(1, i, v) @ p["W_dec"][dead]
    want = (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    assert torch.allclose(out["aux"], want)
    none = ref.topk_loss(x, *p.values(), 2, dead_mask=torch.zeros(d_sae, dtype=torch.bool))
    assert none["aux"] == 0


def test_relu_loss_against_float64_autograd():
    B, d_in, d_sae = 6, 5, 11
    p = params(d_in, d_sae)
    x = torch.randn(B, d_in, dtype=D64)
    _gradcheck(lambda *t: ref.relu_loss(x, *t, sparsity_coefficient=0.2)["loss"], tuple(p.values()))
    out = ref.relu_loss(x, *p.values(), sparsity_coefficient=0.2)
    f = F.relu(x @ p["W_enc"] + p["b_enc"])
    assert torch.allclose(out["sparsity"], (f * p["W_dec"].norm(dim=1)).sum(-1).mean())


def test_gated_loss_against_float64_autograd_and_detach():
    B, d_in, d_sae = 6, 5, 11
    p = params(d_in, d_sae)
    r_mag = (0.1 * torch.randn(d_sae, dtype=D64)).requires_grad_()
    b_mag = (0.1 * torch.randn(d_sae, dtype=D64)).requires_grad_()
    x = torch.randn(B, d_in, dtype=D64)
    args = (p["W_enc"], p["b_enc"], r_mag, b_mag, p["W_dec"], p["b_dec"])
    # Encoder-side parameters see no detach: finite differences check them with the decoder fixed.
    W_dec, b_dec = p["W_dec"].detach(), p["b_dec"].detach()
    _gradcheck(lambda *t: ref.gated_loss(x, *t, W_dec, b_dec, sparsity_coefficient=0.1)["loss"], args[:4])
    # The frozen-decoder term must not reach W_dec / b_dec: their gradients equal those of MSE alone.
    # (b_dec still reaches it through the encoder input when apply_b_dec_to_input=True; switch that off.)
    out = ref.gated_loss(x, *args, sparsity_coefficient=0.1, apply_b_dec_to_input=False)
    g_full = torch.autograd.grad(out["loss"], [p["W_dec"], p["b_dec"]], retain_graph=True)
    g_mse = torch.autograd.grad(ref.mse(out["x_hat"], x), [p["W_dec"], p["b_dec"]])
    for a, b in zip(g_full, g_mse):
        assert torch.allclose(a, b)
    assert out["aux"] > 0


def test_jumprelu_loss_float64_autograd_away_from_window():
    """Far from every window the JumpReLU loss is ordinary autograd of pre·mask (θ gets no gradient)."""
    B, d_in, d_sae = 5, 4, 10
    p = params(d_in, d_sae)
    x = torch.randn(B, d_in, dtype=D64)
    theta = torch.full((d_sae,), 0.1, dtype=D64, requires_grad=True)
    pre = (x @ p["W_enc"] + p["b_enc"]).detach()
    eps = 1e-4
    assert ((pre - 0.1).abs() > eps).all()
    _gradcheck(lambda *t: ref.jumprelu_loss(x, *t, threshold=theta, bandwidth=eps, sparsity_coefficient=0.5)["loss"],
               tuple(p.values()))
    out = ref.jumprelu_loss(x, *p.values(), threshold=theta, bandwidth=eps, sparsity_coefficient=0.5)
    (gt,) = torch.autograd.grad(out["loss"], [theta])
    assert torch.count_nonzero(gt) == 0


def test_sparse_decode_reference():
    v = torch.randn(4, 3, dtype=D64)
    i = torch.randint(0, 7, (4, 3))
    W = torch.randn(7, 5, dtype=D64)
    b = torch.randn(5, dtype=D64)
    dense = torch.zeros(4, 7, dtype=D64).index_put_((torch.arange(4)[:, None].expand(4, 3), i), v, accumulate=True)
    assert torch.allclose(ref.sparse_decode(v, i, W, b), dense @ W + b)


# -- the JumpReLU recipes of issue 18 ------------------------------------------------------------------


@pytest.mark.parametrize("per_latent", [False, True])
def test_straight_through_to_the_input(per_latent):
    """``ste_to_input``: the jump's pseudo-derivative reaches pre too: ∂f/∂pre = H + (θ/ε)K, ∂H/∂pre = (1/ε)K;
    the θ-gradients are the paper's."""
    B, d_sae = 9, 13
    theta = (0.05 + torch.rand(d_sae, dtype=D64)).requires_grad_()
    eps = (0.01 + 0.05 * torch.rand(d_sae, dtype=D64)) if per_latent else torch.tensor(0.03, dtype=D64)
    pre = window_pre(B, d_sae, theta.detach(), eps).requires_grad_()
    g = torch.randn(B, d_sae, dtype=D64)
    u = (pre.detach() - theta.detach()) / eps
    K = ((u > -0.5) & (u < 0.5)).to(D64)
    H = (pre.detach() > theta.detach()).to(D64)
    f = ref.jumprelu(pre, theta, eps, ste_to_input=True)
    assert torch.equal(f, pre * (pre > theta))
    gp, gt = torch.autograd.grad(f, (pre, theta), g)
    assert torch.allclose(gp, g * H + (theta.detach() / eps) * K * g)
    assert torch.allclose(gt, (-(theta.detach() / eps) * K * g).sum(0))
    h = ref.step(pre, theta, eps, ste_to_input=True)
    gp, gt = torch.autograd.grad(h, (pre, theta), g)
    assert torch.allclose(gp, (1 / eps) * K * g) and K.sum() > 5
    assert torch.allclose(gt, (-(1 / eps) * K * g).sum(0))


def test_tanh_sparsity_is_layout_independent_and_differentiates_f_and_decoder_norms():
    B, d_in, d_sae, c = 6, 5, 11, 3.0
    W_dec = torch.randn(d_sae, d_in, dtype=D64, requires_grad=True)
    f = torch.relu(torch.randn(B, d_sae, dtype=D64)).requires_grad_()
    dense = ref.tanh_sparsity(f, None, W_dec, c, B)
    norms = W_dec.norm(dim=1)
    assert torch.allclose(dense, torch.tanh(c * f * norms).sum() / B)
    # the same code as padded (values, indices) lists gives the same penalty and the same gradients
    from fastsae.sae import dense_to_padded

    values, indices = dense_to_padded(f.detach())
    values.requires_grad_()
    padded = ref.tanh_sparsity(values, indices, W_dec, c, B)
    torch.testing.assert_close(padded, dense)
    g_dense = torch.autograd.grad(dense, (f, W_dec))
    g_padded = torch.autograd.grad(padded, (values, W_dec))
    torch.testing.assert_close(g_padded[1], g_dense[1])
    active = values != 0
    torch.testing.assert_close(g_padded[0][active], g_dense[0][values.nonzero(as_tuple=True)[0], indices[active]])
    assert torch.autograd.gradcheck(lambda v, W: ref.tanh_sparsity(v, indices, W, c, B),
                                    (values.detach().clone().requires_grad_(), W_dec.detach().clone().requires_grad_()))


def test_pre_activation_loss_pulls_only_dead_latents_up_to_their_thresholds():
    B, d_in, d_sae = 7, 5, 9
    p = params(d_in, d_sae)
    x = torch.randn(B, d_in, dtype=D64)
    theta = torch.rand(d_sae, dtype=D64) + 0.5
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[[1, 4, 8]] = True
    loss = ref.pre_activation_loss(x, p["W_enc"], p["b_enc"], theta, p["W_dec"], dead)
    pre = x @ p["W_enc"] + p["b_enc"]
    want = (torch.relu(theta - pre) * p["W_dec"].norm(dim=1))[:, dead].sum(-1).mean()
    torch.testing.assert_close(loss, want)
    gW = torch.autograd.grad(loss, p["W_enc"])[0]
    assert torch.count_nonzero(gW[:, ~dead]) == 0 and torch.count_nonzero(gW[:, dead]) > 0
    assert float(ref.pre_activation_loss(x, p["W_enc"], p["b_enc"], theta, p["W_dec"],
                                         torch.zeros(d_sae, dtype=torch.bool))) == 0.0


@pytest.mark.parametrize("max_firing", [16, 2])
def test_quiet_auxk_fits_the_residual_off_the_firing_rows_with_quiet_latents(max_firing):
    """JumpReLU's AuxK against a row-by-row oracle: the k_aux largest non-firing pre-activations (ReLU'd)
    reconstruct the residual projected off the span of the (first max_firing) firing latents' decoder rows
    (least squares), over
    the whole residual's variance; gradients reach W_enc / b_enc only at the kept entries, W_dec only at kept
    rows, and never θ."""
    B, d_in, d_sae, k_aux = 9, 7, 23, 3
    p = params(d_in, d_sae)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, d_in, dtype=D64, generator=g)
    residual = torch.randn(B, d_in, dtype=D64, generator=g)
    with torch.no_grad():
        pre = x @ p["W_enc"] + p["b_enc"]
    theta = (pre.quantile(0.8, dim=0) + 0.01 * torch.rand(d_sae, dtype=D64, generator=g)).requires_grad_()
    loss = ref.quiet_auxk_loss(x, p["W_enc"], p["b_enc"], p["W_dec"], theta, residual, k_aux, max_firing=max_firing)
    total, fit, kept = (residual - residual.mean(0)).pow(2).sum(), 0.0, torch.zeros(B, d_sae, dtype=torch.bool)
    for b in range(B):
        fires = (pre[b] > theta.detach()).nonzero().squeeze(1)
        fires = fires[:max_firing]
        e = residual[b]
        if fires.numel():
            D = p["W_dec"].detach()[fires]
            e = e - D.t() @ torch.linalg.lstsq(D.t(), e.unsqueeze(1)).solution.squeeze(1)
        quiet = torch.where(pre[b] > theta.detach(), torch.zeros(()), pre[b].clamp_min(0))
        idx = quiet.argsort(descending=True)[:k_aux]
        idx = idx[quiet[idx] > 0]
        kept[b, idx] = True
        v = torch.relu(x[b] @ p["W_enc"][:, idx] + p["b_enc"][idx])
        fit = fit + (v @ p["W_dec"][idx] - e).pow(2).sum()
    want = fit / total
    torch.testing.assert_close(loss, want)
    got = torch.autograd.grad(loss, [p["W_enc"], p["b_enc"], p["W_dec"], theta], allow_unused=True)
    exp = torch.autograd.grad(want, [p["W_enc"], p["b_enc"], p["W_dec"]])
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e)
    assert got[3] is None
    assert torch.count_nonzero(got[1][~kept.any(0)]) == 0 and torch.count_nonzero(got[1]) > 0
    assert float(ref.quiet_auxk_loss(x[:0], p["W_enc"], p["b_enc"], p["W_dec"], theta, residual[:0], k_aux)) == 0.0


def test_quadratic_target_l0_is_zero_at_the_target_and_pushes_from_both_sides():
    l0 = torch.tensor([3.0, 5.0, 4.0], dtype=D64, requires_grad=True)
    assert float(ref.quadratic_l0(l0, 4.0).detach()) == 0.0
    (g_hi,) = torch.autograd.grad(ref.quadratic_l0(l0 * 2, 4.0), l0)
    (g_lo,) = torch.autograd.grad(ref.quadratic_l0(l0 / 2, 4.0), l0)
    assert (g_hi > 0).all() and (g_lo < 0).all()
