"""fastsae.synthetic: each structure knob of the realistic ground truth does what it says, and the
ground-truth metrics score known answers exactly."""
import math

import pytest
import torch

import fastsae
from fastsae.data import realistic, synthetic
from fastsae.synthetic import REALISTIC, match_metrics


def test_clean_defaults_are_the_toy_problem_unchanged():
    s = synthetic(3000, 16, 40, active=3, seed=5)
    assert s.mean is None and s.hierarchy is None and s.noise_std == 0
    codes = s.sample(2000, 1, return_codes=True)[1]
    nz = codes[codes > 0]
    assert float(nz.min()) >= 0.5 and float(nz.max()) <= 1.5  # uniform magnitudes in [lo, hi]
    assert abs(s.true_l0 - 3) < 1e-4


def test_mean_offset_is_the_requested_multiple_of_the_signal():
    s = synthetic(20000, 32, 128, active=4, seed=1, mean_offset=3.0)
    centred = s.x - s.mean
    rms = float(centred.pow(2).sum(1).mean().sqrt())
    assert s.mean.norm() == pytest.approx(3.0 * rms, rel=0.05)
    assert (s.x.mean(0) - s.mean).norm() < 0.1 * s.mean.norm()


def test_frequencies_follow_the_zipf_law_asked_for():
    s = synthetic(200_000, 16, 64, active=4, seed=2, frequency_decay=1.0)
    codes = s.sample(100_000, 3, return_codes=True)[1]
    freq = (codes > 0).float().mean(0)
    ratio = float(freq[0] / freq[15])  # p_j ∝ (j+1)^-1: feature 0 fires 16× as often as feature 15
    assert 12 < ratio < 21, ratio
    assert abs(float(freq.sum()) - 4) < 0.1


def test_heavy_tailed_magnitudes_are_log_normal_around_each_features_typical_size():
    s = synthetic(10, 16, 32, active=4, seed=3, magnitude_tail=0.5)
    codes = s.sample(100_000, 4, return_codes=True)[1]
    logs = []
    for j in range(4):
        c = codes[:, j][codes[:, j] > 0]
        assert float(c.median()) == pytest.approx(float(s.typical_magnitude[j]), rel=0.08)
        logs.append(torch.log(c).std())
    assert float(torch.stack(logs).mean()) == pytest.approx(0.5, rel=0.1)
    # heavy tail: the largest activations are several times the typical one
    assert float(codes.max()) > 4 * float(s.typical_magnitude.max())


def test_correlated_features_co_occur_more_than_independent_ones():
    s = synthetic(10, 16, 192, active=16, seed=4, correlation=0.8)  # 3 shared factors (one per 64 features)
    fires = s.sample(50_000, 5, return_codes=True)[1] > 0
    member = s.loadings.abs().argmax(1)
    p = fires.float().mean(0)
    joint = (fires.float().t() @ fires.float()) / fires.shape[0]
    independent = p[:, None] * p[None, :]
    same = member[:, None] == member[None, :]
    off = ~torch.eye(192, dtype=torch.bool)
    lift_same = float((joint / independent)[same & off].mean())
    lift_other = float((joint / independent)[~same].mean())
    assert lift_same > 2.0 and abs(lift_other - 1) < 0.15, (lift_same, lift_other)
    assert float((p - s.probabilities).abs().max()) < 0.02  # the copula keeps each marginal


def test_hierarchy_children_fire_only_with_their_parent_and_exclude_their_siblings():
    s = synthetic(10, 32, 60, active=6, seed=6, hierarchy=0.3)
    parent = s.hierarchy.parent
    children = (parent >= 0).nonzero().squeeze(1)
    assert children.numel() == 18
    fires = s.sample(40_000, 7, return_codes=True)[1] > 0
    assert not (fires[:, children] & ~fires[:, parent[children]]).any()  # never without the parent
    for p in parent[children].unique().tolist():
        sib = children[parent[children] == p]
        assert int(fires[:, sib].sum(1).max()) <= 1  # at most one child of a parent at a time
    freq = fires.float().mean(0)
    assert torch.allclose(freq[children], s.probabilities[children], atol=0.01)


def test_noise_is_relative_to_the_signal():
    s = synthetic(20000, 64, 128, active=4, seed=8, noise=0.1)
    clean = synthetic(20000, 64, 128, active=4, seed=8)
    rms = float(clean.x.pow(2).sum(1).mean().sqrt())
    assert s.noise_std * math.sqrt(64) == pytest.approx(0.1 * rms, rel=0.05)


def test_realistic_switches_on_every_knob():
    r = realistic(2000, 32, 128, seed=0)
    for key, value in REALISTIC.items():
        assert r.settings[key] == value
    assert r.mean is not None and r.hierarchy is not None and r.loadings is not None and r.noise_std > 0
    with pytest.raises(ValueError, match="correlation"):
        realistic(100, 8, 16, correlation=1.5)
    with pytest.raises(ValueError, match="hierarchy"):
        synthetic(100, 8, 16, hierarchy=-0.1)


def test_match_metrics_score_known_answers():
    torch.manual_seed(0)
    F = torch.nn.functional.normalize(torch.randn(20, 16), dim=1)
    active = torch.rand(500, 20) < 0.2
    perfect = match_metrics(F[torch.randperm(20)] * 3, F, None, None)
    assert perfect["recovery"] == 1.0 and perfect["mcc"] == pytest.approx(1.0) and perfect["uniqueness"] == 1.0
    order = torch.randperm(20)
    W = torch.cat([F[order], torch.randn(5, 16)])
    fired = torch.zeros(500, 25, dtype=torch.bool)
    fired[:, :20] = active[:, order]
    m = match_metrics(W, F, fired, active)
    assert m["precision"] == pytest.approx(1.0) and m["recall"] == pytest.approx(1.0) and m["f1"] == pytest.approx(1.0)
    # two latents on one feature: uniqueness drops, recovery does not
    dup = match_metrics(torch.cat([F, F[:4] + 0.01 * torch.randn(4, 16)]), F)
    assert dup["recovery"] == 1.0 and dup["uniqueness"] == pytest.approx(20 / 24)
    # a latent that fires on half of its feature's occurrences has recall 1/2 for that feature
    half = fired.clone()
    rows = active[:, order[0]].nonzero().squeeze(1)
    half[rows[: rows.numel() // 2], 0] = False
    m = match_metrics(W, F, half, active)
    assert m["recall"] == pytest.approx(1 - 0.5 / 20, abs=0.01) and m["precision"] == pytest.approx(1.0)


def test_evaluate_scores_an_sae_holding_the_true_dictionary():
    s = synthetic(10, 16, 12, active=2, seed=9)  # 12 features in 16 dims: a linear encoder can be exact
    sae = fastsae.ReLUSAE(16, 12, dtype=torch.float64)
    with torch.no_grad():
        sae.W_dec.copy_(s.features.double())
        sae.W_enc.copy_(torch.linalg.pinv(s.features.double()))
        sae.b_enc.fill_(-1e-4)  # the samples are float32: rounding leaves ~1e-7 on absent features
        sae.b_dec.zero_()
    m = s.evaluate(sae, n=4000)
    assert m["recovery"] == 1.0 and m["mcc"] == pytest.approx(1.0)
    assert m["fvu"] < 1e-6 and m["f1"] == pytest.approx(1.0) and m["shrinkage"] == pytest.approx(1.0, abs=1e-3)
    assert m["l0"] == pytest.approx(s.true_l0, rel=0.1) and m["dead"] == 0.0
