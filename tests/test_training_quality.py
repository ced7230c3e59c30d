"""Issue 18: every architecture trains to a good SAE with its defaults, judged by what it recovers of a known
dictionary (features matched at cosine > 0.9, MCC), its held-out FVU and its L0 — not by the loss alone.

Small versions of the built-in job (32 dims, 64 true features, 1,500 steps of 512) so the suite stays fast; the
full-size numbers are in benchmarks/results/*/quality.md (``python -m benchmarks quality``)."""
import pytest
import torch

import fastsae
from fastsae.data import realistic, synthetic
from fastsae.training import train

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

D_IN, N_FEATURES, D_SAE, STEPS, BATCH = 32, 64, 128, 1500, 512


@pytest.fixture(scope="module")
def clean():
    return synthetic(100_000, D_IN, N_FEATURES, active=3, seed=0)


@pytest.fixture(scope="module")
def real():
    return realistic(100_000, D_IN, N_FEATURES, active=3, seed=0)


def _fit(sae, data):
    torch.manual_seed(0)
    train(sae, data, steps=STEPS, batch_size=BATCH, progress=False)
    return data.evaluate(sae, n=8192)


@pytest.mark.parametrize("arch", ["jumprelu", "gated"])
def test_defaults_recover_the_clean_dictionary(clean, arch):
    torch.manual_seed(0)
    m = _fit(fastsae.sae.ARCHITECTURES[arch](D_IN, D_SAE), clean)
    assert m["recovery"] >= 0.95 and m["fvu"] <= 0.15, m
    assert clean.true_l0 / 2 <= m["l0"] <= 2 * clean.true_l0, m
    assert m["uniqueness"] >= 0.9, m


def test_topk_defaults_recover_the_clean_dictionary(clean):
    torch.manual_seed(0)
    m = _fit(fastsae.TopKSAE(D_IN, D_SAE, 6), clean)
    assert m["recovery"] >= 0.95 and m["fvu"] <= 0.15, m


@pytest.fixture(scope="module")
def topk_real(real):
    """TopK at the true L0 on the realistic data (the yardstick JumpReLU is held to), trained once."""
    torch.manual_seed(0)
    sae = fastsae.TopKSAE(D_IN, D_SAE, round(real.true_l0))
    return _fit(sae, real)


def test_jumprelu_target_l0_on_realistic_data(real, topk_real):
    """Mean offset, Zipf frequencies, heavy tails, correlated and hierarchical features, noise: JumpReLU asked for
    the true L0 reaches it (within 10% by the end of this short run: the quadratic loss at λ = 1 with θ at 5× the
    learning rate; before, λ = 0.02 and 2× ended 50% above it on the quality benchmark), and is at least as good as
    TopK at that L0. Measured: L0 3.21 for a target of 3.16, recovery 0.89 / MCC 0.94 / FVU 0.077 (TopK, k = 3:
    0.89 / 0.96 / 0.141)."""
    torch.manual_seed(0)
    target = round(real.true_l0, 2)
    m = _fit(fastsae.JumpReLUSAE(D_IN, D_SAE, target_l0=target), real)
    assert m["l0"] == pytest.approx(target, rel=0.1), m
    assert m["recovery"] >= topk_real["recovery"] - 0.02 and m["fvu"] <= topk_real["fvu"], (m, topk_real)
    assert m["mcc"] >= 0.9 and m["uniqueness"] >= 0.9, m


def test_jumprelu_reaches_a_target_above_the_true_l0(real):
    """The L0 a user asks for is the L0 they get, also where the data would rather be sparser (2× the true L0:
    the old defaults ended 75% above it on the quality benchmark). Measured: 6.42 for 6.32, FVU 0.048."""
    torch.manual_seed(0)
    target = round(2 * real.true_l0, 2)
    m = _fit(fastsae.JumpReLUSAE(D_IN, D_SAE, target_l0=target), real)
    assert m["l0"] == pytest.approx(target, rel=0.1) and m["fvu"] <= 0.08, m


def test_topk_at_the_true_l0_on_realistic_data(topk_real):
    m = topk_real
    assert m["recovery"] >= 0.8 and m["mcc"] >= 0.9 and m["fvu"] <= 0.2, m


def test_matryoshka_prefixes_are_dictionaries_on_realistic_data(real):
    """Matryoshka BatchTopK at the true L0: its first 16 latents alone reconstruct the data (measured FVU 0.57 with
    the default width-weighted prefix losses, 0.44 unweighted; BatchTopK's first 16, an arbitrary subset, 0.77),
    at a small cost in full-width quality (measured FVU 0.082 vs 0.076, MCC 0.93 vs 0.96, recovery 0.81 vs 0.92;
    unweighted: 0.099, 0.90, 0.80)."""
    held = real.sample(8192, 12345)

    def prefix_fvu(sae, width):
        with torch.no_grad():
            f = sae.encode(held)
            f[:, width:] = 0
            return float((sae.decode(f) - held).pow(2).sum() / (held - held.mean(0)).pow(2).sum())

    torch.manual_seed(0)
    mat = fastsae.MatryoshkaBatchTopKSAE(D_IN, D_SAE, 3, widths=[16, 64])
    m = _fit(mat, real)
    torch.manual_seed(0)
    flat = fastsae.BatchTopKSAE(D_IN, D_SAE, 3)
    b = _fit(flat, real)
    assert m["fvu"] <= 0.12 and m["mcc"] >= 0.85 and m["recovery"] >= 0.7 and abs(m["l0"] - 3) < 0.3, m
    assert prefix_fvu(mat, 16) <= 0.65 and prefix_fvu(mat, 16) <= 0.8 * prefix_fvu(flat, 16), (m, b)


def test_jumprelu_auxk_on_the_quality_benchmark_job():
    """The quality benchmark's realistic point at the true L0 (64 dims, 256 features, d_sae 512, 1,000 × 1,024,
    ``target_l0`` = 4.28), seed 0, the benchmark's own code: JumpReLU with its AuxK (each row's d_in // 16 = 4
    largest quiet latents fit the residual off the firing latents' span) recovers 94.9% of the true features;
    without it (``k_aux=0``) 88.3% (five seeds: 92.5% against 86.7% mean, ahead on every seed), TopK at k = 4
    83.6%. Fails if the AuxK stops training the latents it should."""
    from fastsae.bench import quality as Q

    cfg = Q.QUALITY
    data = Q.make_data("realistic", cfg)
    target = round(float(data.true_l0), 2)
    m = Q.fastsae_point(fastsae.JumpReLUSAE, "target_l0", target, data, cfg, "jumprelu")
    assert m["recovery"] >= 0.91 and m["l0"] == pytest.approx(target, rel=0.1) and m["fvu"] <= 0.13, m


def test_matryoshka_defaults_on_the_quality_benchmark_job():
    """The quality benchmark's realistic job at the true L0 (64 dims, 256 features, d_sae 512, 1,000 × 1,024,
    k = 4), seed 0: Matryoshka with its defaults (``nested_widths``, prefix losses weighted by width) recovers
    78.1% of the true features; unweighted prefix losses (SAELens's) 62.1%, weights √(width / d_sae) 73.4%, no
    prefix losses (BatchTopK) 80.1%. Fails if the prefix weighting regresses to either."""
    from fastsae.bench import quality as Q

    cfg = Q.QUALITY
    data = Q.make_data("realistic", cfg)
    torch.manual_seed(0)
    sae = fastsae.MatryoshkaBatchTopKSAE(cfg.d_in, cfg.d_sae, 4,
                                         widths=fastsae.MatryoshkaBatchTopKSAE.nested_widths(cfg.d_sae))
    train(sae, data, steps=cfg.steps, batch_size=cfg.batch_size, seed=0, progress=False)
    m = data.evaluate(sae, n=cfg.n_eval)
    assert m["recovery"] >= 0.75 and m["mcc"] >= 0.9 and m["fvu"] <= 0.15, m


# -- ReLU and BatchTopK with their defaults (fit_encoder_scale at init, λ in units of the centred input scale,
#    BatchTopK's TopK warm-up); on the clean data k = 2 × the true L0, as on the CLI job (k = 8, true L0 = 4)


def test_relu_defaults_recover_the_clean_dictionary(clean):
    """ReLU's L1 penalty shrinks every activation by ~λ/2; ``fastsae.train`` refits the magnitudes at the end
    (``ReLUSAE.fit_magnitudes``): FVU 0.151 without the refit, 0.104 with it on this run."""
    torch.manual_seed(0)
    m = _fit(fastsae.ReLUSAE(D_IN, D_SAE), clean)
    assert m["recovery"] >= 0.95 and m["fvu"] <= 0.13, m
    assert clean.true_l0 / 2 <= m["l0"] <= 2 * clean.true_l0, m
    assert m["uniqueness"] >= 0.9, m


def test_batchtopk_defaults_recover_the_clean_dictionary(clean):
    torch.manual_seed(0)
    sae = fastsae.BatchTopKSAE(D_IN, D_SAE, 2 * round(clean.true_l0))
    m = _fit(sae, clean)
    assert m["recovery"] >= 0.95 and m["fvu"] <= 0.15, m
    assert m["l0"] == pytest.approx(sae.k, rel=0.1), m  # the calibrated inference threshold


@pytest.mark.parametrize("arch", ["gated", "relu"])
def test_gated_and_relu_reach_the_asked_l0(clean, arch):
    """target_l0: λ becomes the state of the log-λ controller (fastsae/sparsity.py), starting at the default."""
    torch.manual_seed(0)
    target = 2 * round(clean.true_l0)
    m = _fit(fastsae.sae.ARCHITECTURES[arch](D_IN, D_SAE, target_l0=target), clean)
    assert m["l0"] == pytest.approx(target, rel=0.25), m
    assert m["recovery"] >= 0.9, m


@pytest.mark.parametrize("arch", ["gated", "relu", "batchtopk"])
def test_defaults_on_realistic_data(real, arch):
    torch.manual_seed(0)
    cls = fastsae.sae.ARCHITECTURES[arch]
    sae = cls(D_IN, D_SAE, round(real.true_l0)) if arch == "batchtopk" else cls(D_IN, D_SAE)
    m = _fit(sae, real)
    # measured: recovery 0.98 / 0.94 / 0.92, MCC 0.98 / 0.98 / 0.96, FVU 0.11 / 0.13 / 0.08 (gated / relu / batchtopk)
    assert m["recovery"] >= 0.8 and m["mcc"] >= 0.9 and m["fvu"] <= 0.2, m
    assert m["l0"] <= 2 * real.true_l0, m


# -- ReLU and Gated with target_l0 at the true L0, at the quality benchmark's size (64 dims, 256 true features,
#    d_sae 512) on a shorter budget (600 steps of 512): the controller waits for controller_start, resampled
#    latents start at the live firing rate, 2x the width-rule learning rate (experiments/results/arch_defaults.md)

MID = dict(d_in=64, n_features=256, d_sae=512, steps=600, batch=512)


@pytest.fixture(scope="module")
def mid_clean():
    return synthetic(100_000, MID["d_in"], MID["n_features"], active=4, seed=0)


@pytest.fixture(scope="module")
def mid_real():
    return realistic(100_000, MID["d_in"], MID["n_features"], active=4, seed=0)


def _fit_mid(sae, data):
    torch.manual_seed(0)
    train(sae, data, steps=MID["steps"], batch_size=MID["batch"], progress=False)
    return data.evaluate(sae, n=8192)


def test_relu_target_l0_at_the_true_l0_does_not_collapse_on_clean_data(mid_clean):
    """The bug: a controller acting from step 0 chased the dense early L0, drove λ to where every activation
    shrank to nothing while the dictionary was random, and stayed in that collapsed code, which also has L0 4
    (before: recovery 0.07, FVU 0.95 here; 27% and FVU 0.91 in the quality benchmark). Measured now: 1.00, 0.33."""
    torch.manual_seed(0)
    m = _fit_mid(fastsae.ReLUSAE(MID["d_in"], MID["d_sae"], target_l0=4), mid_clean)
    assert m["recovery"] >= 0.95 and m["fvu"] <= 0.45, m
    assert m["l0"] == pytest.approx(4, rel=0.3), m


@pytest.mark.parametrize("arch", ["relu", "gated"])
def test_relu_and_gated_target_l0_at_the_true_l0_on_realistic_data(mid_real, arch):
    """Measured: recovery 0.70 / 0.74, MCC 0.89 / 0.88, FVU 0.26 / 0.16, L0 4.6 / 3.8 for a target of 4.3
    (relu / gated); before this change 0.42 / 0.43 (MCC 0.77 / 0.73). With the quality benchmark's 1M tokens:
    85.5% / 91.0% (TopK at k = 4: 84.0%)."""
    torch.manual_seed(0)
    target = round(mid_real.true_l0, 2)
    m = _fit_mid(fastsae.sae.ARCHITECTURES[arch](MID["d_in"], MID["d_sae"], target_l0=target), mid_real)
    assert m["recovery"] >= 0.6 and m["mcc"] >= 0.84 and m["uniqueness"] >= 0.85, m
    assert m["l0"] == pytest.approx(target, rel=0.25), m
