"""The fused sparse SAE ops of the cpp backend (csrc/sae.cpp) against reference.py, forward and backward."""
import pytest
import torch

import fastsae
from fastsae import reference as ref

pytestmark = pytest.mark.skipif("cpp" not in fastsae.backends(), reason="fastsae._C not built")

# (B, d_in, d_sae): odd sizes, a single row, an empty batch
SHAPES = [(11, 13, 37), (1, 5, 3), (33, 17, 101), (0, 7, 9)]


def params(B, d_in, d_sae, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    x = r(B, d_in)
    p = dict(W_enc=r(d_in, d_sae) / d_in ** 0.5, b_enc=0.1 * r(d_sae), W_dec=r(d_sae, d_in) / d_in ** 0.5,
             b_dec=0.1 * r(d_in))
    return x, {k: v.requires_grad_() for k, v in p.items()}


def jump_params(d_sae, th_dtype=torch.float64):
    threshold = (0.2 + 0.5 * torch.rand(d_sae, dtype=th_dtype)).requires_grad_()
    bandwidth = 0.1 + 0.3 * torch.rand(d_sae, dtype=th_dtype)  # per-latent ε, wide enough to hit the window
    return threshold, bandwidth


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_jumprelu_sae_matches_reference(shape, apply_b_dec):
    from fastsae.ops import cpp

    x, p = params(*shape)
    th, bw = jump_params(shape[2])
    args = (x, p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], th, bw, apply_b_dec)
    x_hat, l0, fired, row_ptr, cols, values, flags = cpp.jumprelu_sae(*args)
    want = ref.jumprelu_sae_forward(*args)
    torch.testing.assert_close(x_hat, want.x_hat, atol=1e-12, rtol=1e-12)
    assert l0.dtype == want.l0.dtype and torch.equal(l0, want.l0)
    assert torch.equal(fired, want.fired)

    # the compaction: CSR by row of exactly active ∪ window entries, f there (0 where inactive)
    with torch.no_grad():
        pre = ref.encoder_input(x, p["b_dec"], apply_b_dec) @ p["W_enc"] + p["b_enc"]
        active = pre > th
        window = ((pre - th) / bw).abs() < 0.5
        keep = active | window
    B = shape[0]
    assert row_ptr.tolist() == [0] + keep.sum(-1).cumsum(0).tolist()
    rows = torch.repeat_interleave(torch.arange(B), keep.sum(-1))
    assert torch.equal(rows * shape[2] + cols, keep.reshape(-1).nonzero().squeeze(1))
    torch.testing.assert_close(values, (pre * active)[rows, cols], atol=1e-12, rtol=1e-12)
    assert torch.equal(flags & 1 == 1, active[rows, cols]) and torch.equal(flags & 2 == 2, window[rows, cols])

    # backward: MSE + λ·l0.mean(), as the module differentiates it
    lam = 0.37
    loss = lambda out_x_hat, out_l0: (out_x_hat - x).pow(2).sum(-1).mean() + lam * out_l0.mean()
    inputs = [p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], th]
    if B == 0:
        return
    got = grads(loss(x_hat, l0), inputs)
    exp = grads(loss(want.x_hat, want.l0), inputs)
    if B * shape[2] > 100:
        assert (window & ~active).any() and exp[4].abs().sum() > 0  # the θ-gradient is exercised
    for name, a, e in zip(["W_enc", "b_enc", "W_dec", "b_dec", "threshold"], got, exp):
        torch.testing.assert_close(a, e, atol=1e-11, rtol=1e-11, msg=name)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_topk_sae_matches_reference(shape, apply_b_dec):
    from fastsae.ops import cpp

    x, p = params(*shape)
    k = min(5, shape[2])
    args = (x, p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], k, apply_b_dec)
    x_hat, values, indices, l0, fired = cpp.topk_sae(*args)
    want = ref.topk_sae_forward(*args)
    torch.testing.assert_close(x_hat, want.x_hat, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(values, want.values, atol=1e-12, rtol=1e-12)
    assert torch.equal(l0, want.l0) and torch.equal(fired, want.fired)
    pos = want.values > 0
    assert torch.equal(indices[pos], want.indices[pos])
    if shape[0] == 0:
        return
    inputs = [p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"]]
    gv = torch.randn_like(values)  # a gradient reaching the values output directly, too
    got = grads((x_hat - x).pow(2).sum() + (values * gv).sum(), inputs)
    exp = grads((want.x_hat - x).pow(2).sum() + (want.values * gv).sum(), inputs)
    for name, a, e in zip(["W_enc", "b_enc", "W_dec", "b_dec"], got, exp):
        torch.testing.assert_close(a, e, atol=1e-11, rtol=1e-11, msg=name)


def test_topk_sae_fewer_positive_than_k():
    """Rows with fewer than k positive pre-activations: relu zeros are kept with no gradient."""
    from fastsae.ops import cpp

    x, p = params(9, 6, 40)
    with torch.no_grad():
        p["b_enc"].sub_(1.0)
    args = (x, p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], 12, True)
    x_hat, values, indices, l0, fired = cpp.topk_sae(*args)
    want = ref.topk_sae_forward(*args)
    assert (want.values == 0).any()
    torch.testing.assert_close(values, want.values, atol=1e-12, rtol=1e-12)
    assert torch.equal(l0, want.l0) and torch.equal(fired, want.fired)
    inputs = list(p.values())
    for a, e in zip(grads((x_hat - x).pow(2).sum(), inputs), grads((want.x_hat - x).pow(2).sum(), inputs)):
        torch.testing.assert_close(a, e, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sae_low_precision(arch, dtype):
    from fastsae.ops import cpp

    x, p = params(19, 24, 70)
    x = x.to(dtype)
    p = {k: v.detach().to(dtype).requires_grad_() for k, v in p.items()}
    inputs = list(p.values())
    if arch == "jumprelu":
        # Pre-activations exact in bf16 (small multiples of 1/4), so the reference's matmul-then-add
        # and the kernel's fused addmm make the same threshold decisions; θ = m/4 + 0.1 with ε = 0.5
        # puts many entries inside the window.
        g = torch.Generator().manual_seed(3)
        q = lambda *s, scale: (torch.randint(-2, 3, s, generator=g) * scale).to(dtype)
        x = q(19, 24, scale=1.0)
        with torch.no_grad():
            p["W_enc"].copy_(q(24, 70, scale=0.25))
            p["b_enc"].copy_(q(70, scale=0.25))
        th = (torch.randint(0, 4, (70,), generator=g) * 0.25 + 0.1).float().requires_grad_()
        bw = torch.full((70,), 0.5)  # θ and ε stay float32 in bf16 SAEs
        args = (x, p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], th, bw, False)
        x_hat, l0 = cpp.jumprelu_sae(*args)[:2]
        inputs.append(th)
        # reference in float64 from the same low-precision pre-activations' decisions
        want = ref.jumprelu_sae_forward(*args)
        w_x_hat, w_l0 = want.x_hat, want.l0
    else:
        args = (x, p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], 6, True)
        x_hat, _, _, l0, _ = cpp.topk_sae(*args)
        want = ref.topk_sae_forward(*args)
        w_x_hat, w_l0 = want.x_hat, want.l0
    assert x_hat.dtype == dtype and l0.dtype == torch.float32
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=6e-2, rtol=6e-2)
    torch.testing.assert_close(x_hat, w_x_hat, **tol)
    torch.testing.assert_close(l0, w_l0)
    loss = lambda a, b: (a.float() - x.float()).pow(2).sum(-1).mean() + 0.1 * b.mean()
    got, exp = grads(loss(x_hat, l0), inputs), grads(loss(w_x_hat, w_l0), inputs)
    for a, e in zip(got, exp):
        assert a.dtype == e.dtype
        scale = e.double().abs().max().clamp_min(1e-6)
        assert ((a.double() - e.double()).abs().max() / scale) < (1e-4 if dtype == torch.float32 else 6e-2)


def _run_both(arch, x, p, th=None, bw=None):
    from fastsae.ops import cpp

    inputs = list(p.values())
    if arch == "jumprelu":
        out = cpp.jumprelu_sae(x, *p.values(), th, bw, True)
        loss = (out[0] - x).pow(2).sum() + 0.3 * out[1].sum()
        inputs = inputs + [th]
    else:
        out = cpp.topk_sae(x, *p.values(), 7, True)
        loss = (out[0] - x).pow(2).sum()
    return [o.detach() for o in out] + list(grads(loss, inputs))


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_sae_one_and_two_threads_identical(arch):
    x, p = params(1100, 24, 330, dtype=torch.float32)  # two slabs: taken in parallel by two threads
    th, bw = jump_params(330, torch.float32)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_both(arch, x, p, th, bw)
        torch.set_num_threads(2)
        two = _run_both(arch, x, p, th, bw)
    finally:
        torch.set_num_threads(n)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_sae_kernels_refuse_bad_input():
    """Called directly, past every Python check, the kernels raise instead of reading out of bounds."""
    x, p = params(5, 6, 11)
    x, (We, be, Wd, bd) = x, [v.detach() for v in p.values()]
    th, bw = jump_params(11)
    th = th.detach()
    ops = torch.ops.fastsae
    with pytest.raises(RuntimeError, match="W_dec"):
        ops.jumprelu_sae(x, We, be, Wd[:, :5], bd, th, bw, False)
    with pytest.raises(RuntimeError, match="bandwidth"):
        ops.jumprelu_sae(x, We, be, Wd, bd, th, bw * 0, False)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.topk_sae(x.float(), We, be, Wd, bd, 3, False)
    with pytest.raises(RuntimeError, match="k"):
        ops.topk_sae(x, We, be, Wd, bd, 12, False)
    _, _, _, row_ptr, cols, values, flags = ops.jumprelu_sae(x, We, be, Wd, bd, th, bw, False)
    g = torch.randn(5, 6, dtype=torch.float64)
    gl0 = torch.ones(5)
    call = lambda rp, c, f: ops.sparse_sae_backward(g, gl0, None, x, We, Wd, bd, False, rp, c, values, f, th, bw)
    call(row_ptr, cols, flags)  # well-formed: fine
    with pytest.raises(IndexError, match="cols"):
        call(row_ptr, torch.full_like(cols, 11), flags)
    with pytest.raises(IndexError, match="cols"):
        call(row_ptr, torch.full_like(cols, -1), flags)
    bad = row_ptr.clone()
    bad[-1] += 1
    with pytest.raises(IndexError, match="row_ptr"):
        call(bad, cols, flags)
    if row_ptr[2] > 0:
        bad = row_ptr.clone()
        bad[1] = row_ptr[2] + 0
        bad[2] = 0
        with pytest.raises(IndexError, match="row_ptr"):
            call(bad, cols, flags)
    with pytest.raises(RuntimeError, match="flags"):
        call(row_ptr, cols, flags[:-1] if flags.numel() else torch.zeros(1, dtype=torch.uint8))


def test_sae_opcheck():
    x, p = params(7, 5, 23)
    th, bw = jump_params(23)
    args = (x, *p.values())
    torch.library.opcheck(torch.ops.fastsae.topk_sae.default, args + (4, True))
    # jumprelu_sae has a data-dependent output size (the number of entries): check the schema,
    # the fake kernel and the autograd registration, not AOT-dispatch tracing.
    torch.library.opcheck(torch.ops.fastsae.jumprelu_sae.default, args + (th, bw, False),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_backend_falls_back_when_x_needs_grad():
    x, p = params(6, 5, 19)
    x.requires_grad_()
    th, bw = jump_params(19)
    backend = fastsae.ops.cpp.CppBackend()
    out = backend.jumprelu_sae(x, *p.values(), th, bw, True)
    want = ref.jumprelu_sae_forward(x, *p.values(), th, bw, True)
    torch.testing.assert_close(torch.autograd.grad(out.x_hat.sum(), x)[0], torch.autograd.grad(want.x_hat.sum(), x)[0])


def test_module_training_step_uses_the_fused_op(monkeypatch):
    """JumpReLUSAE/TopKSAE on the cpp backend reach the C++ training ops (not the eager fallback); JumpReLU's
    first step (no density history) is the dense one, the next the sparse one below the crossover."""
    from fastsae.dispatch import override_crossover
    from fastsae.ops import cpp

    called = []
    for name in ("jumprelu_sae", "jumprelu_sae_dense", "topk_sae"):
        orig = getattr(cpp, name)
        monkeypatch.setattr(cpp, name, lambda *a, _o=orig, _n=name: called.append(_n) or _o(*a))
    jump = fastsae.JumpReLUSAE(8, 30, backend="cpp")
    for sae in (jump, jump, fastsae.TopKSAE(8, 30, 4, backend="cpp")):
        with override_crossover("sparse") if called else override_crossover(None):
            sae.training_forward(torch.randn(5, 8)).loss.backward()
    assert called == ["jumprelu_sae_dense", "jumprelu_sae", "topk_sae"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_sae_long_rows_ties_and_scale_jumps(dtype):
    """Rows long enough for the grouped-maxima selection (d_sae >= 64·k) with the encoder bias formed inside the
    selection (float32 / float64 add it late), many rows per task so each row starts from the previous row's
    hint, rows whose scale jumps 30× (the hint is then rejected) and integer pre-activations (ties everywhere):
    the kept entries are exactly the stable descending sort's first k, lower index first among equals."""
    from fastsae.ops import cpp

    g = torch.Generator().manual_seed(5)
    B, d_in, d_sae, k = 83, 16, 4099, 32
    x = torch.randint(-3, 4, (B, d_in), generator=g).to(dtype)
    x[::5] *= 30
    x[2::9] = 0  # a row of ties at the bias alone
    W_enc = torch.randint(-2, 3, (d_in, d_sae), generator=g).to(dtype)
    b_enc = torch.randint(-2, 3, (d_sae,), generator=g).to(dtype)
    W_dec = torch.randn(d_sae, d_in, generator=g, dtype=dtype)
    b_dec = torch.zeros(d_in, dtype=dtype)
    x_hat, values, indices, l0, fired = cpp.topk_sae(x, W_enc, b_enc, W_dec, b_dec, k, False)
    pre = x @ W_enc + b_enc
    want_v, want_i = pre.sort(dim=1, descending=True, stable=True)
    want_v, want_i = want_v[:, :k].clamp_min(0), want_i[:, :k]
    assert torch.equal(values, want_v)
    pos = want_v > 0
    assert torch.equal(indices[pos], want_i[pos])
    torch.testing.assert_close(x_hat, ref.sparse_decode(want_v, want_i, W_dec, b_dec), atol=1e-4, rtol=1e-5)
    # inference: the same selection through encode_sparse's fused path (which orders equal values its own way)
    sae = fastsae.TopKSAE(d_in, d_sae, k=k, backend="cpp", dtype=dtype, apply_b_dec_to_input=False)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc), sae.b_enc.copy_(b_enc), sae.W_dec.copy_(W_dec), sae.b_dec.zero_()
        v2, i2 = sae.encode_sparse(x)
    assert torch.equal(v2, want_v)
    live = pos.all(1)
    assert live.sum() > B // 2 and torch.equal(i2[live].sort(1).values, want_i[live].sort(1).values)


@pytest.mark.parametrize("arch", ["jumprelu", "relu"])
def test_bias_added_in_the_scan_keeps_boundary_entries(arch):
    """float32 with an encoder bias 100× the GEMM's output (so z + b rounds) and thresholds placed exactly on some
    pre-activations, on ε / 2 from them and one float step either side: the scan tests z against bounds with the
    bias subtracted and adds the bias to its candidates only; the kept entries, flags and values are those of the
    biased pre-activation itself, as the reference computes it."""
    from fastsae.ops import cpp

    g = torch.Generator().manual_seed(11)
    B, d_in, d_sae = 37, 24, 301
    x = torch.randn(B, d_in, generator=g)
    W_enc = torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5
    b_enc = 100 * torch.randn(d_sae, generator=g)
    W_dec = torch.randn(d_sae, d_in, generator=g) / d_in ** 0.5
    b_dec = torch.zeros(d_in)
    pre = x @ W_enc + b_enc  # the reference's rounding: the GEMM, then the bias
    if arch == "relu":
        b_enc = -(x @ W_enc)[5] + torch.randint(-1, 2, (d_sae,), generator=g) * 1e-6  # row 5 lands on 0 ± 1e-6
        pre = x @ W_enc + b_enc
        x_hat, sparsity, l0, fired, row_ptr, cols, values = cpp.relu_sae(x, W_enc, b_enc, W_dec, b_dec,
                                                                       torch.ones(d_sae), False)
        keep = pre > 0
    else:
        bw = torch.full((d_sae,), 1e-3)
        th = pre[torch.randint(0, B, (d_sae,), generator=g), torch.arange(d_sae)].clone()
        third = d_sae // 3
        th[:third] = torch.nextafter(th[:third], th[:third] + 1)  # one float step above an entry
        th[third:2 * third] = torch.nextafter(th[third:2 * third], th[third:2 * third] - 1)  # one step below
        x_hat, l0, fired, row_ptr, cols, values, flags = cpp.jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, th, bw,
                                                                            False)
        active = pre > th
        window = ((pre - th) / bw).abs() < 0.5
        keep = active | window
        rows = torch.repeat_interleave(torch.arange(B), keep.sum(-1))
        assert torch.equal(flags & 1 == 1, active[rows, cols]) and active.any() and (window & ~active).any()
        keep_values = pre * active
    assert row_ptr.tolist() == [0] + keep.sum(-1).cumsum(0).tolist()
    rows = torch.repeat_interleave(torch.arange(B), keep.sum(-1))
    assert torch.equal(rows * d_sae + cols, keep.reshape(-1).nonzero().squeeze(1))
    want = pre if arch == "relu" else keep_values
    assert torch.equal(values, want[rows, cols])
