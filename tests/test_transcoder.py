"""Transcoders and skip transcoders of every architecture: training_forward(x, target) against float64 formulas
written out here (forward and backward) on every backend, save/load, and training on paired synthetic data
(a sparse code read off x, written to y, plus a linear part the skip connection must learn)."""
import pytest
import torch
import torch.nn.functional as F

import fastsae
from fastsae import reference as ref
from fastsae.data import feature_recovery
from fastsae.training import paired_rows

from conftest import BACKENDS

pytestmark = pytest.mark.usefixtures("one_thread")

D_IN, D_OUT, D_SAE, K = 9, 7, 29, 3
KW = {"relu": {}, "jumprelu": {"bandwidth": 0.05, "k_aux": 0}, "topk": {"k": K}, "batchtopk": {"k": K},
      "matryoshka_batchtopk": {"k": K, "widths": [6, 15]}, "gated": {}}


def _module(arch, backend, skip, d_out=D_OUT):
    torch.manual_seed(3)
    sae = fastsae.Transcoder(arch, D_IN, D_SAE, d_out=d_out, skip_connection=skip, backend=backend,
                             dtype=torch.float64, **KW[arch])
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.add_(torch.randn_like(p) * (0.02 if name in ("threshold", "r_mag") else 0.3))
            if name == "threshold":
                p.abs_()
    return sae.train()


def _oracle(sae, x, y, dead):
    """The loss of each architecture, written from its definition with ŷ = decoder + x @ W_skip and y as target."""
    arch = sae.base_architecture
    skip = x @ sae.W_skip if sae.skip_connection else 0
    W_enc, b_dec, W_dec = sae.W_enc, sae.b_dec, sae.W_dec
    mse = lambda y_hat: (y_hat - y).pow(2).sum(-1).mean()  # noqa: E731
    if arch == "gated":
        gate = x @ W_enc + sae.b_gate
        f = (gate > 0).to(x.dtype) * F.relu(x @ (W_enc * sae.r_mag.exp()) + sae.b_mag)
        frozen = F.relu(gate) @ W_dec.detach() + b_dec.detach() + skip
        return mse(f @ W_dec + b_dec + skip) + sae.sparsity_coefficient * F.relu(gate).sum(-1).mean() + mse(frozen)
    pre = x @ W_enc + sae.b_enc
    if arch == "relu":
        f = F.relu(pre)
        return mse(f @ W_dec + b_dec + skip) + sae.sparsity_coefficient * (f @ W_dec.norm(dim=1)).mean()
    if arch == "jumprelu":
        f = ref.jumprelu(pre, sae.threshold, sae.bandwidth)
        l0 = ref.step(pre, sae.threshold, sae.bandwidth).sum(-1).mean()
        return mse(f @ W_dec + b_dec + skip) + sae.sparsity_coefficient * l0
    pre = F.relu(pre)
    if arch == "topk":
        v, i = torch.topk(pre, K)
        f = torch.zeros_like(pre).scatter(1, i, v)
    else:
        keep = torch.topk(pre.detach().reshape(-1), x.shape[0] * K).indices
        f = pre * torch.zeros(pre.numel(), dtype=torch.bool).index_fill(0, keep, True).reshape(pre.shape)
    y_hat = f @ W_dec + b_dec + skip
    loss = mse(y_hat)
    if arch == "matryoshka_batchtopk":
        loss = loss + sum(w / sae.d_sae * mse(f[:, :w] @ W_dec[:w] + b_dec + skip) for w in sae.widths[:-1])  # by width
    e = (y - y_hat).detach()
    dead_pre = F.relu(x @ W_enc[:, dead] + sae.b_enc[dead])
    v, i = torch.topk(dead_pre, min(sae.k_aux, int(dead.numel())))
    e_hat = torch.zeros_like(dead_pre).scatter(1, i, v) @ W_dec[dead]
    return loss + sae.aux_coefficient * (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("arch", sorted(KW))
def test_training_forward_with_target_matches_float64_formula(arch, skip, backend):
    sae = _module(arch, backend, skip)
    x = torch.randn(11, D_IN, dtype=torch.float64) * 1.5
    y = torch.randn(11, D_OUT, dtype=torch.float64)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    out = sae.training_forward(x, y, dead_mask=dead)
    params = list(sae.parameters())
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    expected_loss = _oracle(sae, x, y, dead.nonzero().squeeze(1))
    expected = torch.autograd.grad(expected_loss, params, allow_unused=True)
    torch.testing.assert_close(out.loss, expected_loss)
    assert out.x_hat.shape == (11, D_OUT)
    for (name, _), g, e in zip(sae.named_parameters(), grads, expected):
        if e is None:
            assert g is None or not g.any(), name
        else:
            torch.testing.assert_close(g, e, msg=name)
    sae.eval()
    assert sae(x.reshape(1, 11, D_IN)).shape == (1, 11, D_OUT)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("skip", [False, True])
def test_jumprelu_transcoder_auxk_fits_the_output_residual(backend, skip):
    """JumpReLU's AuxK in a transcoder: quiet latents fit the residual of the d_out target (of ``target - x @
    W_skip`` with a skip connection), projected off the firing latents' d_out decoder rows."""
    x = torch.randn(11, D_IN, dtype=torch.float64) * 1.5
    y = torch.randn(11, D_OUT, dtype=torch.float64)
    losses = []
    for k_aux in (0, 3):
        sae = _module("jumprelu", backend, skip)
        sae.k_aux = k_aux
        with torch.no_grad():  # few firing latents a row, so the firing rows do not span the output space
            if skip:
                sae.W_skip.add_(0.1)
            sae.threshold.copy_((x @ sae.W_enc + sae.b_enc).quantile(0.9, dim=0).clamp_min(0))
        out = sae.training_forward(x, y)
        losses.append(out.loss)
    t = y - (x @ sae.W_skip if skip else 0)
    inner = out.x_hat - (x @ sae.W_skip if skip else 0)
    aux = ref.quiet_auxk_loss(x, sae.W_enc, sae.b_enc, sae.W_dec, sae.threshold, t - inner, 3)
    assert float(aux) > 0
    torch.testing.assert_close(losses[1] - losses[0], sae.aux_coefficient * aux)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_width_transcoder_uses_the_fused_kernels_and_agrees(backend):
    """d_out == d_in: the fused TopK kernels run (W_dec is [d_sae, d_in]); the result is the eager one."""
    x, y = torch.randn(13, D_IN, dtype=torch.float64), torch.randn(13, D_IN, dtype=torch.float64)
    a, b = _module("topk", backend, True, D_IN), _module("topk", "eager", True, D_IN)
    torch.testing.assert_close(a.training_forward(x, y).loss, b.training_forward(x, y).loss)


def test_target_is_validated():
    sae = fastsae.Transcoder("topk", 6, 12, d_out=4, k=2)
    x = torch.randn(5, 6)
    with pytest.raises(ValueError, match="target="):
        sae.training_forward(x)
    with pytest.raises(ValueError, match="d_out"):
        sae.training_forward(x, torch.randn(5, 6))
    with pytest.raises(ValueError, match="leading shape"):
        sae.training_forward(x, torch.randn(4, 4))
    with pytest.raises(TypeError, match="target"):
        sae.training_forward(x, torch.ones(5, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="apply_b_dec_to_input"):
        fastsae.Transcoder("relu", 6, 12, apply_b_dec_to_input=True)
    with pytest.raises(ValueError, match="architecture must be one of"):
        fastsae.Transcoder("crosscoder", 6, 12)
    # an SAE module with target= is a same-width transcoder: the loss measures the target
    sae = fastsae.TopKSAE(6, 12, 2)
    y = torch.randn(5, 6)
    out = sae.training_forward(x, y)
    torch.testing.assert_close(out.mse, (out.x_hat - y).pow(2).sum(-1).mean())


@pytest.mark.parametrize("arch", sorted(KW))
def test_save_and_load(tmp_path, arch):
    sae = _module(arch, "eager", True).float()
    if hasattr(sae, "calibrated"):
        sae.training_forward(torch.randn(32, D_IN), torch.randn(32, D_OUT))
    sae.eval()
    sae.save(tmp_path)
    back = fastsae.load(tmp_path)
    assert type(back) is type(sae) and back.config() == sae.config()
    x = torch.randn(5, D_IN)
    torch.testing.assert_close(back(x), sae(x))


def synthetic_pairs(n, d_in=24, d_out=20, n_features=96, active=3.0, seed=0):
    """x = Σ c_j u_j, y = Σ c_j v_j + x A: a sparse code read from x and written to y, plus a linear part."""
    g = torch.Generator().manual_seed(seed)
    U = F.normalize(torch.randn(n_features, d_in, generator=g), dim=1)
    V = F.normalize(torch.randn(n_features, d_out, generator=g), dim=1)
    A = torch.randn(d_in, d_out, generator=g) * 0.1

    def draw(m, seed):
        h = torch.Generator().manual_seed(seed)
        c = (torch.rand(m, n_features, generator=h) < active / n_features) * (0.5 + torch.rand(m, n_features, generator=h))
        x = c @ U
        return x, c @ V + x @ A

    return draw, V, A


@pytest.mark.slow
def test_transcoders_learn_the_code_and_the_skip_the_linear_part():
    """Measured (3000 steps of 512): recovery 0.91 / FVU 0.30 without a skip; with one FVU 0.23 and W_skip at
    cosine 0.63 to the true linear part (the skip also absorbs what x predicts of the code linearly, so its
    decoder recovers fewer directions: as in Paulo et al., skip transcoders trade latents for reconstruction)."""
    draw, V, A = synthetic_pairs(0)
    x, y = draw(150_000, 1)
    hx, hy = draw(8192, 2)
    results = {}
    for skip in (False, True):
        torch.manual_seed(0)
        sae = fastsae.Transcoder("topk", 24, 192, d_out=20, k=3, skip_connection=skip)
        fastsae.train(sae, (x, y), steps=3000, batch_size=512, lr=3e-3, progress=False)
        with torch.no_grad():
            results[skip] = dict(
                fvu=float((sae(hx) - hy).pow(2).sum() / (hy - hy.mean(0)).pow(2).sum()),
                l0=float((sae.encode(hx) != 0).sum(-1).float().mean()), recovery=feature_recovery(sae.W_dec, V),
                skip_cos=float(F.cosine_similarity(sae.W_skip.flatten(), A.flatten(), dim=0)) if skip else None)
    print(results)
    plain, skipped = results[False], results[True]
    assert plain["recovery"] > 0.8 and plain["fvu"] < 0.35 and 2.5 <= plain["l0"] <= 3.0
    assert skipped["fvu"] < plain["fvu"] and skipped["skip_cos"] > 0.5


def test_paired_rows_and_train_checks_width():
    x, y = torch.randn(64, 6), torch.randn(64, 4)
    rows = paired_rows(x, y)
    assert rows.shape == (64, 10) and torch.equal(rows[:, 6:], y)
    with pytest.raises(ValueError, match="pair up"):
        paired_rows(x, torch.randn(63, 4))
    sae = fastsae.Transcoder("relu", 6, 12, d_out=4)
    with pytest.raises(ValueError, match="d_in \\+ d_out"):
        fastsae.train(sae, torch.randn(64, 6), steps=1, batch_size=32, progress=False)
    res = fastsae.train(sae, (x, y), steps=3, batch_size=32, progress=False)
    assert res.steps == 3 and sae.b_dec.shape == (4,)


def test_harvest_pairs_train_and_splice_into_gpt2(tmp_path):
    """End to end on a tiny GPT-2: harvest the MLP's input and output of block 1 as paired shards, train a
    transcoder on them with fastsae.train, then evaluate it spliced in place of the MLP."""
    pytest.importorskip("transformers")
    from test_activations import make_texts, tiny_gpt2

    from fastsae.activations import Capture, harvest, iter_batches, tokenizer_template
    from fastsae.data import ShardSource
    from fastsae.evaluate import evaluate

    model, tok = tiny_gpt2()
    texts = make_texts(40)
    m = harvest(model, "transformer.h.1.mlp", texts, tmp_path / "acts", tokenizer=tok, context_length=16,
                batch_size=4, shard_tokens=256, input_hook="transformer.h.1.mlp", progress=False)
    assert m["pair"] == dict(d_in=32, d_out=32, input_hook="transformer.h.1.mlp", output_hook="transformer.h.1.mlp")
    assert m["d_in"] == 64
    # the rows are exactly the MLP's input and output
    batch = next(iter_batches(tok, texts, context_length=16, batch_size=4, template=tokenizer_template(tok)))
    rows = ShardSource(tmp_path / "acts").shards[0].rows(0, 5)
    mlp_in = Capture(model, "transformer.h.1.ln_2")(batch)[batch.keep][:5]
    torch.testing.assert_close(rows[:, :32], mlp_in)
    with torch.no_grad():
        torch.testing.assert_close(rows[:, 32:], model.transformer.h[1].mlp(mlp_in), rtol=1e-4, atol=1e-5)

    sae = fastsae.Transcoder("relu", 32, 64, sparsity_coefficient=1e-3)
    fastsae.train(sae, str(tmp_path / "acts"), steps=60, batch_size=64, progress=False)
    metrics = evaluate(sae, model, "transformer.h.1.mlp", texts, tokenizer=tok, context_length=16,
                       max_tokens=256, progress=False)
    assert metrics["input_hook"] == "transformer.h.1.mlp" and metrics["kind"] == "causal_lm"
    assert metrics["fvu"] < 1.0 and metrics["ce_spliced"] > 0 and metrics["kl_spliced"] >= 0


def test_resampling_a_transcoder_reads_inputs_and_writes_output_directions():
    """Dead latents of a (skip) transcoder come back with an encoder column along a badly predicted row's
    centred input and a decoder row along its residual in the output space; W_skip is no latent's and stays."""
    from fastsae.resample import Resampler

    draw, _, _ = synthetic_pairs(0, seed=1)
    x, y = draw(4096, 3)
    torch.manual_seed(0)
    sae = fastsae.Transcoder("topk", 24, 64, d_out=20, k=3, skip_connection=True)
    with torch.no_grad():
        sae.W_skip.normal_(0, 0.05)
        sae.W_enc[:, :10] = 0
        sae.b_enc[:10] = -10  # latents 0..9 never fire: dead
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae.training_forward(x[:256], y[:256]).loss.backward()
    opt.step()
    skip_before = sae.W_skip.detach().clone()
    with torch.no_grad():
        err = y - sae(x)  # the residuals the resampler draws from
    n = Resampler(every=1, until=10, probe=x, target=y, seed=0)(sae, opt, step=1)
    assert n >= 10
    _, idx = sae.encode_sparse(x)
    assert torch.isin(torch.arange(10), idx.unique()).all()
    assert torch.equal(sae.W_skip, skip_before)
    centred = x - x.mean(0)
    # each new decoder row is some probe row's residual direction, its encoder column that row's centred input
    dec_cos = F.normalize(sae.W_dec[:10], dim=1) @ F.normalize(err, dim=1).t()
    enc_cos = F.normalize(sae.W_enc[:, :10].t(), dim=1) @ F.normalize(centred, dim=1).t()
    row = enc_cos.argmax(1)
    assert bool((enc_cos.max(1).values > 0.999).all())
    assert bool((dec_cos.gather(1, row[:, None]).squeeze(1) > 0.999).all())


@pytest.mark.parametrize("arch", ["jumprelu", "batchtopk", "matryoshka_batchtopk"])
def test_training_a_transcoder_resamples_and_calibrates_on_the_input_side(arch):
    draw, _, _ = synthetic_pairs(0, seed=2)
    x, y = draw(20_000, 4)
    torch.manual_seed(0)
    kw = {"jumprelu": dict(target_l0=3.0), "batchtopk": dict(k=3),
          "matryoshka_batchtopk": dict(k=3, widths=[16, 48])}[arch]
    sae = fastsae.Transcoder(arch, 24, 96, d_out=20, skip_connection=True, **kw)
    with torch.no_grad():
        sae.W_enc[:, :8] = 0
        sae.b_enc[:8] = -10  # dead from the start: the resampler must revive them from paired probe rows
    res = fastsae.train(sae, (x, y), steps=200, batch_size=128, lr=3e-3, resample_every=40, progress=False)
    assert res.final["resampled"] > 0
    hx, hy = draw(4096, 5)
    with torch.no_grad():
        fvu = float((sae(hx) - hy).pow(2).sum() / (hy - hy.mean(0)).pow(2).sum())
        l0 = float((sae.encode(hx) != 0).sum(-1).float().mean())
    assert fvu < 0.9 and 1.0 < l0 < 8.0, (fvu, l0)
    if arch != "jumprelu":
        assert sae.calibrated


def test_relu_transcoder_fit_magnitudes_fits_its_target_less_the_skip():
    """The refit at the end of training compares the code's decode with the transcoder's target, not its input."""
    torch.manual_seed(0)
    tc = fastsae.Transcoder("relu", 6, 12, d_out=4, skip_connection=True, dtype=torch.float64)
    with torch.no_grad():
        tc.W_skip.normal_()
    x = torch.randn(200, 6, dtype=torch.float64)
    y = 3 * (torch.relu(x @ tc.W_enc + tc.b_enc) @ tc.W_dec) + tc.b_dec + x @ tc.W_skip  # α = 3 fits exactly
    alpha = tc.fit_magnitudes(x, y)
    fired = (torch.relu(x @ tc.W_enc / 3 + tc.b_enc / 3) > 0).any(0)
    torch.testing.assert_close(alpha[fired], torch.full((int(fired.sum()),), 3.0, dtype=torch.float64),
                               atol=1e-5, rtol=1e-5)
