"""The fused training steps of the cpp backend, sparse (csrc/sae.cpp) and dense (csrc/sae_dense.cpp), for every
architecture against reference.py: forward and backward, odd sizes, float64/float32/bf16, opcheck, and the
dense↔sparse switch of the density-aware dispatch (same loss and gradients on both sides and across a switch)."""
import pytest
import torch

import fastsae
from fastsae import reference as ref
from fastsae.dispatch import override_crossover

pytestmark = [pytest.mark.skipif("cpp" not in fastsae.backends(), reason="fastsae._C not built"),
              pytest.mark.usefixtures("one_thread")]

# (B, d_in, d_sae): odd sizes, one row, one latent, an empty batch
SHAPES = [(11, 13, 37), (1, 5, 3), (33, 17, 101), (7, 4, 1), (0, 7, 9)]
PATHS = ["sparse", "dense"]


def params(B, d_in, d_sae, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    x = r(B, d_in)
    p = dict(W_enc=r(d_in, d_sae) / d_in ** 0.5, b_enc=0.1 * r(d_sae), W_dec=r(d_sae, d_in) / d_in ** 0.5,
             b_dec=0.1 * r(d_in))
    return x, {k: v.requires_grad_() for k, v in p.items()}


def gated_params(d_sae, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(r_mag=(0.3 * torch.randn(d_sae, generator=g, dtype=dtype)).requires_grad_(),
                b_mag=(0.1 * torch.randn(d_sae, generator=g, dtype=dtype)).requires_grad_())


def jump_params(d_sae, dtype=torch.float64, seed=2):
    g = torch.Generator().manual_seed(seed)
    th = (0.2 + 0.5 * torch.rand(d_sae, generator=g, dtype=dtype)).requires_grad_()
    bw = 0.1 + 0.3 * torch.rand(d_sae, generator=g, dtype=dtype)  # per-latent ε, wide enough to hit the window
    return th, bw


def run_op(arch, path, x, p, extra):
    """(outputs as the reference's SAEForward fields, the loss the module differentiates, its inputs)."""
    from fastsae.ops import cpp

    We, be, Wd, bd = p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"]
    apply = extra["apply"]
    mse = lambda x_hat: (x_hat - x).pow(2).sum(-1).mean()  # noqa: E731
    if arch == "jumprelu":
        th, bw = extra["threshold"], extra["bandwidth"]
        op = cpp.jumprelu_sae if path == "sparse" else cpp.jumprelu_sae_dense
        out = op(x, We, be, Wd, bd, th, bw, apply)
        return dict(x_hat=out[0], l0=out[1], fired=out[2]), mse(out[0]) + 0.37 * out[1].mean(), [We, be, Wd, bd, th]
    if arch == "relu":
        op = cpp.relu_sae if path == "sparse" else cpp.relu_sae_dense
        out = op(x, We, be, Wd, bd, Wd.norm(dim=1), apply)
        return (dict(x_hat=out[0], sparsity=out[1], l0=out[2], fired=out[3]), mse(out[0]) + 0.41 * out[1].mean(),
                [We, be, Wd, bd])
    if arch == "gated":
        rm, bm = extra["r_mag"], extra["b_mag"]
        op = cpp.gated_sae if path == "sparse" else cpp.gated_sae_dense
        out = op(x, We, be, rm, bm, Wd, bd, apply)
        aux = (out[1] - x).pow(2).sum(-1).mean()
        return (dict(x_hat=out[0], sparsity=out[2], l0=out[3], fired=out[4], aux=aux),
                mse(out[0]) + 0.29 * out[2].mean() + aux, [We, be, rm, bm, Wd, bd])
    assert arch == "batchtopk" and path == "sparse"
    out = cpp.batchtopk_sae(x, We, be, Wd, bd, extra["k"], apply)
    min_kept = out[6][0] if out[6].numel() else None
    return dict(x_hat=out[0], l0=out[1], fired=out[2], min_kept=min_kept), mse(out[0]), [We, be, Wd, bd]


def run_reference(arch, x, p, extra):
    We, be, Wd, bd = p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"]
    apply = extra["apply"]
    mse = lambda x_hat: (x_hat - x).pow(2).sum(-1).mean()  # noqa: E731
    if arch == "jumprelu":
        o = ref.jumprelu_sae_forward(x, We, be, Wd, bd, extra["threshold"], extra["bandwidth"], apply)
        return dict(x_hat=o.x_hat, l0=o.l0, fired=o.fired), mse(o.x_hat) + 0.37 * o.l0.mean()
    if arch == "relu":
        o = ref.relu_sae_forward(x, We, be, Wd, bd, apply)
        return dict(x_hat=o.x_hat, sparsity=o.sparsity, l0=o.l0, fired=o.fired), mse(o.x_hat) + 0.41 * o.sparsity.mean()
    if arch == "gated":
        o = ref.gated_sae_forward(x, We, be, extra["r_mag"], extra["b_mag"], Wd, bd, apply)
        return (dict(x_hat=o.x_hat, sparsity=o.sparsity, l0=o.l0, fired=o.fired, aux=o.aux),
                mse(o.x_hat) + 0.29 * o.sparsity.mean() + o.aux)
    o = ref.batchtopk_sae_forward(x, We, be, Wd, bd, extra["k"], apply)
    return dict(x_hat=o.x_hat, l0=o.l0, fired=o.fired, min_kept=o.min_kept), mse(o.x_hat)


def setup_case(arch, shape, apply, dtype=torch.float64):
    x, p = params(*shape, dtype=dtype)
    extra = dict(apply=apply)
    if arch == "jumprelu":
        extra["threshold"], extra["bandwidth"] = jump_params(shape[2], dtype)
    elif arch == "gated":
        extra.update(gated_params(shape[2], dtype))
    elif arch == "batchtopk":
        extra["k"] = min(4, shape[2])
    return x, p, extra


CASES = [(a, path) for a in ("jumprelu", "relu", "gated") for path in PATHS] + [("batchtopk", "sparse")]


@pytest.mark.parametrize("arch,path", CASES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("apply", [False, True])
def test_step_matches_reference_float64(arch, path, shape, apply):
    x, p, extra = setup_case(arch, shape, apply)
    got, loss, inputs = run_op(arch, path, x, p, extra)
    want, want_loss = run_reference(arch, x, p, extra)
    for name, w in want.items():
        g = got[name]
        if name == "min_kept" or w is None:
            assert (g is None) == (w is None) and (w is None or torch.allclose(g, w, atol=1e-12)), name
        elif w.dtype in (torch.bool, torch.float32) and name != "aux":
            assert g.dtype == w.dtype and torch.equal(g, w), name
        else:
            torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12, equal_nan=True, msg=name)
    if shape[0] == 0:
        return
    got_g = torch.autograd.grad(loss, inputs, allow_unused=True)
    exp_g = torch.autograd.grad(want_loss, inputs, allow_unused=True)
    for i, (a, e) in enumerate(zip(got_g, exp_g)):
        torch.testing.assert_close(a, e, atol=1e-11, rtol=1e-11, msg=f"grad {i}")


def test_cases_exercise_every_branch():
    """The float64 cases above are not vacuous: windows, open and shut gates, relu'd magnitudes all occur."""
    x, p, extra = setup_case("jumprelu", (33, 17, 101), False)
    with torch.no_grad():
        pre = x @ p["W_enc"] + p["b_enc"]
        u = (pre - extra["threshold"]) / extra["bandwidth"]
        window = (u.abs() < 0.5)
        assert (window & (pre <= extra["threshold"])).any() and (window & (pre > extra["threshold"])).any()
    x, p, extra = setup_case("gated", (33, 17, 101), True)
    with torch.no_grad():
        x_in = x - p["b_dec"]
        z = x_in @ p["W_enc"]
        gate = z + p["b_enc"] > 0
        mag = z * extra["r_mag"].exp() + extra["b_mag"]
        assert (gate & (mag <= 0)).any() and (gate & (mag > 0)).any() and (~gate).any()


@pytest.mark.parametrize("arch,path", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_low_precision(arch, path, dtype):
    """float32 / bf16 against the float64 reference on the same low-precision inputs. Inputs are small
    multiples of 1/4 so the selections (which entries are kept) are exact in every dtype."""
    g = torch.Generator().manual_seed(5)
    q = lambda *s, scale: (torch.randint(-2, 3, s, generator=g) * scale).to(torch.float64)  # noqa: E731
    B, d_in, d_sae = 19, 24, 70
    x64 = q(B, d_in, scale=1.0)
    p64 = dict(W_enc=q(d_in, d_sae, scale=0.25), b_enc=q(d_sae, scale=0.25) + 0.125,
               W_dec=torch.randn(d_sae, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5,
               b_dec=q(d_in, scale=0.25))
    extra64 = dict(apply=False)
    if arch == "jumprelu":
        extra64["threshold"] = torch.randint(0, 4, (d_sae,), generator=g) * 0.25 + 0.1
        extra64["bandwidth"] = torch.full((d_sae,), 0.5)
    elif arch == "gated":
        extra64.update(r_mag=q(d_sae, scale=0.0), b_mag=q(d_sae, scale=0.25) + 0.125)
    elif arch == "batchtopk":
        extra64["k"] = 6
    cast = lambda t, dt: t.detach().to(dt).requires_grad_()  # noqa: E731
    # θ and ε stay float32 in low-precision SAEs (as the modules keep them)
    low = {k: cast(v, dtype) for k, v in p64.items()}
    extra = {k: (cast(v, torch.float32 if k in ("threshold", "bandwidth") else dtype) if torch.is_tensor(v) else v)
             for k, v in extra64.items()}
    extra["bandwidth"] = extra.get("bandwidth", torch.empty(0)).detach()
    if arch != "jumprelu":
        extra.pop("bandwidth")
    wide = {k: cast(v, torch.float64) for k, v in low.items()}
    extra_w = {k: (cast(v, torch.float64) if torch.is_tensor(v) and k != "bandwidth" else v) for k, v in extra.items()}
    if arch == "jumprelu":
        extra_w["bandwidth"] = extra["bandwidth"].double()
    x = x64.to(dtype)
    got, loss, inputs = run_op(arch, path, x, low, extra)
    if arch == "batchtopk":
        # The quantised pre-activations tie; the kernel breaks ties by index, torch.topk arbitrarily. The float64
        # kernel (checked against the reference on tie-free data above) makes the same selection.
        want, want_loss, _ = run_op(arch, path, x.double(), wide, extra_w)
    else:
        want, want_loss = run_reference(arch, x.double(), wide, extra_w)
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    for name in ("x_hat", "sparsity", "l0"):
        if name in want:
            assert got[name].dtype == (torch.float32 if name == "l0" else dtype)
            scale = want[name].abs().max().clamp_min(1.0)
            assert (got[name].double() - want[name]).abs().max() / scale < tol, name
    w_inputs = [wide[k] for k in ("W_enc", "b_enc")] + ([extra_w["r_mag"], extra_w["b_mag"]] if arch == "gated" else [])
    w_inputs += [wide["W_dec"], wide["b_dec"]] + ([extra_w["threshold"]] if arch == "jumprelu" else [])
    for a, e in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(want_loss, w_inputs)):
        assert a.dtype == (e.dtype if a.dtype == torch.float64 else a.dtype)
        scale = e.abs().max().clamp_min(1e-6)
        assert ((a.double() - e).abs().max() / scale) < tol * 4


@pytest.mark.parametrize("arch", ["jumprelu", "relu", "gated"])
def test_sparse_and_dense_paths_agree_float32(arch):
    """Both sides of the crossover compute the same loss and gradients, to float32 rounding."""
    x, p, extra = setup_case(arch, (64, 48, 300), True, dtype=torch.float32)
    runs = []
    for path in PATHS:
        got, loss, inputs = run_op(arch, path, x, p, extra)
        runs.append((got, loss, torch.autograd.grad(loss, inputs)))
    (gs, ls, grs), (gd, ld, grd) = runs
    torch.testing.assert_close(ls, ld, atol=1e-6, rtol=1e-6)
    for name in gs:
        if gs[name].dtype in (torch.bool, torch.float32) and name in ("l0", "fired"):
            assert torch.equal(gs[name], gd[name]), name
        else:
            torch.testing.assert_close(gs[name], gd[name], atol=1e-5, rtol=1e-5, msg=name)
    for a, b in zip(grs, grd):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_jumprelu_grad_values_and_straight_through():
    """Features the training recipes build on: a gradient reaching the active/window values (a penalty on f:
    the tanh recipe) and the straight-through option (the reference's ``ste_to_input``: ∂f/∂pre += (θ/ε)K,
    ∂H/∂pre := (1/ε)K), against reference.py."""
    from fastsae.ops import cpp

    x, p, extra = setup_case("jumprelu", (23, 9, 57), True)
    th, bw = extra["threshold"], extra["bandwidth"]
    We, be, Wd, bd = p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"]
    inputs = [We, be, Wd, bd, th]
    c = 0.7

    for ste in (False, True):
        for dense in (False, True):
            op = cpp.jumprelu_sae_dense if dense else cpp.jumprelu_sae
            out = op(x, We, be, Wd, bd, th, bw, True, ste)
            f = out[5]  # dense: f [B, d_sae]; sparse: CSR values
            norms = Wd.norm(dim=1)
            if dense:
                pen = torch.tanh(c * f * norms).sum(-1).mean()
            else:
                rows = torch.repeat_interleave(torch.arange(x.shape[0]), out[3].diff())
                pen = torch.zeros(x.shape[0], dtype=f.dtype).index_add(0, rows, torch.tanh(c * f * norms[out[4]])).mean()
            loss = (out[0] - x).pow(2).sum(-1).mean() + 0.3 * out[1].mean() + 0.2 * pen
            got = torch.autograd.grad(loss, inputs)
            pre = (x - bd) @ We + be
            f_ref = ref.jumprelu(pre, th, bw, ste)
            l0 = ref.step(pre, th, bw, ste).sum(-1, dtype=torch.float32)
            loss_ref = ((f_ref @ Wd + bd - x).pow(2).sum(-1).mean() + 0.3 * l0.mean()
                        + 0.2 * torch.tanh(c * f_ref * Wd.norm(dim=1)).sum(-1).mean())
            for a, e in zip(got, torch.autograd.grad(loss_ref, inputs)):
                torch.testing.assert_close(a, e, atol=1e-11, rtol=1e-11)
    # both straight-through terms are exercised: each changes the encoder gradient
    for term in (lambda o: o[1].sum(), lambda o: (o[0] - x).pow(2).sum()):
        g0 = torch.autograd.grad(term(cpp.jumprelu_sae(x, We, be, Wd, bd, th, bw, True, False)), We,
                                 allow_unused=True)[0]
        g1 = torch.autograd.grad(term(cpp.jumprelu_sae(x, We, be, Wd, bd, th, bw, True, True)), We)[0]
        assert g0 is None or not torch.allclose(g0, g1)
    assert torch.autograd.grad(cpp.jumprelu_sae(x, We, be, Wd, bd, th, bw, True, True)[1].sum(), We)[0].abs().max() > 0


@pytest.mark.parametrize("recipe", [dict(sparsity_loss="tanh", sparsity_coefficient=0.05),
                                    dict(sparsity_loss="step", ste_to_input=True),
                                    dict(sparsity_loss="tanh", ste_to_input=True, target_l0=5.0)])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_jumprelu_recipes_run_fused_and_match_eager(monkeypatch, recipe, path, dtype):
    """The tanh sparsity and the straight-through recipe run on the fused kernels (both sides of the crossover),
    with the eager module's loss and gradients."""
    called = _spy(monkeypatch)
    x = torch.randn(37, 24, dtype=dtype, generator=torch.Generator().manual_seed(3))
    grads, losses = [], []
    for backend in ("cpp", "eager"):
        sae = _module("jumprelu", dtype=dtype, **recipe)
        sae.backend = backend
        with override_crossover(path, arch="jumprelu", backend="cpp"):
            out = sae.training_forward(x)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: q.grad for n, q in sae.named_parameters()})
    assert ("jumprelu_sae_dense" if path == "dense" else "jumprelu_sae") in called
    tol = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(losses[0], losses[1], **tol)
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name, **tol)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_jumprelu_auxk_on_the_fused_step_matches_eager(monkeypatch, path, dtype):
    """JumpReLU's AuxK (quiet latents fit the residual) next to the fused step: eager's loss and gradients, and a
    term that is there (it changes the encoder's and decoder's gradients)."""
    called = _spy(monkeypatch)
    x = torch.randn(37, 24, dtype=dtype, generator=torch.Generator().manual_seed(3))
    results = []
    for backend, k_aux in (("cpp", 5), ("eager", 5), ("eager", 0)):
        sae = _module("jumprelu", dtype=dtype, k_aux=k_aux, aux_rows=0.6, target_l0=6.0)
        sae.backend = backend
        with torch.no_grad():  # ~15% of the rows fire each latent: the firing rows do not span the space
            sae.threshold.copy_((x @ sae.W_enc + sae.b_enc).quantile(0.85, dim=0).float().clamp_min(0))
        with override_crossover(path, arch="jumprelu", backend="cpp"):
            out = sae.training_forward(x)
        out.loss.backward()
        results.append((out.loss.detach(), out.aux.detach(), {n: q.grad for n, q in sae.named_parameters()}))
    assert ("jumprelu_sae_dense" if path == "dense" else "jumprelu_sae") in called
    tol = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-4)
    (lc, ac, gc), (le, ae, ge), (_, a0, g0) = results
    torch.testing.assert_close(lc, le, **tol)
    torch.testing.assert_close(ac, ae, **tol)
    for name in ge:
        torch.testing.assert_close(gc[name], ge[name], msg=name, **tol)
    assert float(ae) > 0 and float(a0) == 0
    assert not torch.allclose(ge["W_enc"], g0["W_enc"]) and not torch.allclose(ge["W_dec"], g0["W_dec"])
    torch.testing.assert_close(ge["threshold"], g0["threshold"], **tol)  # θ gets nothing from it


@pytest.mark.parametrize("arch", ["jumprelu", "relu", "gated", "batchtopk"])
def test_one_and_two_threads_identical(arch):
    # 1100 rows: two encoder slabs, so two threads take the slabs in parallel (csrc/encoder.h for_each_slab)
    x, p, extra = setup_case(arch, (1100, 24, 330), True, dtype=torch.float32)
    paths = ["sparse"] if arch == "batchtopk" else PATHS
    n = torch.get_num_threads()
    for path in paths:
        res = []
        try:
            for nt in (1, 2):
                torch.set_num_threads(nt)
                got, loss, inputs = run_op(arch, path, x, p, extra)
                res.append([v.detach() for v in got.values() if v is not None] + list(torch.autograd.grad(loss, inputs)))
        finally:
            torch.set_num_threads(n)
        for a, b in zip(*res):
            if path == "sparse":  # our own reductions, in a fixed order: the same bits
                assert torch.equal(a, b), (arch, path)
            else:  # the dense step's GEMMs are ATen's: MKL on Intel CPUs splits their reductions by thread count
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{arch} {path}")


def test_batchtopk_selection_exact_under_pruning():
    """Many slabs and a kept set far smaller than the positive entries: the rising bound prunes candidates, and
    the kept set is still exactly the batch's B·k largest."""
    from fastsae.ops import cpp

    B, d_in, d_sae, k = 700, 16, 6000, 3  # two slabs (512 rows, then 188)
    x, p = params(B, d_in, d_sae, dtype=torch.float32, seed=4)
    with torch.no_grad():
        out = cpp.batchtopk_sae(x, p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], k, False)
        pre = torch.relu(x @ p["W_enc"] + p["b_enc"])
        want = torch.topk(pre.reshape(-1), B * k).values
    rows = torch.repeat_interleave(torch.arange(B), out[3].diff())
    kept = pre[rows, out[4]]
    assert out[4].numel() == B * k and torch.equal(kept.sort().values, want.sort().values)
    torch.testing.assert_close(out[5], kept)
    assert float(out[6][0]) == float(want.min())


def test_batchtopk_bound_hint_never_changes_the_selection():
    """``bound_hint`` only sets where the scan starts: hints below the batch's B·k-th value, on it, above it (the
    selection then runs again from 0), above every entry, and invalid ones give the selection without a hint bit
    for bit; the cpp backend starts each step from a fraction of the previous step's smallest kept value."""
    from fastsae.ops import cpp

    B, d_in, d_sae, k = 700, 16, 6000, 3
    x, p = params(B, d_in, d_sae, dtype=torch.float32, seed=4)
    args = (x, p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], k, False)
    with torch.no_grad():
        base = cpp.batchtopk_sae(*args)
        tau = float(base[6][0])
        for hint in (0.5 * tau, 0.999 * tau, tau, 1.001 * tau, 1e30, float("inf"), float("nan"), -1.0):
            out = cpp.batchtopk_sae(*args, bound_hint=hint)
            assert all(torch.equal(a, b) for a, b in zip(out, base)), hint
        backend = cpp.CppBackend()
        first = backend.batchtopk_sae(*args)
        assert backend._batch_bounds[p["W_enc"]] == pytest.approx(backend.BATCH_BOUND_FRACTION * tau)
        second = backend.batchtopk_sae(*args)  # from the recorded hint
        assert torch.equal(first.x_hat, second.x_hat) and torch.equal(first.x_hat, base[0])


def test_batchtopk_fewer_positive_than_budget():
    from fastsae.ops import cpp

    x, p = params(9, 6, 40)
    with torch.no_grad():
        p["b_enc"].sub_(2.0)
        out = cpp.batchtopk_sae(x, p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], 12, False)
        pre = torch.relu(x @ p["W_enc"] + p["b_enc"])
    assert out[4].numel() == int((pre > 0).sum()) < 9 * 12
    want = ref.batchtopk_sae_forward(x, p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], 12, False)
    torch.testing.assert_close(out[0], want.x_hat, atol=1e-12, rtol=1e-12)
    with torch.no_grad():
        p["b_enc"].sub_(100.0)
        out = cpp.batchtopk_sae(x, p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], 12, False)
    assert out[4].numel() == 0 and out[6].numel() == 0


def test_kernels_refuse_bad_input():
    """Called directly, past every Python check, the new kernels raise instead of reading out of bounds."""
    ops = torch.ops.fastsae
    x, p = params(5, 6, 11)
    We, be, Wd, bd = [v.detach() for v in p.values()]
    w = Wd.norm(dim=1)
    _, _, _, _, row_ptr, cols, values = ops.relu_sae(x, We, be, Wd, bd, w, False)
    g = torch.randn(5, 6, dtype=torch.float64)
    ops.relu_sae_backward(g, None, x, We, Wd, bd, w, False, row_ptr, cols, values)
    with pytest.raises(IndexError, match="cols"):
        ops.relu_sae_backward(g, None, x, We, Wd, bd, w, False, row_ptr, torch.full_like(cols, 11), values)
    bad = row_ptr.clone()
    bad[-1] += 1
    with pytest.raises(IndexError, match="row_ptr"):
        ops.relu_sae_backward(g, None, x, We, Wd, bd, w, False, bad, cols, values)
    with pytest.raises(RuntimeError, match="latent_weight"):
        ops.relu_sae(x, We, be, Wd, bd, w[:-1], False)
    rm = torch.zeros(11, dtype=torch.float64)
    _, _, _, _, _, rp, cs, vs, _ = ops.gated_sae(x, We, be, rm, rm, Wd, bd, True)
    with pytest.raises(IndexError, match="cols"):
        ops.gated_sae_backward(g, g, None, x, We, rm, rm, Wd, bd, True, rp, torch.full_like(cs, -1), vs)
    with pytest.raises(RuntimeError, match="r_mag"):
        ops.gated_sae(x, We, be, rm[:3], rm, Wd, bd, True)
    with pytest.raises(RuntimeError, match="k"):
        ops.batchtopk_sae(x, We, be, Wd, bd, 12, False)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.relu_sae_dense(x.float(), We, be, Wd, bd, w, False)
    th = torch.full((11,), 0.1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="bandwidth"):
        ops.jumprelu_sae_dense(x, We, be, Wd, bd, th, th * 0, False)
    _, _, _, _, pre, f = ops.jumprelu_sae_dense(x, We, be, Wd, bd, th, th, False)
    with pytest.raises(RuntimeError, match="pre and f"):
        ops.jumprelu_sae_dense_backward(g, None, None, x, We, Wd, bd, False, pre[:2], f, th, th)


def test_opcheck():
    x, p = params(7, 5, 23)
    We, be, Wd, bd = p.values()
    th, bw = jump_params(23)
    gp = gated_params(23)
    rm, bm = gp["r_mag"], gp["b_mag"]
    ops = torch.ops.fastsae
    # Ops with a fixed output size: the full opcheck (schema, fake kernel, autograd, AOT dispatch).
    torch.library.opcheck(ops.jumprelu_sae_dense.default, (x, We, be, Wd, bd, th, bw, True))
    torch.library.opcheck(ops.relu_sae_dense.default, (x, We, be, Wd, bd, Wd.detach().norm(dim=1).requires_grad_(), False))
    torch.library.opcheck(ops.gated_sae_dense.default, (x, We, be, rm, bm, Wd, bd, True))
    # Data-dependent entry counts: schema, fake kernel and autograd registration.
    dyn = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.relu_sae.default, (x, We, be, Wd, bd, Wd.detach().norm(dim=1).requires_grad_(), True),
                          test_utils=dyn)
    torch.library.opcheck(ops.gated_sae.default, (x, We, be, rm, bm, Wd, bd, False), test_utils=dyn)
    torch.library.opcheck(ops.batchtopk_sae.default, (x, We, be, Wd, bd, 3, True), test_utils=dyn)
    torch.library.opcheck(ops.batchtopk_sae.default, (x, We, be, Wd, bd, 3, True, 0.05), test_utils=dyn)
    torch.library.opcheck(ops.jumprelu_sae.default, (x, We, be, Wd, bd, th, bw, False, True), test_utils=dyn)
    # The backward ops on their own (no autograd of their own).
    d = [t.detach() for t in (x, We, be, Wd, bd)]
    g = torch.randn(7, 5, dtype=torch.float64)
    w = d[3].norm(dim=1)
    _, _, _, _, rp, cs, vs = ops.relu_sae(d[0], d[1], d[2], d[3], d[4], w, True)
    torch.library.opcheck(ops.relu_sae_backward.default, (g, torch.randn(7, dtype=torch.float64), d[0], d[1], d[3],
                                                          d[4], w, True, rp, cs, vs))
    rmd, bmd = rm.detach(), bm.detach()
    out = ops.gated_sae(d[0], d[1], d[2], rmd, bmd, d[3], d[4], True)
    torch.library.opcheck(ops.gated_sae_backward.default, (g, g, torch.randn(7, dtype=torch.float64), d[0], d[1], rmd,
                                                           bmd, d[3], d[4], True, *out[5:8]))
    out = ops.jumprelu_sae_dense(d[0], d[1], d[2], d[3], d[4], th.detach(), bw, False)
    torch.library.opcheck(ops.jumprelu_sae_dense_backward.default,
                          (g, torch.randn(7), None, d[0], d[1], d[3], d[4], False, out[4], out[5], th.detach(), bw, True))


# -- the density-aware dispatch, through the modules ---------------------------------------------------


def _module(arch, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    d_in, d_sae = 24, 96
    if arch == "jumprelu":
        sae = fastsae.JumpReLUSAE(d_in, d_sae, bandwidth=0.05, threshold_init=0.05, backend="cpp", dtype=dtype, **kw)
    elif arch == "relu":
        sae = fastsae.ReLUSAE(d_in, d_sae, backend="cpp", dtype=dtype, **kw)
    elif arch == "gated":
        sae = fastsae.GatedSAE(d_in, d_sae, backend="cpp", dtype=dtype, **kw)
    elif arch == "batchtopk":
        sae = fastsae.BatchTopKSAE(d_in, d_sae, 6, backend="cpp", dtype=dtype, **kw)
    else:
        sae = fastsae.TopKSAE(d_in, d_sae, 6, backend="cpp", dtype=dtype, **kw)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if p.dim() == 1 and name != "threshold":
                p.add_(0.05 * torch.randn_like(p))
        sae.W_enc.add_(0.2 * torch.randn_like(sae.W_enc))
    return sae


def _spy(monkeypatch):
    from fastsae.ops import cpp

    called = []
    for name in ("jumprelu_sae", "jumprelu_sae_dense", "relu_sae", "relu_sae_dense", "gated_sae", "gated_sae_dense",
                 "topk_sae", "batchtopk_sae"):
        orig = getattr(cpp, name)
        monkeypatch.setattr(cpp, name, lambda *a, _o=orig, _n=name: called.append(_n) or _o(*a))
    return called


@pytest.mark.parametrize("arch", ["jumprelu", "relu", "gated"])
def test_first_step_is_dense_then_follows_the_density(monkeypatch, arch):
    """No history: the dense step (a fresh SAE fires on about half its latents); then the previous step's
    density against the crossover picks the path."""
    called = _spy(monkeypatch)
    sae = _module(arch)
    x = torch.randn(32, 24)
    sae.training_forward(x).loss.backward()
    assert called == [f"{arch}_sae_dense"]
    per_row = sae.ops().density.last(sae.W_enc)
    assert 0 < per_row <= 96
    with override_crossover(per_row / 96 * 1.01, arch=arch):
        sae.training_forward(x).loss.backward()
    with override_crossover(per_row / 96 * 0.99, arch=arch):
        sae.training_forward(x).loss.backward()
    assert called == [f"{arch}_sae_dense", f"{arch}_sae", f"{arch}_sae_dense"]


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_topk_dispatch_uses_the_known_density(monkeypatch, arch):
    called = _spy(monkeypatch)
    sae = _module(arch)
    x = torch.randn(32, 24)
    sae.training_forward(x).loss.backward()
    with override_crossover("dense", arch=arch):  # k/d_sae above the crossover: the eager (dense) step
        sae.training_forward(x).loss.backward()
    assert called == [f"{arch}_sae"]


@pytest.mark.parametrize("arch", ["jumprelu", "relu", "gated", "batchtopk"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_training_run_across_switches_matches_eager(monkeypatch, arch, dtype):
    """A short training run from a fresh module whose steps switch between the dense and the sparse formulation
    (both directions) follows the eager run: the same losses and parameters after every step, to the dtype's
    rounding (Adam amplifies nothing at this tolerance over 8 steps)."""
    called = _spy(monkeypatch)
    n_steps = 8
    data = torch.randn(n_steps, 64, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.5
    kw = {} if arch == "batchtopk" else dict(sparsity_coefficient=0.3)
    runs = {}
    for backend in ("eager", "cpp"):
        sae = _module(arch, dtype=dtype, **kw)
        sae.backend = backend
        opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
        losses = []
        for s in range(n_steps):
            with override_crossover("dense" if s % 3 == 1 else "sparse"):
                opt.zero_grad()
                out = sae.training_forward(data[s].to(dtype))
                out.loss.backward()
            opt.step()
            sae.apply_constraints()
            losses.append(float(out.loss.detach()))
        runs[backend] = (losses, {k: v.detach().clone() for k, v in sae.state_dict().items()})
    if arch == "batchtopk":
        assert called.count("batchtopk_sae") == 5  # the dense steps are the eager reference itself
    else:
        assert called.count(f"{arch}_sae") == 5 and called.count(f"{arch}_sae_dense") == 3
    tol = dict(atol=1e-9, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(torch.tensor(runs["cpp"][0]), torch.tensor(runs["eager"][0]), **tol)
    for k, v in runs["eager"][1].items():
        torch.testing.assert_close(runs["cpp"][1][k], v, **tol, msg=k)


@pytest.mark.parametrize("arch,kw", [("jumprelu", dict(target_l0=12.0)),  # quadratic target-L0, init_l0="auto"
                                     ("jumprelu", dict(target_l0=12.0, sparsity_loss="tanh")),  # a penalty on f
                                     ("jumprelu", dict(ste_to_input=True)),  # the straight-through option
                                     ("relu", dict(target_l0=12.0)), ("gated", dict(target_l0=12.0))])
def test_train_with_the_sparsity_controllers_matches_eager(monkeypatch, arch, kw):
    """fastsae.train with issue-18's recipes (target-L0 controllers driving a tensor λ, the data-driven θ
    initialisation, the tanh and straight-through recipes) on cpp follows eager, float64, through the first
    (dense) step and the sparse steps after it."""
    called = _spy(monkeypatch)
    data = torch.randn(6 * 64, 24, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    states = {}
    for backend in ("eager", "cpp"):
        sae = _module(arch, dtype=torch.float64, **kw)
        sae.backend = backend
        with override_crossover(0.9):  # the first step (no history: all 96 latents) dense, then sparse
            fastsae.train(sae, data, steps=6, batch_size=64, seed=0, progress=False)
        states[backend] = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    assert called == [f"{arch}_sae_dense"] + [f"{arch}_sae"] * 5
    for k, v in states["eager"].items():
        torch.testing.assert_close(states["cpp"][k], v, atol=1e-9, rtol=1e-9, msg=k)
