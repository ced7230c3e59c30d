"""Harvesting activations from tiny randomly-initialised transformers models built here (no download)."""
import json
import random

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import fastsae  # noqa: E402
from fastsae import activations as act  # noqa: E402
from fastsae.cli import main  # noqa: E402

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tiny models' 32-wide matmuls are slower with several threads spinning on a busy machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


WORDS = ("the cat sat on a mat and dog ran far away from big red house while small bird sang loud song "
         "in green tree near old river under blue sky").split()


def make_tokenizer(kind: str):
    """A word-level tokenizer: BERT-style ([CLS] x [SEP], [PAD]) or GPT-2-style (no template, no pad)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        vocab = {w: i for i, w in enumerate(specials + WORDS)}
        t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        t.pre_tokenizer = pre_tokenizers.Whitespace()
        t.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                         special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]")
    specials = ["<|endoftext|>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<unk>")


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    tok = make_tokenizer("bert")
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    return BertModel(cfg).eval(), tok


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = make_tokenizer("gpt2")
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=3, n_head=4, n_positions=64, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval(), tok


MODELS = {"bert": (tiny_bert, "encoder.layer.1"), "gpt2": (tiny_gpt2, "transformer.h.1")}


def make_texts(n=23, seed=0):
    rng = random.Random(seed)
    # Lengths from 1 word to more than one context, so packing, splitting and padding all happen.
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def load_all(out):
    m = act.read_manifest(out)
    return m, np.concatenate([np.load(out / s["file"], mmap_mode="r") for s in m["shards"]])


def direct_activations(model, tok, layer, contexts, drop_special):
    """Each context on its own, unpadded, through output_hidden_states: the hooked output computed directly."""
    template = act.tokenizer_template(tok)
    rows = []
    with torch.no_grad():
        for c in contexts:
            ids = torch.tensor([c])
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0]
            keep = torch.tensor([not (drop_special and t in template.special_ids) for t in c])
            rows.append(hs[keep])
    return torch.cat(rows).numpy()


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
@pytest.mark.parametrize("pack,drop_special", [(True, False), (False, True)])
def test_harvest_equals_hooked_output(tmp_path, kind, pack, drop_special):
    build, hook = MODELS[kind]
    model, tok = build()
    texts = make_texts()
    m = act.harvest(model, hook, texts, tmp_path, tokenizer=tok, context_length=16, batch_size=5,
                    pack=pack, drop_special=drop_special, shard_tokens=50, progress=False)
    _, data = load_all(tmp_path)
    contexts = list(act.iter_contexts(tok, texts, 16, pack=pack))
    want = direct_activations(model, tok, 1, contexts, drop_special)
    assert data.shape == want.shape == (m["n_tokens"], 32)
    np.testing.assert_allclose(data, want, rtol=1e-4, atol=1e-5)
    assert len(m["shards"]) > 1 and m["complete"]


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_padding_never_leaks(tmp_path, kind):
    build, hook = MODELS[kind]
    model, tok = build()
    template = act.tokenizer_template(tok)
    # A padding embedding 1e4 times larger than any other: a single leaked pad row would stand out.
    with torch.no_grad():
        model.get_input_embeddings().weight[template.pad_id] = 1e4
    texts = make_texts(seed=1)
    m = act.harvest(model, hook, texts, tmp_path, tokenizer=tok, context_length=16, batch_size=7, pack=False,
                    progress=False)
    _, data = load_all(tmp_path)
    n_special = len(template.prefix) + len(template.suffix)
    expected = 0
    for t in texts:  # unpacked: each document is split into contexts of 16 - n_special words
        n = len(t.split())
        expected += n + n_special * -(-n // (16 - n_special))
    assert m["n_tokens"] == data.shape[0] == expected
    if kind == "bert":  # GPT-2's pad id is its (real) end-of-text token, which never appears unpacked
        assert np.abs(data).max() < 100


def test_stop_early_equals_full_forward(tmp_path):
    model, tok = tiny_gpt2()
    texts = make_texts()
    a = act.harvest(model, "transformer.h.0", texts, tmp_path / "a", tokenizer=tok, context_length=16,
                    progress=False)
    b = act.harvest(model, "transformer.h.0", texts, tmp_path / "b", tokenizer=tok, context_length=16,
                    stop_early=False, progress=False)
    assert a["n_tokens"] == b["n_tokens"]
    np.testing.assert_array_equal(load_all(tmp_path / "a")[1], load_all(tmp_path / "b")[1])


def test_manifest_round_trip_and_max_tokens(tmp_path):
    model, tok = tiny_bert()
    m = act.harvest(model, "encoder.layer.2", make_texts(), tmp_path, tokenizer=tok, context_length=16,
                    batch_size=4, max_tokens=101, dtype="float16", shard_tokens=40, progress=False)
    back = act.read_manifest(tmp_path)
    assert back == json.loads(json.dumps(m))
    assert back["n_tokens"] == 101 and back["complete"] and back["d_in"] == 32 and back["dtype"] == "float16"
    assert back["hook"] == "encoder.layer.2" and back["context_length"] == 16
    assert back["text_source"] == "<list>" and back["model"]
    shards = act.open_shards(tmp_path)
    assert [s.shape[0] for s in shards] == [s["n_tokens"] for s in back["shards"]]
    assert all(s.dtype == np.float16 and s.shape[1] == 32 for s in shards)
    assert sum(s.shape[0] for s in shards) == 101
    sq = sum(float(np.square(s, dtype=np.float64).sum()) for s in shards)
    assert back["mean_sq_norm"] == pytest.approx(sq / 101)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporary files


def test_resumed_harvest_equals_uninterrupted(tmp_path, monkeypatch):
    model, tok = tiny_gpt2()
    texts = make_texts(40)
    kw = dict(tokenizer=tok, context_length=16, batch_size=3, shard_tokens=30, progress=False)
    full = act.harvest(model, "transformer.h.2", texts, tmp_path / "full", **kw)
    assert len(full["shards"]) >= 4

    real = act.Capture.data
    calls = {"n": 0}

    def interrupted(self, batch):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(act.Capture, "data", interrupted)
    with pytest.raises(KeyboardInterrupt):
        act.harvest(model, "transformer.h.2", texts, tmp_path / "resumed", **kw)
    partial = act.read_manifest(tmp_path / "resumed")
    assert not partial["complete"] and 0 < len(partial["shards"]) < len(full["shards"])
    monkeypatch.setattr(act.Capture, "data", real)
    calls["n"] = 0
    counted = []
    monkeypatch.setattr(act.Capture, "data", lambda self, b: counted.append(1) or real(self, b))
    resumed = act.harvest(model, "transformer.h.2", texts, tmp_path / "resumed", **kw)
    # Only the contexts after the last finished shard were run again.
    assert len(counted) < -(-len(list(act.iter_contexts(tok, texts, 16))) // 3)
    assert [s["file"] for s in resumed["shards"]] == [s["file"] for s in full["shards"]]
    assert resumed["n_tokens"] == full["n_tokens"] and resumed["complete"]
    for s in full["shards"]:
        np.testing.assert_array_equal(np.load(tmp_path / "full" / s["file"]),
                                      np.load(tmp_path / "resumed" / s["file"]))
    # A finished harvest is not redone; other settings are refused, not mixed in.
    assert act.harvest(model, "transformer.h.2", texts, tmp_path / "resumed", **kw)["n_tokens"] == full["n_tokens"]
    with pytest.raises(ValueError, match="other settings"):
        act.harvest(model, "transformer.h.1", texts, tmp_path / "resumed", **kw)


def test_text_sources_agree(tmp_path):
    model, tok = tiny_bert()
    texts = make_texts(6)
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)))
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, t in enumerate(texts):
        (folder / f"doc{i:02d}.txt").write_text(t + "\n")
    want = list(act.iter_contexts(tok, texts, 16))
    assert list(act.iter_contexts(tok, tmp_path / "docs.jsonl", 16)) == want
    assert list(act.iter_contexts(tok, str(folder), 16)) == want
    (tmp_path / "one.txt").write_text("\n".join(texts))
    one = [t for c in act.iter_contexts(tok, tmp_path / "one.txt", 64) for t in c]
    assert len(one) > 0 and tok.sep_token_id in one
    topics = list(act.iter_documents("pydoc_data.topics:topics"))
    assert len(topics) > 10 and all(isinstance(t, str) and not cont for t, cont in topics)


def test_stream_serves_every_token_once_shuffled(tmp_path):
    model, tok = tiny_bert()
    texts = make_texts(30)
    m = act.harvest(model, "encoder.layer.1", texts, tmp_path, tokenizer=tok, context_length=16, progress=False)
    _, data = load_all(tmp_path)
    s = act.stream(model, "encoder.layer.1", texts, tokenizer=tok, batch_size=32, buffer_tokens=128,
                   context_length=16)
    batches = list(s)
    assert s.d_in == 32 and all(b.shape[1] == 32 and b.dtype == torch.float32 for b in batches)
    assert all(b.shape[0] == 32 for b in batches[:-1])
    got = torch.cat(batches).numpy()
    assert got.shape[0] == m["n_tokens"]
    assert not np.array_equal(got, data)  # shuffled ...
    key = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
    np.testing.assert_allclose(key(got), key(data), atol=1e-6)  # ... but the same rows
    limited = torch.cat(list(act.stream(model, "encoder.layer.1", texts, tokenizer=tok, batch_size=16,
                                        buffer_tokens=64, max_tokens=100, repeat=True, context_length=16)))
    assert limited.shape[0] == 100


def test_errors_name_the_argument(tmp_path):
    model, tok = tiny_bert()
    with pytest.raises(ValueError, match="hook 'encoder.layer.9'"):
        act.harvest(model, "encoder.layer.9", make_texts(), tmp_path / "a", tokenizer=tok, progress=False)
    with pytest.raises(FileNotFoundError, match="model: .*does/not/exist"):
        act.harvest(str(tmp_path / "does/not/exist"), "encoder.layer.0", make_texts(), tmp_path / "b",
                    progress=False)
    for empty in ([], ["", "   "]):
        with pytest.raises(ValueError, match="text: .*no tokens"):
            act.harvest(model, "encoder.layer.0", empty, tmp_path / "c", tokenizer=tok, overwrite=True,
                        progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="text: folder"):
        act.harvest(model, "encoder.layer.0", tmp_path / "empty", tmp_path / "d", tokenizer=tok, progress=False)
    with pytest.raises(ValueError, match="text: 'nowhere.txt' is not a file"):
        list(act.iter_documents("nowhere.txt"))
    with pytest.raises(ValueError, match="max_tokens"):
        act.harvest(model, "encoder.layer.0", make_texts(), tmp_path / "e", tokenizer=tok, max_tokens=0)
    with pytest.raises(ValueError, match="tokenizer"):
        act.harvest(model, "encoder.layer.0", make_texts(), tmp_path / "f")


def test_cli_harvest_from_saved_model(tmp_path, capsys):
    model, tok = tiny_gpt2()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in make_texts()))
    argv = ["harvest", "--model", str(tmp_path / "model"), "--hook", "h.1", "--text", str(tmp_path / "docs.jsonl"),
            "--text-field", "body", "--out", str(tmp_path / "acts"), "--max-tokens", "150", "--context-length",
            "16", "--quiet"]
    assert main(argv) == 0
    assert "150 tokens x d_in=32" in capsys.readouterr().out
    m, data = load_all(tmp_path / "acts")
    assert m["hook"] == "h.1" and data.shape == (150, 32)
    want = direct_activations(model, tok, 1, list(act.iter_contexts(tok, [t for t in make_texts()], 16)), False)
    np.testing.assert_allclose(data, want[:150], rtol=1e-4, atol=1e-5)


def test_stream_trains_an_sae_without_disk():
    from fastsae.training import train

    model, tok = tiny_bert()
    texts = make_texts(8)
    n_text = sum(len(c) for c in act.iter_contexts(tok, texts, 16))
    assert n_text < 12 * 32
    s = act.stream(model, "encoder.layer.1", texts, tokenizer=tok, batch_size=32, buffer_tokens=128,
                   context_length=16)
    sae = fastsae.TopKSAE(32, 64, 4)
    before = sae.W_dec.detach().clone()
    r = train(sae, s, steps=12, batch_size=32, progress=False)
    assert r.steps == 12 and r.tokens == 12 * 32  # more steps than one pass of the text: it is re-iterated
    assert not torch.equal(before, r.sae.W_dec)
    assert np.isfinite(r.final["fvu"])
