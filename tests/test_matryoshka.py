"""Matryoshka BatchTopK: forward and backward against a dense float64 oracle on every backend, computed without a
dense [B, d_sae] code, and trained on synthetic data: nested prefixes that reconstruct on their own."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastsae
from fastsae import reference as ref
from fastsae.dispatch import override_crossover
from fastsae.metrics import evaluate

from conftest import BACKENDS, assert_matches_oracle

pytestmark = pytest.mark.usefixtures("one_thread")
from_kept = ref.matryoshka_from_kept


def _oracle_weights(sae):
    """Each width's weight in the loss: w / d_sae under the default ``prefix_weights="width"`` (the full width: 1),
    1 for every width under ``"uniform"``, the given list (and 1 for the full width) otherwise."""
    if sae.prefix_weights == "width":
        return [w / sae.d_sae for w in sae.widths]
    if sae.prefix_weights == "uniform":
        return [1.0] * len(sae.widths)
    return list(sae.prefix_weights) + [1.0]


def _dense_oracle(sae, x, per_row=False):
    """The textbook formula: dense BatchTopK code f (``per_row``: each row's top k, the warm-up's), x̂_w =
    f[:, :w] @ W_dec[:w] + b_dec for every width, each width's mean squared error weighted."""
    x_in = x - sae.b_dec if sae.apply_b_dec_to_input else x
    pre = F.relu(x_in @ sae.W_enc + sae.b_enc)
    if per_row:
        mask = torch.zeros_like(pre, dtype=torch.bool).scatter(1, pre.detach().topk(sae.k, dim=1).indices, True)
    else:
        flat = pre.reshape(-1)
        keep = torch.topk(flat.detach(), x.shape[0] * sae.k).indices
        mask = torch.zeros_like(flat, dtype=torch.bool).index_fill(0, keep, True).reshape(pre.shape)
    f = pre * mask
    prefixes = [f[:, :w] @ sae.W_dec[:w] + sae.b_dec for w in sae.widths]
    return (sum(w * (p - x).pow(2).sum(-1).mean() for w, p in zip(_oracle_weights(sae), prefixes)),
            prefixes[-1])


def _module(backend, dtype=torch.float64, d_in=11, d_sae=37, k=3, widths=(5, 16), **kw):
    torch.manual_seed(1)
    sae = fastsae.MatryoshkaBatchTopKSAE(d_in, d_sae, k, widths=list(widths), backend=backend, dtype=dtype, **kw)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return sae


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("centred", [True, False])
@pytest.mark.parametrize("prefix_weights", ["width", "uniform", [0.5, 2.0]])
@pytest.mark.parametrize("per_row", [False, True])
def test_forward_and_backward_match_dense_float64_oracle(backend, centred, prefix_weights, per_row, monkeypatch):
    """The fused backends decode the inner prefixes from their TopK / BatchTopK step's kept entries
    (``Backend.kept_sae``, forced here: at this size their crossover would pick the eager step); the eager one
    runs the reference."""
    sae = _module(backend, prefix_weights=prefix_weights)
    sae.apply_b_dec_to_input = centred
    sae.per_row_selection = per_row
    x = torch.randn(13, 11, dtype=torch.float64) * 1.7
    fused = []
    monkeypatch.setattr(ref, "matryoshka_from_kept", lambda *a: fused.append(1) or from_kept(*a))
    with override_crossover("sparse"):
        out = sae.training_forward(x)
    assert len(fused) == (backend != "eager")
    loss, x_hat = _dense_oracle(sae, x, per_row)
    assert_matches_oracle(sae, out, loss, x_hat, l0=3.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_matches_float64(backend):
    sae64 = _module(backend)
    sae32 = _module(backend, torch.float32)
    sae32.load_state_dict({k: v.float() for k, v in sae64.state_dict().items()})
    x = torch.randn(16, 11, dtype=torch.float64)
    a, b = sae64.training_forward(x), sae32.training_forward(x.float())
    torch.testing.assert_close(b.loss.double(), a.loss, rtol=1e-4, atol=1e-4)


def test_widths_are_validated_and_completed():
    assert fastsae.MatryoshkaBatchTopKSAE(4, 16, 2, widths=[4, 8]).widths == [4, 8, 16]
    assert fastsae.MatryoshkaBatchTopKSAE(4, 16, 2, widths=[16]).widths == [16]
    for bad in ([8, 4], [0, 16], [4, 17], [4, 4, 16], []):
        with pytest.raises(ValueError, match="widths"):
            fastsae.MatryoshkaBatchTopKSAE(4, 16, 2, widths=bad)
    with pytest.raises(TypeError, match="widths"):
        fastsae.MatryoshkaBatchTopKSAE(4, 16, 2, widths="4,8")


def test_prefix_weights_default_to_the_prefix_width():
    """Issue 18: each inner prefix's loss is weighted by its share of d_sae (the full width's MSE by 1), not 1 as
    in SAELens — the unweighted 1/16-width prefix's loss made its latents means of feature groups. A change of
    this default must come with the measurements in MatryoshkaBatchTopKSAE's docstring."""
    sae = fastsae.MatryoshkaBatchTopKSAE(4, 64, 2, widths=[4, 16])
    assert sae.prefix_weights == "width" and sae.inner_prefix_weights == [4 / 64, 16 / 64]
    assert fastsae.MatryoshkaBatchTopKSAE(4, 64, 2, widths=[4, 16], prefix_weights="uniform").inner_prefix_weights \
        == [1.0, 1.0]
    assert fastsae.MatryoshkaBatchTopKSAE(4, 64, 2, widths=[4, 16], prefix_weights=[0.3, 0]).inner_prefix_weights \
        == [0.3, 0.0]
    for bad in ("area", [1.0], [1.0, 2.0, 3.0], [-1.0, 1.0], [float("nan"), 1.0]):
        with pytest.raises(ValueError, match="prefix_weights"):
            fastsae.MatryoshkaBatchTopKSAE(4, 64, 2, widths=[4, 16], prefix_weights=bad)
    with pytest.raises(TypeError, match="prefix_weights"):
        fastsae.MatryoshkaBatchTopKSAE(4, 64, 2, widths=[4, 16], prefix_weights=0.5)
    # the loss itself: the inner prefixes' mean squared errors, weighted (reference.matryoshka_loss)
    prefixes, target = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    per = (prefixes - target).pow(2).sum(-1).mean(-1)
    torch.testing.assert_close(ref.matryoshka_loss(prefixes, target, sae.inner_prefix_weights),
                               per[0] * 4 / 64 + per[1] * 16 / 64)
    torch.testing.assert_close(ref.matryoshka_loss(prefixes, target), per[0] + per[1])


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel.append(t.numel())
        return out


def test_prefix_losses_never_build_a_dense_code():
    """After the encoder, every prefix reconstruction is a running sum over the kept entries: no tensor of
    B·d_sae elements (d_sae ≫ G·d_in here), forward or backward."""
    B, d_in, d_sae, k = 64, 8, 4096, 4
    W_dec = torch.randn(d_sae, d_in, requires_grad=True)
    pre = torch.relu(torch.randn(B, d_sae)).requires_grad_()
    values, rows, cols = ref.batchtopk_entries(pre, k)
    with _Shapes() as mode:
        prefixes = ref.prefix_reconstructions(values, rows, cols, W_dec, torch.zeros(d_in), [64, 512, d_sae], B)
        ref.matryoshka_loss(prefixes, torch.randn(B, d_in)).backward(inputs=[W_dec])
    assert max(mode.numel) < B * d_sae // 4


def test_saves_loads_and_exports(tmp_path):
    sae = _module("eager", torch.float32)
    sae.train()
    sae.training_forward(torch.randn(32, 11))
    sae.eval()
    sae.save(tmp_path / "own")
    back = fastsae.load(tmp_path / "own")
    assert type(back) is fastsae.MatryoshkaBatchTopKSAE and back.widths == sae.widths
    assert back.prefix_weights == sae.prefix_weights == "width"
    x = torch.randn(9, 11)
    torch.testing.assert_close(back(x), sae(x))
    sae.save(tmp_path / "sl", format="saelens")  # a JumpReLU SAE at inference, as SAELens saves its own
    torch.testing.assert_close(fastsae.load(tmp_path / "sl")(x), sae(x))


def _prefix_fvu(sae, x, width):
    f = sae.encode(x)
    f[:, width:] = 0
    return float((sae.decode(f) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


@pytest.mark.slow
def test_trains_nested_dictionaries_on_synthetic_data():
    """Frequent features land in the first widths: the 32-latent prefix of a Matryoshka SAE reconstructs held-out
    data far better than the first 32 latents of a BatchTopK SAE trained the same way, at no loss in full-width
    FVU, feature recovery or L0."""
    data = fastsae.data.synthetic(200_000, 32, 128, active=3.0, frequency_decay=1.0, seed=0)
    held = data.sample(8192, seed=1)
    results = {}
    for name, cls, kw in (("batchtopk", fastsae.BatchTopKSAE, {}),
                          ("matryoshka", fastsae.MatryoshkaBatchTopKSAE, {"widths": [32, 128]})):
        torch.manual_seed(0)
        sae = cls(32, 256, 3, dead_after=20_000, **kw)
        fastsae.train(sae, data, steps=1500, batch_size=512, progress=False)
        ev = evaluate(sae, held)
        with torch.no_grad():
            results[name] = dict(fvu=ev["fvu"], l0=ev["l0"], recovery=data.recovery(sae.W_dec),
                                 prefix32=_prefix_fvu(sae, held, 32))
    m, b = results["matryoshka"], results["batchtopk"]
    print(results)
    assert m["prefix32"] < 0.8 * b["prefix32"]
    assert m["fvu"] < b["fvu"] + 0.05 and m["fvu"] < 0.5
    assert 2.0 < m["l0"] < 4.0
    assert m["recovery"] > 0.5 * b["recovery"]


def test_topk_warmup_trains_the_prefixes_on_each_rows_top_k():
    """BatchTopK's warm-up (issue 18): during the first part of a run the prefix losses come from each row's k
    largest activations (what a TopK SAE keeps), and the inference threshold is not updated from that selection."""
    torch.manual_seed(0)
    sae = fastsae.MatryoshkaBatchTopKSAE(12, 40, 3, widths=[5, 20])
    assert sae.topk_warmup == pytest.approx(0.8)
    x = torch.randn(64, 12) * torch.linspace(0.2, 3.0, 64)[:, None]  # row norms vary: the batch top-k is uneven
    sae.train()
    sae.on_train_step(0, 30)
    out = ref.matryoshka_batchtopk_sae_forward(x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, 3, sae.widths,
                                               per_row=True)
    pre = F.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    f = torch.zeros_like(pre).index_put_((out.rows, out.cols), out.values)
    want = torch.zeros_like(pre).scatter_(1, pre.topk(3, dim=1).indices, pre.gather(1, pre.topk(3, dim=1).indices))
    assert torch.equal(f, want)
    r = sae.training_forward(x)
    assert float(r.l0) == 3.0 and float(sae.threshold) < 0  # per row: exactly k, no threshold estimate yet
    torch.testing.assert_close(r.x_hat, want @ sae.W_dec + sae.b_dec)
    sae.on_train_step(24, 30)  # 0.8 of the run
    r = sae.training_forward(x)
    assert float(sae.threshold) > 0 and not sae.per_row_selection  # the batch top-k from the switch on
