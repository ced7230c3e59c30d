"""The ``triton`` backend (fastsae/ops/triton_backend.py): fused SAE forward passes against reference.py,
availability rules, bf16 fallback in the interpreter, torch.compile tracing and opcheck of the ops."""
import importlib

import pytest
import torch

import fastsae
backends_mod = importlib.import_module("fastsae.dispatch")
from fastsae import inference
from fastsae import reference as ref
from fastsae.dispatch import override_crossover

pytestmark = pytest.mark.skipif("triton" not in fastsae.backends(),
                                reason="triton backend unavailable (needs CUDA or TRITON_INTERPRET=1)")

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def backend():
    return backends_mod.get("triton", torch.device(DEV))


def sae_params(B, d_in, d_sae, dtype, theta_dtype=torch.float32):
    g = dict(dtype=dtype, device=DEV)
    x = torch.randn(B, d_in, **g)
    W_enc = (torch.randn(d_in, d_sae, **g) / d_in ** 0.5).requires_grad_()
    b_enc = (0.1 * torch.randn(d_sae, **g)).requires_grad_()
    W_dec = torch.randn(d_sae, d_in, **g).requires_grad_()
    b_dec = (0.1 * torch.randn(d_in, **g)).requires_grad_()
    theta = (0.4 * torch.rand(d_sae, dtype=theta_dtype, device=DEV)).requires_grad_()
    eps = 0.1 + 0.3 * torch.rand(d_sae, dtype=theta_dtype, device=DEV)  # per-latent bandwidth
    return x, W_enc, b_enc, W_dec, b_dec, theta, eps


TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}


MODES = ["sparse", "dense"]  # the triton backend's two formulations of a step, forced by the crossover


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B,d_in,d_sae,dtype,apply_b_dec", [
    (11, 13, 37, torch.float32, False), (11, 13, 37, torch.float64, True),
    (25, 40, 53, torch.float64, False), (25, 40, 53, torch.float32, True)])
def test_jumprelu_sae_matches_reference(B, d_in, d_sae, dtype, apply_b_dec, mode):
    x, W_enc, b_enc, W_dec, b_dec, theta, eps = sae_params(B, d_in, d_sae, dtype,
                                                           torch.float64 if dtype == torch.float64 else torch.float32)
    x.requires_grad_(apply_b_dec)  # also exercise grad x (column gather of W_enc)
    params = [W_enc, b_enc, W_dec, b_dec, theta] + ([x] if apply_b_dec else [])
    # non-vacuous: some entries sit inside the window without being active (θ-gradient via l0 only)
    with torch.no_grad():
        pre = ref.encoder_input(x, b_dec, apply_b_dec) @ W_enc + b_enc
        u = (pre - theta) / eps
        assert bool((((u > -0.5) & (u < 0.5)) & (pre <= theta)).any())
        assert bool((((u > -0.5) & (u < 0.5)) & (pre > theta)).any())
    lam = 0.37
    results = []
    for be in (backends_mod.get("eager", torch.device(DEV)), backend()):
        with override_crossover(mode, backend="triton"):
            out = be.jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, theta, eps, apply_b_dec)
        loss = ref.mse(out.x_hat, x) + lam * out.l0.mean()
        results.append((out, torch.autograd.grad(loss, params)))
    (oe, ge), (ot, gt) = results
    torch.testing.assert_close(ot.x_hat, oe.x_hat, **TOL[dtype])
    torch.testing.assert_close(ot.l0, oe.l0)
    assert torch.equal(ot.fired, oe.fired)
    for name, a, e in zip(["W_enc", "b_enc", "W_dec", "b_dec", "threshold", "x"], gt, ge):
        torch.testing.assert_close(a, e, **TOL[dtype], msg=name)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("dtype,apply_b_dec", [(torch.float32, True), (torch.float64, False)])
def test_topk_sae_matches_reference(arch, dtype, apply_b_dec, mode):
    B, d_in, d_sae, k = 13, 11, 41, 6
    x, W_enc, b_enc, W_dec, b_dec, _, _ = sae_params(B, d_in, d_sae, dtype)
    x.requires_grad_(True)
    params = [W_enc, b_enc, W_dec, b_dec, x]
    results = []
    for be in (backends_mod.get("eager", torch.device(DEV)), backend()):
        fn = be.topk_sae if arch == "topk" else be.batchtopk_sae
        with override_crossover(mode, backend="triton"):
            out = fn(x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec)
        loss = ref.mse(out.x_hat, x)
        results.append((out, torch.autograd.grad(loss, params)))
    (oe, ge), (ot, gt) = results
    torch.testing.assert_close(ot.x_hat, oe.x_hat, **TOL[dtype])
    torch.testing.assert_close(ot.l0, oe.l0)
    assert torch.equal(ot.fired, oe.fired)
    if arch == "batchtopk":
        torch.testing.assert_close(ot.min_kept, oe.min_kept, **TOL[dtype])
    else:
        torch.testing.assert_close(ot.values, oe.values, **TOL[dtype])
    for name, a, e in zip(["W_enc", "b_enc", "W_dec", "b_dec", "x"], gt, ge):
        torch.testing.assert_close(a, e, **TOL[dtype], msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_module_training_step_on_triton_matches_eager(mode):
    """A JumpReLUSAE (also with the tanh penalty and the straight-through gradient, and with its AuxK), a TopKSAE
    (with AuxK), a ReLUSAE and a GatedSAE (float32) on backend='triton' give eager's loss and gradients."""
    x = torch.randn(17, 12, device=DEV)
    for arch in ["jumprelu", "jumprelu-tanh", "jumprelu-auxk", "topk", "relu", "gated"]:
        grads = []
        for be in ["eager", "triton"]:
            torch.manual_seed(3)
            if arch == "jumprelu":
                sae = fastsae.JumpReLUSAE(12, 45, bandwidth=0.05, threshold_init=0.05, backend=be, device=DEV)
            elif arch == "jumprelu-tanh":
                sae = fastsae.JumpReLUSAE(12, 45, bandwidth=0.05, threshold_init=0.05, sparsity_loss="tanh",
                                          ste_to_input=True, backend=be, device=DEV)
            elif arch == "jumprelu-auxk":
                sae = fastsae.JumpReLUSAE(12, 45, bandwidth=0.05, threshold_init=0.3, k_aux=4, aux_rows=0.5,
                                          backend=be, device=DEV)
            elif arch == "topk":
                sae = fastsae.TopKSAE(12, 45, k=4, k_aux=3, backend=be, device=DEV)
            else:
                sae = fastsae.sae.ARCHITECTURES[arch](12, 45, backend=be, device=DEV)
            with torch.no_grad():
                sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
                sae.b_dec.add_(0.05 * torch.randn_like(sae.b_dec))
            dead = torch.zeros(45, dtype=torch.bool, device=DEV)
            dead[::3] = True
            with override_crossover(mode, backend="triton"):
                out = sae.training_forward(x, dead_mask=dead)
            out.loss.backward()
            grads.append((out.loss.detach(), {n: p.grad for n, p in sae.named_parameters()}))
        (le, ge), (lt, gt) = grads
        torch.testing.assert_close(lt, le, atol=1e-5, rtol=1e-5)
        for n in ge:
            torch.testing.assert_close(gt[n], ge[n], atol=1e-5, rtol=1e-5, msg=f"{arch}.{n}")


def relu_gated_params(arch, B, d_in, d_sae, dtype):
    """Random ReLU / Gated parameters whose rows keep some, not all, latents (positive pre / open gates)."""
    x, W_enc, b_enc, W_dec, b_dec, _, _ = sae_params(B, d_in, d_sae, dtype)
    if arch == "relu":
        return x, dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec)
    g = dict(dtype=dtype, device=DEV)
    r_mag = (0.3 * torch.randn(d_sae, **g)).requires_grad_()
    b_mag = (0.2 * torch.randn(d_sae, **g)).requires_grad_()
    return x, dict(W_enc=W_enc, b_gate=b_enc, r_mag=r_mag, b_mag=b_mag, W_dec=W_dec, b_dec=b_dec)


def _step(be, arch, x, p, apply_b_dec, lam=0.3):
    """Loss of one ReLU / Gated step on backend ``be`` (the modules' loss: MSE + λ·sparsity (+ Gated's aux))."""
    fn = be.relu_sae if arch == "relu" else be.gated_sae
    out = fn(x, *p.values(), apply_b_dec)
    loss = ref.mse(out.x_hat, x) + lam * out.sparsity.mean()
    return out, loss + out.aux if arch == "gated" else loss


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ["relu", "gated"])
@pytest.mark.parametrize("B,d_in,d_sae,dtype,apply_b_dec", [
    (11, 13, 37, torch.float32, False), (11, 13, 37, torch.float64, True), (19, 21, 50, torch.float64, False),
    (19, 21, 50, torch.float32, True)])
def test_relu_gated_sae_match_reference(arch, B, d_in, d_sae, dtype, apply_b_dec, mode):
    """ReLU and Gated steps on triton (sparse kernels at pre > 0 / the open gates, or the dense formulation):
    the reference's outputs, loss and every gradient (grad x too, through the sampled encoders)."""
    x, p = relu_gated_params(arch, B, d_in, d_sae, dtype)
    x.requires_grad_(apply_b_dec)
    params = list(p.values()) + ([x] if apply_b_dec else [])
    with torch.no_grad():  # non-vacuous: rows keep some latents, and Gated has open gates whose magnitude is <= 0
        x_in = ref.encoder_input(x, p["b_dec"], apply_b_dec)
        kept = (x_in @ p["W_enc"] + p.get("b_enc", p.get("b_gate"))) > 0
        assert 0 < kept.float().mean() < 1 and kept.sum(-1).min() < kept.sum(-1).max()
        if arch == "gated":
            mag = x_in @ (p["W_enc"] * p["r_mag"].exp()) + p["b_mag"]
            assert bool((kept & (mag <= 0)).any()) and bool((kept & (mag > 0)).any())
    results = []
    for be in (backends_mod.get("eager", torch.device(DEV)), backend()):
        with override_crossover(mode, backend="triton"):
            out, loss = _step(be, arch, x, p, apply_b_dec)
        results.append((out, loss, torch.autograd.grad(loss, params)))
    (oe, le, ge), (ot, lt, gt) = results
    torch.testing.assert_close(lt, le, **TOL[dtype])
    torch.testing.assert_close(ot.x_hat, oe.x_hat, **TOL[dtype])
    torch.testing.assert_close(ot.sparsity, oe.sparsity, **TOL[dtype])
    torch.testing.assert_close(ot.l0, oe.l0)
    assert torch.equal(ot.fired, oe.fired)
    if arch == "gated":
        torch.testing.assert_close(ot.aux, oe.aux, **TOL[dtype])
    for name, a, e in zip(list(p) + ["x"], gt, ge):
        torch.testing.assert_close(a, e, **TOL[dtype], msg=name)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ste_to_input,need_values", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("dtype,apply_b_dec", [(torch.float64, True), (torch.float32, False)])
def test_jumprelu_ste_to_input_and_values(ste_to_input, need_values, dtype, apply_b_dec, mode):
    """JumpReLU with the straight-through gradient to the encoder and/or the code for Anthropic's tanh penalty
    (a loss on f that reaches θ through JumpReLU's pseudo-derivative): the fused lists give the reference's loss
    and gradients."""
    B, d_in, d_sae = 13, 11, 41
    x, W_enc, b_enc, W_dec, b_dec, theta, eps = sae_params(B, d_in, d_sae, dtype,
                                                           torch.float64 if dtype == torch.float64 else torch.float32)
    params = [W_enc, b_enc, W_dec, b_dec, theta]
    results = []
    for be in (backends_mod.get("eager", torch.device(DEV)), backend()):
        with override_crossover(mode, backend="triton"):
            out = be.jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, theta, eps, apply_b_dec, ste_to_input=ste_to_input,
                                  need_values=need_values)
        loss = ref.mse(out.x_hat, x) + 0.3 * out.l0.mean()
        if need_values:
            assert out.values is not None
            loss = loss + 0.7 * ref.tanh_sparsity(out.values, out.indices, W_dec, 2.0, B)
        results.append((loss, torch.autograd.grad(loss, params)))
    (le, ge), (lt, gt) = results
    torch.testing.assert_close(lt, le, **TOL[dtype])
    for name, a, e in zip(["W_enc", "b_enc", "W_dec", "b_dec", "threshold"], gt, ge):
        torch.testing.assert_close(a, e, **TOL[dtype], msg=name)
    if ste_to_input:  # the straight-through gradient is there: without it W_enc's gradient differs
        out = ref.jumprelu_sae_forward(x, W_enc, b_enc, W_dec, b_dec, theta, eps, apply_b_dec, False)
        plain = ref.mse(out.x_hat, x) + 0.3 * out.l0.mean()
        if need_values:
            plain = plain + 0.7 * ref.tanh_sparsity(out.values, None, W_dec, 2.0, B)
        assert not torch.allclose(torch.autograd.grad(plain, W_enc)[0], ge[0])


def _set_density(arch, p, x, density):
    """Shift the biases (JumpReLU: θ) so that about ``density`` of each latent's rows are kept."""
    with torch.no_grad():
        x_in = x if arch == "jumprelu" else x - p["b_dec"]  # the steps below: apply_b_dec_to_input for ReLU / Gated
        pre = x_in @ p["W_enc"] + (p["b_enc"] if "b_enc" in p else p["b_gate"])
        r = max(1, round(x.shape[0] * density))
        cut = pre.topk(r, dim=0).values[-1] - 1e-3
        if arch == "jumprelu":
            p["threshold"].copy_(cut.clamp_min(0.05) if density < 1 else torch.full_like(cut, 0.05))
        else:
            (p["b_enc"] if arch == "relu" else p["b_gate"]).sub_(cut)


@pytest.mark.parametrize("arch", ["jumprelu", "relu", "gated"])
def test_training_switches_between_dense_and_sparse_with_identical_steps(arch):
    """A few SGD steps whose density moves across the crossover: the backend switches formulation from the
    previous step's count (dense first: no history), and every step's loss and gradients are eager's."""
    B, d_in, d_sae = 16, 9, 40
    torch.manual_seed(0)
    x = torch.randn(B, d_in, device=DEV, dtype=torch.float64)
    x0, p0 = relu_gated_params("relu" if arch == "jumprelu" else arch, B, d_in, d_sae, torch.float64)
    if arch == "jumprelu":
        p0["threshold"] = torch.full((d_sae,), 0.05, dtype=torch.float64, device=DEV)
    runs = {}
    for name in ("eager", "triton"):
        be = backends_mod.get(name, torch.device(DEV))
        p = {k: v.detach().clone().requires_grad_() for k, v in p0.items()}
        eps = torch.full((d_sae,), 0.2, dtype=torch.float64, device=DEV)
        trace = []
        for step, density in enumerate([0.9, 0.1, 0.1, 0.8, 0.15]):
            _set_density(arch, p, x, density)
            with override_crossover(0.4, backend="triton"):
                sparse = be.density.sparse(arch, p["W_enc"]) if name == "triton" else None
                if arch == "jumprelu":
                    out = be.jumprelu_sae(x, p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], p["threshold"], eps, False)
                    loss = ref.mse(out.x_hat, x) + 0.2 * out.l0.mean()
                else:
                    out, loss = _step(be, arch, x, p, True)
            grads = torch.autograd.grad(loss, list(p.values()))
            trace.append((sparse, loss.detach(), grads))
            with torch.no_grad():
                for v, g in zip(p.values(), grads):
                    v.sub_(0.01 * g)
        runs[name] = trace
    choices = [s for s, _, _ in runs["triton"]]
    # dense at the start, sparse after a sparse step, dense again after a dense one
    assert choices == [False, False, True, True, False], choices
    for step, ((_, le, ge), (_, lt, gt)) in enumerate(zip(runs["eager"], runs["triton"])):
        torch.testing.assert_close(lt, le, **TOL[torch.float64], msg=f"step {step}")
        for name, a, e in zip(p0, gt, ge):
            torch.testing.assert_close(a, e, **TOL[torch.float64], msg=f"step {step} {name}")


def test_dense_steps_record_the_longest_row_and_sparse_steps_the_lists_width():
    """What the dispatch compares with the crossover: the longest row's kept entries, from either formulation."""
    from fastsae.ops import encode

    x, W_enc, b_enc, W_dec, b_dec, theta, eps = sae_params(13, 11, 41, torch.float32)
    be = backend()
    with torch.no_grad():
        pre = x @ W_enc + b_enc
        u = (pre - theta) / eps
        want = int(((pre > theta) | ((u > -0.5) & (u < 0.5))).sum(-1).max())
    for mode in MODES:
        with override_crossover(mode, backend="triton"):
            be.jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, theta, eps, False)
        assert be.density.last(W_enc) == want, mode
    assert encode.longest_list(13, 41) == want
    with torch.no_grad():
        want = int((pre > 0).sum(-1).max())
    for mode in MODES:
        with override_crossover(mode, backend="triton"):
            be.relu_sae(x, W_enc, b_enc, W_dec, b_dec, False)
        assert be.density.last(W_enc) == want, mode


def test_default_crossovers_pick_dense_when_fresh_and_sparse_when_trained():
    """Without an override: a fresh step (no history) is dense; once the lists are short, sparse."""
    be = backend()
    W = torch.zeros(4, 1000, device=DEV)
    assert not be.density.sparse("jumprelu", W)
    be.density.record(W, 3, 1)
    assert be.density.sparse("jumprelu", W)
    assert be.density.sparse_at("topk", W, 8) and not be.density.sparse_at("topk", W, 500)
    from fastsae.dispatch import CROSSOVERS

    row = CROSSOVERS[("triton", "cuda")]
    assert set(row) == {"jumprelu", "relu", "gated", "topk", "batchtopk"} and all(0 < v < 0.3 for v in row.values())


# ------------------------------------------------------------------------------------------
# Inference: the fused encoders (fastsae/inference.py kinds)
# ------------------------------------------------------------------------------------------


def encoder(kind, d_in, d_sae, dtype, apply, k=4, calibrated=False):
    g = dict(dtype=dtype, device=DEV)
    common = dict(W_enc=torch.randn(d_in, d_sae, **g) / d_in ** 0.5, b_enc=0.2 * torch.randn(d_sae, **g),
                  b_dec=0.1 * torch.randn(d_in, **g), apply_b_dec_to_input=apply)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    if kind == "threshold":
        th = torch.full((1,), 0.15, dtype=wide, device=DEV).expand(d_sae) if calibrated else \
            0.3 * torch.rand(d_sae, dtype=wide, device=DEV)
        return inference.Encoder("threshold", threshold=th, **common)
    if kind == "gated":
        return inference.Encoder("gated", r_mag=0.3 * torch.randn(d_sae, **g), b_mag=0.1 * torch.randn(d_sae, **g),
                                 **common)
    return inference.Encoder(kind, k=min(k, d_sae), **common)


@pytest.mark.parametrize("kind,calibrated", [("threshold", False), ("threshold", True), ("gated", False),
                                             ("topk", False), ("batchtopk", False)])
@pytest.mark.parametrize("B,d_in,d_sae,dtype,apply", [(11, 13, 37, torch.float64, True),
                                                      (7, 9, 50, torch.float32, False), (1, 5, 3, torch.float64, False)])
def test_inference_encoders_match_eager(kind, calibrated, B, d_in, d_sae, dtype, apply):
    enc = encoder(kind, d_in, d_sae, dtype, apply, calibrated=calibrated)
    W_dec = torch.randn(d_sae, d_in, dtype=dtype, device=DEV) / d_in ** 0.5
    x = torch.randn(B, d_in, dtype=dtype, device=DEV)
    tri, eager = backend(), backends_mod.get("eager", torch.device(DEV))
    tol = TOL[dtype]
    f_want = eager.encode(enc, x)
    torch.testing.assert_close(tri.encode(enc, x), f_want, **tol)
    v, i = tri.encode_sparse(enc, x)
    v_want, i_want = eager.encode_sparse(enc, x)
    assert i.dtype == torch.int64 and v.shape == i.shape == v_want.shape
    torch.testing.assert_close(v, v_want, **tol)
    if kind == "topk":
        assert torch.equal(i[v_want > 0], i_want[v_want > 0])
    else:  # nonzero entries first, in latent order, zero-padded to the longest row (inference.dense_to_padded)
        assert torch.equal(i, i_want)
    x_hat = tri.reconstruct(enc, x, W_dec)
    torch.testing.assert_close(x_hat, eager.reconstruct(enc, x, W_dec), **tol)
    torch.testing.assert_close(x_hat, f_want @ W_dec + enc.b_dec, **tol)


def test_inference_uses_the_fused_encoders_and_falls_back_under_autograd(monkeypatch):
    """No dense pre-activations: the inference path calls the fused encoders, never ``inference.dense_code``
    — except when autograd would record the call (the fused encoders have no backward)."""
    from fastsae.ops import encode

    calls = []
    for name in ("encode_jumprelu", "encode_topk", "encode_batchtopk"):
        orig = getattr(encode, name)
        monkeypatch.setattr(encode, name, lambda *a, _o=orig, _n=name, **kw: (calls.append(_n), _o(*a, **kw))[1])
    monkeypatch.setattr(inference, "dense_code", lambda *a, **kw: pytest.fail("dense code computed"))
    tri = backend()
    x = torch.randn(6, 9, device=DEV)
    W_dec = torch.randn(20, 9, device=DEV)
    for kind in ("threshold", "gated", "topk", "batchtopk"):
        enc = encoder(kind, 9, 20, torch.float32, True)
        tri.encode(enc, x), tri.encode_sparse(enc, x), tri.reconstruct(enc, x, W_dec)
    assert calls.count("encode_jumprelu") == 6 and calls.count("encode_topk") == 3
    monkeypatch.undo()
    enc = encoder("threshold", 9, 20, torch.float32, True)
    W = enc.W_enc.clone().requires_grad_()
    enc = inference.Encoder("threshold", W_enc=W, b_enc=enc.b_enc, b_dec=enc.b_dec, apply_b_dec_to_input=True,
                            threshold=enc.threshold)
    f = tri.encode(enc, x)
    assert f.requires_grad  # the eager path, differentiable


@pytest.mark.parametrize("arch", ["jumprelu", "relu", "gated", "topk", "batchtopk"])
def test_modules_encode_and_forward_on_triton(arch):
    """``sae.encode`` / ``encode_sparse`` / ``sae(x)`` of each architecture's module on backend='triton' (no
    grad: the fused encoders) give eager's."""
    d_in, d_sae = 10, 33
    x = torch.randn(9, d_in, device=DEV)
    got = []
    for be in ("eager", "triton"):
        torch.manual_seed(5)
        cls = fastsae.sae.ARCHITECTURES[arch]
        sae = cls(d_in, d_sae, 5, backend=be, device=DEV) if "topk" in arch else cls(d_in, d_sae, backend=be, device=DEV)
        with torch.no_grad():
            for p in sae.parameters():
                p.add_(0.1 * torch.randn_like(p))
            if arch == "jumprelu":
                sae.threshold.copy_(0.05 * torch.rand(d_sae, device=DEV))
            with torch.no_grad():
                got.append((sae.encode(x), *sae.encode_sparse(x), sae(x)))
    for a, e in zip(*got):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_unsupported_dtype_falls_back_to_reference():
    """bf16 has no numpy type for the interpreter: the backend must use the reference, never compute garbage."""
    be = backend()
    from fastsae.ops.triton_common import kernel_dtypes

    pre = torch.randn(5, 9, device=DEV).bfloat16()
    th, eps = torch.rand(9, device=DEV), torch.full((9,), 0.1, device=DEV)
    torch.testing.assert_close(be.jumprelu(pre, th, eps), ref.jumprelu(pre, th, eps))
    if torch.bfloat16 not in kernel_dtypes(torch.device(DEV)):
        x, W_enc, b_enc, W_dec, b_dec, theta, eps = sae_params(6, 5, 11, torch.bfloat16)
        out = be.jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, theta, eps, False)
        want = ref.jumprelu_sae_forward(x, W_enc, b_enc, W_dec, b_dec, theta, eps, False)
        assert torch.equal(out.x_hat, want.x_hat)


def test_availability_and_supports(monkeypatch):
    from fastsae.ops import triton_backend

    ok, why = triton_backend.TritonBackend.availability()
    assert ok and why
    be = triton_backend.TritonBackend()
    if not torch.cuda.is_available():
        assert be.supports(torch.device("cpu")) is None  # interpreter
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "CUDA" in be.supports(torch.device("cpu"))
        ok, why = triton_backend.TritonBackend.availability()
        assert not ok and "TRITON_INTERPRET" in why


def test_compile_traces_training_step_without_graph_breaks():
    """torch.compile(fullgraph=True) of a JumpReLU and a TopK training step through the fastsae_triton ops."""
    from fastsae.ops import decode, encode
    from fastsae.ops.triton_common import segments

    torch._dynamo.reset()
    x, W_enc, b_enc, W_dec, b_dec, theta, eps = sae_params(9, 13, 37, torch.float32)
    N = W_enc.shape[1]

    def jumprelu_step(x, W_enc, b_enc, W_dec, b_dec, theta, eps):
        idx, pre, counts = encode.encode_jumprelu(x, W_enc.detach(), b_enc.detach(), theta.detach(), eps)
        order, offsets = segments(idx, counts, N)
        pre = encode.sampled_encoder(x, W_enc, b_enc, None, idx, counts, pre, order, offsets)
        x_hat, l0, _ = decode.jumprelu_decode(pre, idx, counts, theta, eps, W_dec, b_dec, order, offsets)
        return (x_hat - x).pow(2).sum(-1).mean() + 0.1 * l0.mean()

    def topk_step(x, W_enc, b_enc, W_dec, b_dec):
        x_in = (x - b_dec).detach()
        v, i = encode.encode_topk(x_in, W_enc.detach(), b_enc.detach(), 5)
        order, offsets = segments(i, None, N)
        v = torch.relu(encode.sampled_encoder(x, W_enc, b_enc, b_dec, i, None, v, order, offsets))
        return (decode.sparse_decode(v, i, W_dec, b_dec) - x).pow(2).sum(-1).mean()

    params = [W_enc, b_enc, W_dec, b_dec, theta]
    for fn, args, ps in [(jumprelu_step, (x, *params, eps), params), (topk_step, (x, *params[:4]), params[:4])]:
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        got_loss = compiled(*args)
        got = torch.autograd.grad(got_loss, ps)
        want_loss = fn(*args)
        want = torch.autograd.grad(want_loss, ps)
        torch.testing.assert_close(got_loss, want_loss)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e)


def test_opcheck_fastsae_triton_ops():
    from fastsae.ops import decode, encode, jumprelu, topk
    from fastsae.ops.triton_common import segments

    g = dict(device=DEV, dtype=torch.float64)
    B, N, D, K = 5, 11, 7, 3
    pre = torch.randn(B, N, **g, requires_grad=True)
    th = torch.rand(N, **g, requires_grad=True)
    eps = torch.full((N,), 0.3, **g)
    torch.library.opcheck(jumprelu.jumprelu, (pre, th, eps))
    torch.library.opcheck(jumprelu.step, (pre, th, eps))
    torch.library.opcheck(topk._topk_values, (pre, 4))
    v = torch.randn(B, K, **g, requires_grad=True)
    i = torch.randint(0, N, (B, K), device=DEV)
    W = torch.randn(N, D, **g, requires_grad=True)
    b = torch.randn(D, **g, requires_grad=True)
    torch.library.opcheck(decode.sparse_decode, (v, i, W, b))
    torch.library.opcheck(decode.sparse_decode, (v, i, W, None, *segments(i, None, N)))
    torch.library.opcheck(decode.sddmm, (torch.randn(B, D, **g), i, W.detach()))
    x = torch.randn(B, D, **g)
    We = torch.randn(D, N, **g, requires_grad=True)
    be = torch.randn(N, **g, requires_grad=True)
    idx, pc, counts = encode.encode_jumprelu(x, We.detach(), be.detach(), th.detach(), eps)
    order, offsets = segments(idx, counts, N)
    torch.library.opcheck(encode.sampled_encoder, (x, We, be, b, idx, counts, pc, order, offsets))
    torch.library.opcheck(decode.jumprelu_decode,
                          (pc.clone().requires_grad_(), idx, counts, th, eps, W, b, order, offsets))
    torch.library.opcheck(encode.encode_topk, (x, We.detach(), be.detach(), 4))
    # padded lists with counts (ReLU / Gated), and the JumpReLU decode's straight-through backward
    torch.library.opcheck(decode.sparse_decode, (pc.clone().requires_grad_(), idx, W, b, order, offsets, None, None,
                                                 True, counts))
    torch.library.opcheck(decode.sddmm, (torch.randn(B, D, **g), idx, W.detach(), None, True, counts))
    torch.library.opcheck(decode.jumprelu_decode,
                          (pc.clone().requires_grad_(), idx, counts, th, eps, W, b, order, offsets, True, True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels run on GPUs (the interpreter has no bf16)")
@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_bf16_step_close_to_float32_reference(arch):
    """bf16 inputs, float32 accumulation: the fused step stays close to a float32 eager step."""
    x, W_enc, b_enc, W_dec, b_dec, theta, eps = sae_params(64, 96, 1000, torch.bfloat16)
    ps = [W_enc, b_enc, W_dec, b_dec] + ([theta] if arch == "jumprelu" else [])
    if arch == "jumprelu":
        out = backend().jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, theta, eps, False)
        loss = ref.mse(out.x_hat, x) + 0.1 * out.l0.mean()
    else:
        out = backend().topk_sae(x, W_enc, b_enc, W_dec, b_dec, 16, True)
        loss = ref.mse(out.x_hat, x)
    got = torch.autograd.grad(loss, ps)
    p32 = [p.detach().float().requires_grad_() for p in ps]
    if arch == "jumprelu":
        want_loss = ref.jumprelu_loss(x.float(), *p32, eps, 0.1)["loss"]
    else:
        want_loss = ref.mse(ref.topk_sae_forward(x.float(), *p32, 16, True).x_hat, x.float())
    want = torch.autograd.grad(want_loss, p32)
    torch.testing.assert_close(loss.float(), want_loss, atol=5e-2, rtol=5e-2)
    # θ's gradient counts window entries, whose membership bf16 rounding of pre can flip: looser there.
    for n, a, e in zip(["W_enc", "b_enc", "W_dec", "b_dec", "threshold"], got, want):
        assert float((a.float() - e).norm() / e.norm().clamp_min(1e-12)) < (0.15 if n == "threshold" else 5e-2), n
