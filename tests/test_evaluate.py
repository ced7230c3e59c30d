"""Evaluation by splicing an SAE into tiny randomly-initialised transformers models (no download)."""
import json

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import fastsae  # noqa: E402
from fastsae import activations as act  # noqa: E402
from fastsae.cli import main  # noqa: E402
from fastsae.evaluate import evaluate  # noqa: E402
from test_activations import MODELS, _one_thread, make_texts, tiny_bert, tiny_gpt2  # noqa: E402,F401


class Identity(nn.Module):
    def forward(self, x):
        return x


class Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


KW = dict(context_length=16, batch_size=4, progress=False)


def test_identity_splice_changes_nothing_causal():
    model, tok = tiny_gpt2()
    m = evaluate(Identity(), model, "transformer.h.1", make_texts(), tokenizer=tok, **KW)
    assert m["kind"] == "causal_lm" and m["n_tokens"] > 100
    assert m["fvu"] == 0 and m["cosine_x_xhat"] == pytest.approx(1)
    assert m["ce_spliced"] == pytest.approx(m["ce_clean"], abs=1e-6)
    assert abs(m["kl_spliced"]) < 1e-6
    assert m["ce_zero_ablated"] != pytest.approx(m["ce_clean"], abs=1e-3)
    assert m["kl_zero_ablated"] > 1e-4
    assert m["ce_loss_recovered"] == pytest.approx(1, abs=1e-5)
    z = evaluate(Zero(), model, "transformer.h.1", make_texts(), tokenizer=tok, **KW)
    assert z["ce_spliced"] == pytest.approx(z["ce_zero_ablated"], abs=1e-6)
    assert z["ce_loss_recovered"] == pytest.approx(0, abs=1e-5) and z["fvu"] > 0.99


def test_identity_splice_changes_nothing_encoder():
    model, tok = tiny_bert()
    m = evaluate(Identity(), model, "encoder.layer.1", make_texts(), tokenizer=tok, drop_special=True, **KW)
    assert m["kind"] == "encoder"
    assert m["final_hidden_cosine"] == pytest.approx(1, abs=1e-6)
    assert m["embedding_cosine"] == pytest.approx(1, abs=1e-6)
    assert m["embedding_cosine_zero_ablated"] < 0.999
    assert m["embedding_cosine_recovered"] == pytest.approx(1, abs=1e-5)
    assert "l0" not in m and m["latents"] == []


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_metrics_match_harvested_activations(tmp_path, kind):
    build, hook = MODELS[kind]
    model, tok = build()
    texts = make_texts(30)
    sae = fastsae.TopKSAE(32, 48, 5)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
    m = evaluate(sae, model, hook, texts, tokenizer=tok, out=tmp_path / "eval", max_tokens=300, n_latents=6,
                 top_n=3, dense_threshold=0.2, **KW)
    act.harvest(model, hook, texts, tmp_path / "acts", tokenizer=tok, max_tokens=300, context_length=16,
                batch_size=4, progress=False)
    x = torch.from_numpy(np.concatenate(act.open_shards(tmp_path / "acts"))).float()
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae(x)
    assert m["n_tokens"] == 300
    fvu = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert m["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert m["l0"] == pytest.approx(float((f != 0).sum(1).float().mean()), rel=1e-6)
    fired = (f != 0).sum(0)
    assert m["dead_fraction"] == pytest.approx(float((fired == 0).float().mean()))
    assert m["dense_fraction"] == pytest.approx(float((fired / 300 > 0.2).float().mean()))
    assert 0 < m["dead_fraction"] + m["dense_fraction"] < 1  # both computed on a nontrivial mix
    for lat in m["latents"]:
        col = f[:, lat["latent"]]
        assert lat["max"] == pytest.approx(float(col.max()), rel=1e-5)
        assert lat["frequency"] == pytest.approx(float((col != 0).float().mean()))
        acts = [v for v, _ in lat["contexts"]]
        assert acts == sorted(acts, reverse=True)
        assert acts == pytest.approx(col.topk(len(acts)).values.tolist(), rel=1e-5)
        assert all("<mark>" in c for _, c in lat["contexts"])
    assert len(m["latents"]) == 6
    report = (tmp_path / "eval" / "report.html").read_text()
    assert report.startswith("<!doctype html>") and "<mark>" in report and "data:image/png;base64," in report
    assert (tmp_path / "eval" / "density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["fvu"] == pytest.approx(m["fvu"]) and len(saved["latents"]) == 6


def test_splice_touches_only_kept_positions():
    model, tok = tiny_bert()
    # Dropping special tokens: [CLS]/[SEP] keep their clean activations, so zeroing the rest differs
    # from zeroing everything.
    a = evaluate(Zero(), model, "encoder.layer.0", make_texts(), tokenizer=tok, drop_special=True, **KW)
    b = evaluate(Zero(), model, "encoder.layer.0", make_texts(), tokenizer=tok, drop_special=False, **KW)
    assert a["embedding_cosine"] == pytest.approx(a["embedding_cosine_zero_ablated"])
    assert a["n_tokens"] < b["n_tokens"]
    assert a["final_hidden_cosine"] != pytest.approx(b["final_hidden_cosine"], abs=1e-4)


def test_errors_name_the_argument(tmp_path):
    model, tok = tiny_gpt2()
    with pytest.raises(ValueError, match="hook 'transformer.h.7'"):
        evaluate(Identity(), model, "transformer.h.7", make_texts(), tokenizer=tok, **KW)
    with pytest.raises(FileNotFoundError, match="model: "):
        evaluate(Identity(), str(tmp_path / "no_model"), "h.0", make_texts(), **KW)
    with pytest.raises(ValueError, match="text: .*no tokens"):
        evaluate(Identity(), model, "h.0", ["", " "], tokenizer=tok, **KW)
    with pytest.raises(ValueError, match="text: .*no tokens after skip_tokens"):
        evaluate(Identity(), model, "h.0", make_texts(), tokenizer=tok, skip_tokens=10**6, **KW)
    with pytest.raises(FileNotFoundError, match="sae: "):
        evaluate(str(tmp_path / "no_sae"), model, "h.0", make_texts(), tokenizer=tok, **KW)


def test_cli_eval(tmp_path, capsys):
    model, tok = tiny_bert()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    fastsae.JumpReLUSAE(32, 40, threshold_init=0.05).save(tmp_path / "sae")
    (tmp_path / "t.txt").write_text("\n".join(make_texts()))
    argv = ["eval", "--sae", str(tmp_path / "sae"), "--model", str(tmp_path / "model"), "--hook", "encoder.layer.1",
            "--text", str(tmp_path / "t.txt"), "--context-length", "16", "--max-tokens", "120", "--latents", "3",
            "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fvu" in out and "embedding_cosine" in out and "n_tokens" in out
    m = json.loads((tmp_path / "sae" / "eval" / "metrics.json").read_text())
    assert m["n_tokens"] == 120 and m["kind"] == "encoder" and 0 <= m["dead_fraction"] <= 1
    assert (tmp_path / "sae" / "eval" / "report.html").is_file()
