"""The mechanisms behind issue 18's training-quality fixes, one by one: the target-L0 controller, the data-driven
threshold init, BatchTopK's inference threshold, resampling of dead and duplicate latents, the centred input
scale, and exact resume through all of them."""
import math

import pytest
import torch

import fastsae
from fastsae import sparsity as sparsity_control
from fastsae.data import synthetic
from fastsae.resample import Resampler, _duplicates, _pair_rows
from fastsae.training import estimate_input_scale, train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_controller_moves_lambda_towards_the_target_from_both_sides_without_a_host_read():
    log_lam = torch.tensor(math.log(0.01))
    sparsity_control.update_log_lambda(log_lam, torch.tensor(40.0), 10.0)  # 4× too many: λ up, clamped at e
    assert float(log_lam) == pytest.approx(math.log(0.01) + sparsity_control.DEFAULT_RATE * 1.0)
    before = float(log_lam)
    sparsity_control.update_log_lambda(log_lam, torch.tensor(5.0), 10.0)  # 2× too few: λ down by log 2
    assert float(log_lam) == pytest.approx(before - sparsity_control.DEFAULT_RATE * math.log(2))
    big = torch.tensor(0.0)
    for _ in range(100_000):
        sparsity_control.update_log_lambda(big, torch.tensor(1e6), 1.0, rate=1.0)
    assert float(big) == pytest.approx(sparsity_control.LOG_LAMBDA_RANGE[1])  # no wind-up past the range
    with pytest.raises(ValueError, match="target_l0"):
        fastsae.ReLUSAE(8, 16, target_l0=17)
    with pytest.raises(ValueError, match="target_l0 goes with"):
        fastsae.JumpReLUSAE(8, 16, target_l0=2, sparsity_loss="step")


def test_jumprelu_threshold_init_from_data_gives_the_asked_l0():
    data = synthetic(20_000, 16, 40, active=3, seed=1)
    sae = fastsae.JumpReLUSAE(16, 96, target_l0=3.0)
    assert sae.init_l0 == 6.0  # "auto": twice the target
    x = data.x[:4096]
    sae.init_from_data(x)
    l0 = float((sae.encode(x) != 0).sum(1).float().mean())
    assert l0 == pytest.approx(6.0, rel=0.1)
    assert bool((sae.threshold >= 0).all())
    plain = fastsae.JumpReLUSAE(16, 96)
    before = plain.threshold.detach().clone()
    plain.init_from_data(x)  # no target and no init_l0: θ stays at threshold_init
    assert torch.equal(plain.threshold.detach(), before)


@pytest.mark.parametrize("arch", ["relu", "gated", "batchtopk"])
def test_fit_encoder_scale_removes_the_first_reconstructions_overshoot_and_keeps_the_code(arch):
    """A fresh SAE (W_enc = W_decᵀ, biases 0) reconstructs several times its input; init_from_data scales W_enc
    so that the least-squares multiple of the fresh reconstruction is 1, without changing which latents fire."""
    torch.manual_seed(0)
    data = synthetic(8192, 16, 64, active=3, seed=1)
    x = data.x * estimate_input_scale(data.x)
    cls = fastsae.sae.ARCHITECTURES[arch]
    sae = cls(16, 128, 4) if arch == "batchtopk" else cls(16, 128)
    assert sae.fit_encoder_scale_at_init
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))

    def ls_multiple():
        with torch.no_grad():
            f = sae.encode(x)
            y, t = f @ sae.W_dec, x - sae.b_dec
            return float((t * y).sum() / y.pow(2).sum()), f != 0

    before, fired = ls_multiple()
    assert before < 0.8, before  # the fresh reconstruction overshoots
    sae.init_from_data(x)
    after, fired_after = ls_multiple()
    assert after == pytest.approx(1.0, abs=1e-3)
    assert torch.equal(fired, fired_after)
    # TopK and JumpReLU keep their own initialisation
    assert not fastsae.TopKSAE.fit_encoder_scale_at_init


def test_batchtopk_running_threshold_is_bias_corrected_and_calibration_keeps_k_per_row():
    torch.manual_seed(0)
    sae = fastsae.BatchTopKSAE(12, 48, 4, threshold_decay=0.9)
    sae.train()
    x = torch.randn(256, 12)
    mins = []
    for _ in range(3):
        out = sae.training_forward(x + 0.1 * torch.randn_like(x))
        mins.append(float(sae.threshold))
    # after n updates the estimate is the (weighted) mean of the batch minima seen so far, not a blend with -1
    assert 0 < mins[0] and all(m > 0 for m in mins)
    held = torch.randn(4000, 12)
    t = sae.calibrate(held)
    assert t == pytest.approx(float(sae.threshold)) and sae.calibrated
    l0 = float((sae.encode(held) != 0).sum(1).float().mean())
    assert l0 == pytest.approx(4.0, rel=0.01)


def test_batchtopk_inference_l0_is_k_after_300_steps():
    """Issue 18: held-out L0 within 10% of k at 300 steps, and training and inference reconstructions agree."""
    data = synthetic(100_000, 16, 48, active=3, seed=2)
    held = data.sample(4000, seed=3)
    sae = fastsae.BatchTopKSAE(16, 96, 4)
    train(sae, data, steps=300, batch_size=256, progress=False)
    f = sae.encode(held)
    assert float((f != 0).sum(1).float().mean()) == pytest.approx(4.0, rel=0.1)
    # the batch top-k of the whole held-out set (what training computes) against the thresholded code
    sae.train()
    with torch.no_grad():
        pre = torch.relu((held - sae.b_dec) @ sae.W_enc + sae.b_enc)
        top = torch.topk(pre.reshape(-1), 4000 * 4).indices
        batch_code = torch.zeros_like(pre).reshape(-1)
        batch_code[top] = pre.reshape(-1)[top]
        x_batch = batch_code.reshape(pre.shape) @ sae.W_dec + sae.b_dec
        x_inf = sae.decode(f)
    rel = float((x_batch - x_inf).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
    assert rel < 0.01, rel


def test_duplicates_are_the_weaker_of_co_firing_pairs_with_close_decoder_rows():
    W = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    W[3] = W[1] + 0.05 * torch.randn(8)  # a near copy of latent 1
    values = torch.tensor([[1.0, 2.0, 0.0], [1.0, 1.0, 0.5]])
    indices = torch.tensor([[1, 3, 0], [1, 3, 5]])
    fires = torch.tensor([0, 9, 0, 4, 0, 1])
    dup = _duplicates(W, values, indices, fires, 0.7)
    assert dup.tolist() == [False, False, False, True, False, False]
    # latents that never fire together are not duplicates, however close their rows
    assert not _duplicates(W, values[:, :1], indices[:, :1], fires, 0.7).any()


def test_duplicate_search_is_bounded_on_a_dense_code(monkeypatch):
    """A fresh JumpReLU's code has thousands of entries per row: the pair search looks at fewer rows (none when
    one row alone is over the budget) instead of allocating rows · K² pairs; a sparse code keeps every row."""
    from fastsae import resample

    assert _pair_rows(64) == resample._PAIR_ROWS
    assert 0 < _pair_rows(1024) < resample._PAIR_ROWS and _pair_rows(1024) * 1024 ** 2 <= resample._PAIR_BUDGET
    assert _pair_rows(8192) == 0
    monkeypatch.setattr(resample, "_PAIR_BUDGET", 3 * 40 * 40)  # three rows of a 40-entry code
    seen = []
    monkeypatch.setattr(resample, "_duplicates", lambda W, v, i, f, c: seen.append(i.shape) or _duplicates(W, v, i, f, c))
    torch.manual_seed(0)
    sae = fastsae.JumpReLUSAE(16, 40, threshold_init=0.0)  # θ = 0: about half the latents fire on every row
    probe = torch.randn(64, 16)
    Resampler(every=1, until=10, probe=probe, seed=0)(sae, torch.optim.Adam(sae.parameters()), step=1)
    values = sae.encode_sparse(probe)[0]
    counts = (values != 0).sum(1)
    K = int(counts.float().quantile(0.99).ceil())  # the widest rows (the top 1%) are left out of the search
    kept = int((counts <= K).sum())
    assert K > 10 and seen == [torch.Size([min(kept, 3 * 40 * 40 // K ** 2), K])]


def test_one_dense_row_does_not_shrink_the_duplicate_search():
    """The pair budget is rows · K² with K the widest row searched: an outlier row with many active latents is left
    out (and the others cut to the 99th percentile of L0), so the search still covers the typical rows."""
    from fastsae.resample import _typical_rows

    values = torch.zeros(200, 50)
    indices = torch.zeros(200, 50, dtype=torch.long)
    values[:, 1] = 1.0  # the padding in front of an active entry: active entries must come first after the cut
    indices[:, 1] = torch.arange(200) % 7 + 1
    values[:, 3] = 2.0
    indices[:, 3] = 9
    values[0] = 1.0  # one row with 50 active latents
    indices[0] = torch.arange(50)
    v, i = _typical_rows(values, indices)
    assert v.shape == (199, 2) and bool((v != 0).all())
    assert torch.equal(i[:, 0], indices[1:, 1]) and bool((i[:, 1] == 9).all())


def test_resampling_revives_dead_latents_towards_the_residual_and_resets_their_adam_rows():
    torch.manual_seed(0)
    data = synthetic(20_000, 16, 40, active=3, seed=4)
    sae = fastsae.TopKSAE(16, 64, 3)
    with torch.no_grad():
        sae.W_enc[:, :10] = -5.0 * sae.W_enc[:, :10].abs()  # latents 0..9 can never win the top-k: dead
        sae.b_enc[:10] = -10
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae.training_forward(data.x[:256]).loss.backward()
    opt.step()
    probe = data.x[:2048]
    n = Resampler(every=1, until=10, probe=probe, seed=0)(sae, opt, step=1)
    assert n >= 10
    _, idx = sae.encode_sparse(probe)
    assert torch.isin(torch.arange(10), idx.unique()).all()  # every revived latent fires again
    assert float(sae.b_enc[:10].detach().abs().max()) == 0.0
    sq = opt.state[sae.W_dec]["exp_avg_sq"]
    assert torch.allclose(sq[:10], sq[:10][0].expand(10, -1)) and float(sq[:10].abs().sum()) > 0
    assert float(opt.state[sae.W_dec]["exp_avg"][:10].abs().sum()) == 0.0


@pytest.mark.parametrize("arch", ["jumprelu", "topk", "relu"])
def test_resume_is_exact_across_resampling_and_the_controllers(tmp_path, arch):
    data = synthetic(20_000, 12, 24, active=2, seed=5)

    def make():
        torch.manual_seed(3)
        if arch == "jumprelu":
            # its defaults cross the cpp crossover during the run: the resumed run must make the same
            # dense-or-sparse choices (the checkpoint carries the density record), or it differs at rounding level
            return fastsae.JumpReLUSAE(12, 48, target_l0=2.0)
        if arch == "relu":  # checkpoints before (step 70) and after (step 140) its controller starts (step 120)
            return fastsae.ReLUSAE(12, 48, target_l0=2.0)
        return fastsae.TopKSAE(12, 48, 2)

    kw = dict(steps=200, batch_size=64, progress=False, resample_every=40,
              lr=2e-4 / math.sqrt(48 / 2**14) if arch == "jumprelu" else None)
    full = make()
    train(full, data, **kw)
    part = make()
    with pytest.raises(KeyboardInterrupt):
        train(part, data, checkpoint_dir=tmp_path, checkpoint_every=70,
              callback=lambda r: (_ for _ in ()).throw(KeyboardInterrupt) if r["step"] == 140 else None,
              log_every=70, **kw)
    resumed = make()
    result = train(resumed, data, checkpoint_dir=tmp_path, resume=True, log_every=70, **kw)
    assert result.final["resampled"] > 0
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_input_scale_is_the_centred_rms_norm():
    x = torch.randn(5000, 8) + 10.0  # a mean offset far larger than the variation
    s = estimate_input_scale(x)
    centred = (x.double() - x.double().mean(0)).pow(2).sum(1).mean()
    assert s == pytest.approx(float(1 / centred.sqrt()), rel=1e-9)


# -- ReLU and Gated (the L1 family): the target-L0 schedule, resampled biases, the learning-rate rule --------


@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_l1_target_l0_follows_the_fixed_schedule_until_controller_start(arch):
    """Before ``controller_start`` of the run λ is the fixed-λ run's (linear warm-up over 10% of the steps, then
    ``sparsity_coefficient``) whatever L0 the batches show; from then on the controller moves it."""
    sae = fastsae.sae.ARCHITECTURES[arch](8, 16, sparsity_coefficient=0.5, target_l0=2.0, controller_start=0.5)
    x = torch.randn(4, 8)

    def step(i, l0):
        sae.on_train_step(i, 100)
        lam = float(sae.sparsity_coefficient)
        out = sae.training_forward(x)
        out.l0 = torch.tensor(float(l0))
        sae.observe(x, out)
        return lam

    assert step(0, 500) == pytest.approx(0.05) and step(4, 500) == pytest.approx(0.25)
    assert [step(i, 500) for i in (9, 30, 49)] == pytest.approx([0.5] * 3)  # a dense L0 does not move it
    assert step(50, 500) == pytest.approx(0.5)
    assert float(sae.sparsity_coefficient) > 0.5  # the controller's first update, at step 50
    for i in range(51, 100):
        step(i, 0.5)  # too sparse: λ comes down
    assert float(sae.sparsity_coefficient) < 0.5
    with pytest.raises(ValueError, match="controller_start"):
        fastsae.ReLUSAE(8, 16, target_l0=2, controller_start=1.0)
    with pytest.raises(ValueError, match="resample_bias"):
        fastsae.GatedSAE(8, 16, resample_bias="random")
    assert fastsae.sae.ARCHITECTURES[arch](8, 16).config()["controller_start"] == 0.6


@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_l1_resampled_latents_start_at_the_live_firing_rate(arch):
    """A resampled ReLU/Gated latent fires on about the live latents' share of the probe rows (bias 0 would make
    it fire on about half of them); Gated's magnitude path starts as its gate (r_mag = 0, b_mag = b_gate)."""
    torch.manual_seed(0)
    cls = fastsae.sae.ARCHITECTURES[arch]
    sae = cls(16, 64)
    probe = synthetic(4096, 16, 40, active=3, seed=2).x
    probe = probe - probe.mean(0)
    idx = torch.arange(8)
    directions = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    live = torch.ones(64, dtype=torch.bool)
    live[idx] = False
    sae.reinit_latents(idx, directions, live, probe, fire_rate=0.05)
    rate = (sae.encode(probe)[:, idx] != 0).float().mean(0)
    assert torch.allclose(rate, torch.full_like(rate, 0.05), atol=0.01), rate
    if arch == "gated":
        assert float(sae.r_mag[idx].detach().abs().max()) == 0 and torch.equal(sae.b_mag[idx], sae.b_gate[idx])
    zero = cls(16, 64, resample_bias="zero")
    zero.reinit_latents(idx, directions, live, probe, fire_rate=0.05)
    assert float((zero.encode(probe)[:, idx] != 0).float().mean()) > 0.3  # the old rule: about half the rows


def test_l1_learning_rate_is_twice_the_width_rule():
    from fastsae.training import default_hyperparameters

    base = default_hyperparameters(fastsae.TopKSAE(16, 256, 4))["lr"]
    for sae in (fastsae.ReLUSAE(16, 256), fastsae.GatedSAE(16, 256), fastsae.Transcoder("relu", 16, 256)):
        assert default_hyperparameters(sae)["lr"] == pytest.approx(2 * base)


def test_off_active_residual_is_what_the_rows_active_latents_cannot_explain():
    """ReLU resamples towards the residual minus its least-squares fit by the row's active decoder rows (the raw
    residual of an L1 SAE is mostly shrinkage along those rows); inactive slots (value 0) take no part."""
    from fastsae.resample import _off_active

    torch.manual_seed(0)
    W_dec = torch.randn(10, 6)
    indices = torch.tensor([[1, 4, 7], [2, 3, 0]])
    values = torch.tensor([[0.5, 1.0, 0.2], [1.0, 0.0, 0.0]])  # row 1: only latent 2 is active
    missing = torch.randn(2, 6)
    residual = 0.3 * W_dec[[1, 2]] + 0.2 * W_dec[[4, 2]] + missing
    out = _off_active(residual, values, indices, W_dec)
    assert (out[0] @ W_dec[[1, 4, 7]].t()).abs().max() < 1e-4
    assert (out[1] @ W_dec[2]).abs() < 1e-4 and (out[1] @ W_dec[3]).abs() > 1e-2  # latent 3 is not active
    assert fastsae.ReLUSAE.resample_off_active and not fastsae.GatedSAE.__dict__.get("resample_off_active", False)


def test_relu_fit_magnitudes_solves_the_least_squares_scale_and_keeps_the_firing():
    """α against the exact normal-equation solve (dense, small), without touching which latents fire."""
    torch.manual_seed(0)
    sae = fastsae.ReLUSAE(13, 37, dtype=torch.float64)
    with torch.no_grad():
        sae.b_enc.sub_(0.3)  # a sparse code, with some latents that fire on no row of the sample
        sae.b_enc[:5] = -100.0
    x = 2 * torch.randn(301, 13, dtype=torch.float64)
    with torch.no_grad():
        f, t, w = sae._dense_code(x), x - sae.b_dec, sae.W_dec
        gram = (f.t() @ f) * (w @ w.t())
        rhs = (f * (t @ w.t())).sum(0)
        fired = gram.diagonal() > 0
        want = torch.ones(37, dtype=torch.float64)
        g = gram[fired][:, fired]
        want[fired] = torch.linalg.solve(g + 1e-6 * g.diagonal().mean() * torch.eye(len(g), dtype=g.dtype),
                                         rhs[fired])  # the method's default ridge
        want = torch.where(want > 0, want, torch.ones_like(want))
        before = (sae(x) - x).pow(2).sum()
    assert 0 < int((~fired).sum()) and int((want[fired] != 1).sum()) > 20
    alpha = sae.fit_magnitudes(x)
    torch.testing.assert_close(alpha, want, atol=1e-5, rtol=1e-4)  # CG to its tolerance
    with torch.no_grad():
        assert torch.equal(sae._dense_code(x) != 0, f != 0)
        assert (sae(x) - x).pow(2).sum() < before
    assert fastsae.ReLUSAE.fit_magnitudes_at_end and not getattr(fastsae.GatedSAE, "fit_magnitudes_at_end", False)
