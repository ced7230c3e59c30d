"""fastsae.train: feature recovery on synthetic data, exact scale folding, exact resume, NaN handling,
checkpoints, metrics, dead latents and schedules."""
import copy
import json
import math

import pytest
import torch

import fastsae
from fastsae.data import synthetic
from fastsae.metrics import evaluate
from fastsae.training import (CHECKPOINT, default_dead_after, estimate_input_scale, fold_input_scale, geometric_median,
                           load_checkpoint, lr_factor, sparsity_factor, train)


pytestmark = pytest.mark.usefixtures("one_thread")


# -- recovery (the acceptance tests) ---------------------------------------------------------

RECOVERY = dict(n=100_000, d_in=32, n_features=64, active=3)


@pytest.fixture(scope="module")
def problem():
    data = synthetic(RECOVERY["n"], RECOVERY["d_in"], RECOVERY["n_features"], active=RECOVERY["active"], seed=0)
    return data, data.sample(10_000, seed=1)


@pytest.mark.slow
def test_topk_default_settings_recover_features(problem):
    data, held_out = problem
    sae = fastsae.TopKSAE(RECOVERY["d_in"], 2 * RECOVERY["n_features"], 6)
    result = train(sae, data, steps=600, batch_size=512, progress=False)  # default lr, schedules, scale, b_dec
    ev = evaluate(sae, held_out)
    assert data.recovery(sae.W_dec) >= 0.9, data.recovery(sae.W_dec)
    assert ev["fvu"] < 0.2, ev
    assert result.steps == 600 and result.tokens == 600 * 512


@pytest.mark.slow
def test_jumprelu_recovers_features(problem):
    data, held_out = problem
    # λ chosen for this problem (L0 ≈ the true 3 active features); JumpReLU needs more steps than TopK here
    # (2500: 98% recovered, 3000: 100%, 1500: ~85%), with the default lr and schedules.
    sae = fastsae.JumpReLUSAE(RECOVERY["d_in"], 2 * RECOVERY["n_features"], sparsity_coefficient=2e-2)
    train(sae, data, steps=2500, batch_size=512, progress=False)
    ev = evaluate(sae, held_out)
    assert data.recovery(sae.W_dec) >= 0.9, data.recovery(sae.W_dec)
    assert ev["fvu"] < 0.2, ev
    assert ev["l0"] < 3 * RECOVERY["active"], ev  # sparse, not a dense code that happens to reconstruct
    assert bool((sae.threshold >= 0).all())


# -- input scale --------------------------------------------------------------------------------------

SMALL = {
    "topk": lambda: fastsae.TopKSAE(10, 24, 4, dtype=torch.float64),
    "batchtopk": lambda: fastsae.BatchTopKSAE(10, 24, 4, dtype=torch.float64),
    "jumprelu": lambda: fastsae.JumpReLUSAE(10, 24, dtype=torch.float64),
    "relu": lambda: fastsae.ReLUSAE(10, 24, dtype=torch.float64),
    "gated": lambda: fastsae.GatedSAE(10, 24, dtype=torch.float64),
}


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_folding_the_scale_is_exact(arch):
    sae = SMALL[arch]()
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn_like(p) * (0.05 if name in ("threshold", "r_mag") else 0.3))
            if name == "threshold":
                p.abs_()
        if arch == "batchtopk":
            sae.threshold.fill_(0.2)
    sae.eval()
    s = 0.37
    x = torch.randn(13, 10, dtype=torch.float64) * 5
    scaled_out = sae(s * x) / s
    scaled_code = sae.encode(s * x)
    fold_input_scale(sae, s)
    torch.testing.assert_close(sae(x), scaled_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sae.encode(x), scaled_code, rtol=1e-12, atol=1e-12)


def test_training_scales_inputs_and_returns_raw_space_sae():
    data = synthetic(4000, 16, 32, active=3, seed=2).x * 40  # far from unit norm on purpose
    s = estimate_input_scale(data)
    centred = data.double() - data.double().mean(0)
    assert abs(float((s * centred).pow(2).sum(-1).mean()) - 1) < 1e-9
    sae = fastsae.TopKSAE(16, 64, 4)
    result = train(sae, data, steps=60, batch_size=256, progress=False)
    assert abs(result.input_scale - estimate_input_scale(data[:16384])) < 1e-6 * result.input_scale
    ev = evaluate(sae, data[:2000])
    assert ev["fvu"] < 0.9  # works on raw activations (unfolded it would be ~1600x off)
    assert math.isclose(result.final["fvu"], ev["fvu"], rel_tol=0.5)
    with pytest.raises(FloatingPointError, match="NaN"):
        estimate_input_scale(torch.tensor([[1.0, float("nan")]]))


def test_b_dec_starts_at_the_geometric_median():
    pts = torch.randn(500, 4, dtype=torch.float64) + torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    pts[:20] += 1000  # outliers move the mean, barely the median
    gm = geometric_median(pts)
    assert (gm - torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)).norm() < 0.3
    grad = ((gm - pts) / (gm - pts).norm(dim=1, keepdim=True)).sum(0)
    assert grad.norm() < 1e-2 * pts.shape[0]  # first-order optimality
    data = torch.randn(3000, 6) + 5
    sae = fastsae.ReLUSAE(6, 12)
    train(sae, data, steps=1, batch_size=8, lr=1e-12, progress=False)  # one negligible step
    s = estimate_input_scale(data)
    # b_dec was set in the scaled space, then divided by s when folding: back in data units
    torch.testing.assert_close(sae.b_dec.detach(), geometric_median(data.double() * s).float() / s,
                               rtol=1e-4, atol=1e-4)


# -- checkpoints, resume, NaN --------------------------------------------------------------------------


def _make(arch):
    torch.manual_seed(11)
    if arch == "topk":
        return fastsae.TopKSAE(12, 40, 3)
    return fastsae.JumpReLUSAE(12, 40, sparsity_coefficient=0.05)


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_resume_follows_the_uninterrupted_trajectory(tmp_path, arch):
    data = synthetic(3000, 12, 24, active=2, seed=3).x
    kw = dict(steps=14, batch_size=64, log_every=1, progress=False, dead_after=200, seed=5)
    full = train(_make(arch), data, checkpoint_dir=tmp_path / "a", checkpoint_every=5, **kw)

    class Interrupt(Exception):
        pass

    def stop_at_7(record):
        if record["step"] == 7:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(_make(arch), data, checkpoint_dir=tmp_path / "b", checkpoint_every=5, callback=stop_at_7, **kw)
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT)["step"] == 5
    fresh = _make(arch)
    with torch.no_grad():  # resume must not depend on the new module's initial weights
        for p in fresh.parameters():
            p.add_(1.0)
    resumed = train(fresh, data, checkpoint_dir=tmp_path / "b", checkpoint_every=5, resume=True, **kw)
    keys = ("step", "tokens", "loss", "mse", "fvu", "l0", "aux", "dead", "lr")
    assert [[r[k] for k in keys] for r in resumed.metrics] == [[r[k] for k in keys] for r in full.metrics]
    for (n, a), (_, b) in zip(full.sae.state_dict().items(), resumed.sae.state_dict().items()):
        assert torch.equal(a, b), n
    lines = [json.loads(s) for s in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 15))  # records after the checkpoint were not duplicated
    assert [r["loss"] for r in lines] == [r["loss"] for r in full.metrics]


def test_checkpoints_are_atomic_and_complete(tmp_path):
    data = torch.randn(500, 8)
    sae = fastsae.TopKSAE(8, 16, 2)
    train(sae, data, steps=6, batch_size=32, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT, "metrics.jsonl"]  # no temp files
    ck = load_checkpoint(tmp_path / CHECKPOINT)
    assert ck["step"] == 6 and ck["tokens"] == 6 * 32
    for key in ("optimizer", "rng", "scale", "config", "data", "metrics", "counters"):
        assert key in ck, key
    for name in ("module.W_enc", "module.W_dec", "optimizer.0.exp_avg", "rng.torch", "train.since_fired"):
        assert name in ck["tensors"], name
    assert ck["config"]["sae"]["architecture"] == "topk" and ck["optimizer"]["state"]
    # resuming a finished run does no more steps and returns the same folded SAE
    again = train(fastsae.TopKSAE(8, 16, 2), data, steps=6, batch_size=32, checkpoint_dir=tmp_path,
                  resume=True, progress=False)
    assert again.steps == 6 and torch.equal(again.sae.W_dec, sae.W_dec)
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint.safetensors"):
        train(fastsae.TopKSAE(8, 16, 2), data, steps=6, batch_size=32, checkpoint_dir=tmp_path, resume=True,
              progress=False)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        train(sae, data, steps=2, resume=True, progress=False)


def test_nan_input_is_reported_not_trained_on(tmp_path):
    good = [torch.randn(32, 8) for _ in range(5)]
    bad = torch.randn(32, 8)
    bad[3, 2] = float("nan")
    sae = fastsae.JumpReLUSAE(8, 16)
    with pytest.raises(FloatingPointError, match="step 5: the input batch contains NaN.*after 4 steps"):
        train(sae, good + [bad] + good, steps=10, batch_size=32, checkpoint_dir=tmp_path, checkpoint_every=2,
              input_scale=0.5, init_b_dec=False, progress=False)
    ck = load_checkpoint(tmp_path / CHECKPOINT)  # the check is read before every checkpoint: step 6 never saved
    assert ck["step"] == 4 and all(bool(torch.isfinite(v).all()) for v in ck["tensors"].values()
                                   if v.is_floating_point())
    # NaN in the sample used for the input scale is reported before any step
    with pytest.raises(FloatingPointError, match="NaN"):
        train(fastsae.TopKSAE(8, 16, 2), torch.cat(good + [bad]), steps=2, batch_size=32, progress=False)


# -- metrics, dead latents, schedules ------------------------------------------------------------------


def test_metrics_records_and_json_lines(tmp_path):
    data = synthetic(2000, 8, 16, active=2, seed=1).x
    sae = fastsae.TopKSAE(8, 32, 2)
    r = train(sae, data, steps=10, batch_size=50, log_every=3, metrics_path=tmp_path / "m.jsonl", progress=False)
    assert [m["step"] for m in r.metrics] == [3, 6, 9, 10]
    lines = [json.loads(s) for s in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert lines == r.metrics
    for key in ("loss", "mse", "fvu", "l0", "dead", "tokens_per_s", "lr", "tokens", "aux"):
        assert key in r.final
    assert r.final["l0"] == pytest.approx(2.0) and r.final["tokens"] == 500 and r.final["tokens_per_s"] > 0


def test_dead_latents_are_tracked_and_fed_to_auxk():
    data = torch.randn(2000, 8)
    sae = fastsae.TopKSAE(8, 32, 2)
    with torch.no_grad():
        sae.b_enc[:8] = -1e3  # these latents can never fire
    r = train(sae, data, steps=12, batch_size=50, log_every=4, dead_after=100, progress=False, init_b_dec=False,
              lr=1e-6)
    assert r.metrics[0]["dead"] == pytest.approx(8 / 32) or r.metrics[0]["dead"] >= 8 / 32
    assert r.metrics[-1]["dead"] >= 8 / 32
    assert r.metrics[-1]["aux"] > 0  # AuxK is active once latents are dead


def test_dead_window_is_10m_tokens_or_a_sixth_of_a_shorter_run():
    """The default window: AuxK switches on in a run shorter than 10M tokens too (with 10M it never did), and an
    explicit ``dead_after`` on the module (or to ``train``) wins."""
    assert default_dead_after(3000 * 1024) == 512_000 and default_dead_after(10**9) == 10_000_000
    data = torch.randn(2000, 8)

    def run(**kw):
        sae = fastsae.TopKSAE(8, 32, 2, **kw)
        with torch.no_grad():
            sae.b_enc[:8] = -1e3  # these latents can never fire
        return train(sae, data, steps=12, batch_size=50, log_every=4, progress=False, init_b_dec=False, lr=1e-6,
                     resample_every=0)

    short = run()  # 600 tokens: dead after 100, from the third step on
    assert short.final["dead"] >= 8 / 32 and short.final["aux"] > 0
    long = run(dead_after=10_000_000)
    assert long.final["dead"] == 0 and long.final["aux"] == 0


def test_lr_and_sparsity_schedules():
    steps, warm, decay = 100, 10, 20
    f = [lr_factor(s, steps, warm, decay) for s in range(steps)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[50] == 1.0
    assert f[80] == 1.0 and f[90] == pytest.approx(0.5) and f[99] == pytest.approx(0.05)
    assert all(a <= b for a, b in zip(f[:10], f[1:10]))
    assert sparsity_factor(0, 10) == pytest.approx(0.1) and sparsity_factor(50, 10) == 1.0
    assert sparsity_factor(0, 0) == 1.0
    data = torch.randn(400, 6)
    sae = fastsae.JumpReLUSAE(6, 12, sparsity_coefficient=0.2)
    r = train(sae, data, steps=10, batch_size=40, log_every=1, sparsity_warmup_steps=5, lr_warmup_steps=4,
              lr_decay_steps=0, lr=1e-3, progress=False)
    assert [m["sparsity_coefficient"] for m in r.metrics][:6] == pytest.approx([0.04, 0.08, 0.12, 0.16, 0.2, 0.2])
    assert [m["lr"] for m in r.metrics][:5] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_argument_checks():
    sae = fastsae.TopKSAE(8, 16, 2)
    with pytest.raises(ValueError, match="steps"):
        train(sae, torch.randn(10, 8), steps=0)
    with pytest.raises(ValueError, match="d_in=5"):
        train(sae, torch.randn(10, 5), steps=1, progress=False)
    with pytest.raises(TypeError, match="sae"):
        train(copy.deepcopy, torch.randn(10, 8), steps=1)
