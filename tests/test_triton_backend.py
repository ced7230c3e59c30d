"""The ``triton`` backend (fastsae/ops/triton_backend.py): fused SAE forward passes against reference.py,
availability rules, bf16 fallback in the interpreter, torch.compile tracing and opcheck of the ops."""
import importlib

import pytest
import torch

import fastsae
backends_mod = importlib.import_module("fastsae.dispatch")
from fastsae import reference as ref

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


@pytest.mark.parametrize("B,d_in,d_sae,dtype,apply_b_dec", [
    (11, 13, 37, torch.float32, False), (11, 13, 37, torch.float64, True),
    (25, 40, 53, torch.float64, False), (25, 40, 53, torch.float32, True)])
def test_jumprelu_sae_matches_reference(B, d_in, d_sae, dtype, apply_b_dec):
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
        out = be.jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, theta, eps, apply_b_dec)
        loss = ref.mse(out.x_hat, x) + lam * out.l0.mean()
        results.append((out, torch.autograd.grad(loss, params)))
    (oe, ge), (ot, gt) = results
    torch.testing.assert_close(ot.x_hat, oe.x_hat, **TOL[dtype])
    torch.testing.assert_close(ot.l0, oe.l0)
    assert torch.equal(ot.fired, oe.fired)
    for name, a, e in zip(["W_enc", "b_enc", "W_dec", "b_dec", "threshold", "x"], gt, ge):
        torch.testing.assert_close(a, e, **TOL[dtype], msg=name)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("dtype,apply_b_dec", [(torch.float32, True), (torch.float64, False)])
def test_topk_sae_matches_reference(arch, dtype, apply_b_dec):
    B, d_in, d_sae, k = 13, 11, 41, 6
    x, W_enc, b_enc, W_dec, b_dec, _, _ = sae_params(B, d_in, d_sae, dtype)
    x.requires_grad_(True)
    params = [W_enc, b_enc, W_dec, b_dec, x]
    results = []
    for be in (backends_mod.get("eager", torch.device(DEV)), backend()):
        fn = be.topk_sae if arch == "topk" else be.batchtopk_sae
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


def test_module_training_step_on_triton_matches_eager():
    """A JumpReLUSAE and a TopKSAE (float32, with AuxK) on backend='triton' give eager's loss and gradients."""
    x = torch.randn(17, 12, device=DEV)
    for arch in ["jumprelu", "topk"]:
        grads = []
        for be in ["eager", "triton"]:
            torch.manual_seed(3)
            if arch == "jumprelu":
                sae = fastsae.JumpReLUSAE(12, 45, bandwidth=0.05, threshold_init=0.05, backend=be, device=DEV)
            else:
                sae = fastsae.TopKSAE(12, 45, k=4, k_aux=3, backend=be, device=DEV)
            with torch.no_grad():
                sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
                sae.b_dec.add_(0.05 * torch.randn_like(sae.b_dec))
            dead = torch.zeros(45, dtype=torch.bool, device=DEV)
            dead[::3] = True
            out = sae.training_forward(x, dead_mask=dead)
            out.loss.backward()
            grads.append((out.loss.detach(), {n: p.grad for n, p in sae.named_parameters()}))
        (le, ge), (lt, gt) = grads
        torch.testing.assert_close(lt, le, atol=1e-5, rtol=1e-5)
        for n in ge:
            torch.testing.assert_close(gt[n], ge[n], atol=1e-5, rtol=1e-5, msg=f"{arch}.{n}")


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
        x_hat, l0 = decode.jumprelu_decode(pre, idx, counts, theta, eps, W_dec, b_dec, order, offsets)
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
