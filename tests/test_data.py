"""Activation sources: every row exactly once per epoch, deterministic resume from any batch, lazy shards
(.npy, .safetensors incl. bf16) with bad files named, iterables, and the synthetic generator."""
import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastsae.data import (IterableSource, ShardSource, TensorSource, as_source, batches, feature_recovery,
                          synthetic)


def _rows_as_set(t):
    return sorted(map(tuple, t.tolist()))


def _take(source, batch_size, n, **kw):
    it = batches(source, batch_size, **kw)
    return [next(it) for _ in range(n)]


def test_tensor_source_epochs_and_resume():
    x = torch.arange(50 * 3, dtype=torch.float32).reshape(50, 3)
    src = TensorSource(x, chunk_rows=7)
    bs = _take(src, 10, 10, seed=3)
    assert all(b.shape == (10, 3) for b in bs)
    epoch0, epoch1 = torch.cat(bs[:5]), torch.cat(bs[5:])
    assert _rows_as_set(epoch0) == _rows_as_set(x) == _rows_as_set(epoch1)  # each row once per epoch
    assert not torch.equal(epoch0, epoch1)  # reshuffled every epoch
    assert not torch.equal(epoch0, x)
    resumed = _take(src, 10, 4, seed=3, start_batch=6)
    for a, b in zip(bs[6:], resumed):
        assert torch.equal(a, b)
    # batches that straddle an epoch boundary resume exactly too
    straddle = _take(src, 15, 6, seed=1)
    assert torch.equal(_take(src, 15, 1, seed=1, start_batch=3)[0], straddle[3])
    assert not torch.equal(_take(src, 10, 1, seed=4)[0], bs[0])


def _write_shards(folder, sizes, d_in, dtype=np.float32, kind="npy"):
    folder.mkdir(exist_ok=True)
    start, all_rows = 0, []
    for i, n in enumerate(sizes):
        arr = (np.arange(start, start + n)[:, None] * 10 + np.arange(d_in)[None]).astype(dtype)
        start += n
        all_rows.append(arr)
        if kind == "npy":
            np.save(folder / f"shard_{i:03d}.npy", arr)
        else:
            save_file({"activations": torch.from_numpy(arr.astype(np.float32)).to(torch.bfloat16
                       if kind == "bf16" else torch.float32)}, str(folder / f"shard_{i:03d}.safetensors"))
    return np.concatenate(all_rows)


@pytest.mark.parametrize("kind", ["npy", "safetensors", "bf16"])
def test_shard_folder_lazy_shuffled_resumable(tmp_path, kind):
    rows = _write_shards(tmp_path / "acts", [37, 50, 13], 4, kind=kind)
    (tmp_path / "acts" / "manifest.json").write_text(json.dumps(dict(d_in=4, dtype="float32", n_tokens=100)))
    src = as_source(tmp_path / "acts")
    assert isinstance(src, ShardSource) and len(src) == 100 and src.d_in == 4
    src = ShardSource(tmp_path / "acts", block_rows=8, buffer_rows=24)
    bs = _take(src, 20, 10, seed=0)
    epoch = torch.cat(bs[:5]).float()
    expected = torch.from_numpy(rows.astype(np.float32))
    if kind == "bf16":
        expected = expected.to(torch.bfloat16).float()
    assert _rows_as_set(epoch) == _rows_as_set(expected)
    assert not torch.equal(epoch, expected)  # shuffled
    for a, b in zip(bs[3:], _take(src, 20, 7, seed=0, start_batch=3)):
        assert torch.equal(a, b)
    sample = src.sample(30, seed=0)
    assert sample.shape == (30, 4) and set(_rows_as_set(sample)) <= set(_rows_as_set(expected))
    few = src.sample(3, seed=0)  # a small sample of a big folder: random rows without a full permutation
    assert 1 <= few.shape[0] <= 3 and set(_rows_as_set(few)) <= set(_rows_as_set(expected))


def test_manifest_listing_is_authoritative(tmp_path):
    rows = _write_shards(tmp_path / "acts", [10, 12, 7], 3)
    shards = [dict(file=f"shard_{i:03d}.npy", n_tokens=n) for i, n in [(1, 12), (0, 10)]]  # not shard_002
    (tmp_path / "acts" / "manifest.json").write_text(json.dumps(dict(d_in=3, n_tokens=22, shards=shards)))
    src = ShardSource(tmp_path / "acts")
    assert len(src) == 22 and [s.path.name for s in src.shards] == ["shard_001.npy", "shard_000.npy"]
    assert _rows_as_set(torch.cat(_take(src, 11, 2))) == _rows_as_set(torch.from_numpy(rows[:22]))
    shards.append(dict(file="missing.npy", n_tokens=1))
    (tmp_path / "acts" / "manifest.json").write_text(json.dumps(dict(d_in=3, shards=shards)))
    with pytest.raises(ValueError, match="manifest.json lists missing.npy"):
        ShardSource(tmp_path / "acts")


def test_shard_rows_are_read_lazily_and_exactly(tmp_path):
    """Shards are read with positional reads of just the rows asked for (no memory map: see test_safety.py)."""
    rows = _write_shards(tmp_path / "acts", [64], 8)
    np.save(tmp_path / "acts" / "big_endian.npy", rows[:10].astype(">f4"))
    src = ShardSource([tmp_path / "acts" / "shard_000.npy", tmp_path / "acts" / "big_endian.npy"])
    shard, be = src.shards
    assert shard.shape == (64, 8) and shard.offset == 128  # the .npy header, parsed without np.load
    assert torch.equal(shard.rows(5, 9), torch.from_numpy(rows[5:9]))
    idx = np.array([63, 2, 2, 40, 3, 0])  # any order, repeats, sparse and dense runs
    assert torch.equal(shard.take(idx), torch.from_numpy(rows[idx]))
    assert torch.equal(shard.take(np.array([1, 2, 3])), torch.from_numpy(rows[1:4]))
    assert torch.equal(be.rows(0, 10), torch.from_numpy(rows[:10]))  # byte-swapped to native order
    with pytest.raises(IndexError, match="shard_000.npy"):
        shard.take(np.array([64]))


def test_bad_shards_are_named(tmp_path):
    d = tmp_path / "acts"
    _write_shards(d, [10, 10], 4)
    np.save(d / "shard_999.npy", np.zeros((5, 6), np.float32))
    with pytest.raises(ValueError, match="shard_999.npy.*d_in=6"):
        ShardSource(d)
    (d / "shard_999.npy").unlink()
    (d / "manifest.json").write_text(json.dumps(dict(d_in=5)))
    with pytest.raises(ValueError, match="manifest.json"):
        ShardSource(d)
    (d / "manifest.json").unlink()
    np.save(d / "shard_5.npy", np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="shard_5.npy.*2-D"):
        ShardSource(d)
    (d / "shard_5.npy").unlink()
    save_file({"activations": torch.randn(10, 4)}, str(d / "t.safetensors"))
    data = (d / "t.safetensors").read_bytes()
    (d / "t.safetensors").write_bytes(data[:-12])
    with pytest.raises(ValueError, match="t.safetensors.*truncated"):
        ShardSource(d)
    (d / "t.safetensors").write_bytes(struct.pack("<Q", 10 ** 9) + b"{}")
    with pytest.raises(ValueError, match="t.safetensors"):
        ShardSource(d)
    (d / "t.safetensors").unlink()
    (d / "x.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="x.npy"):
        ShardSource(d)
    with pytest.raises(ValueError, match="no .npy"):
        ShardSource(tmp_path)


def test_iterable_sources_rebatch_and_replay():
    chunks = [torch.randn(7, 5) for _ in range(6)]  # 42 rows
    src = as_source(chunks)
    assert isinstance(src, IterableSource) and src.resumable and src.d_in == 5
    bs = _take(src, 8, 8)
    flat = torch.cat(chunks)
    assert torch.equal(torch.cat(bs)[:42], flat)  # in the iterable's order
    assert torch.equal(torch.cat(bs)[42:], flat[:22])  # and again for the next epoch
    for a, b in zip(bs[2:], _take(src, 8, 6, start_batch=2)):
        assert torch.equal(a, b)
    # a one-shot generator: rows peeked for the sample are served first, nothing is lost
    gen_src = as_source(c.numpy() for c in chunks)
    assert not gen_src.resumable
    assert torch.equal(gen_src.sample(10, seed=0), flat[:10])
    got = list(batches(gen_src, 8))
    assert len(got) == 5 and torch.equal(torch.cat(got), flat[:40])
    with pytest.raises(ValueError, match="last dimension d_in=5"):
        list(batches(as_source([torch.randn(3, 5), torch.randn(3, 4)]), 2))
    with pytest.raises(TypeError, match="floating-point"):
        as_source([torch.ones(3, 5, dtype=torch.int64)])


def test_synthetic_has_known_sparse_nonnegative_structure():
    s = synthetic(4000, 16, 40, active=3, seed=5)
    assert s.x.shape == (4000, 16) and s.features.shape == (40, 16)
    torch.testing.assert_close(s.features.norm(dim=1), torch.ones(40))
    assert abs(float(s.probabilities.sum()) - 3) < 1e-4
    again = synthetic(4000, 16, 40, active=3, seed=5)
    assert torch.equal(again.x, s.x)
    assert not torch.equal(s.sample(100, seed=1), s.sample(100, seed=2))
    assert feature_recovery(s.features, s.features) == 1.0
    assert s.recovery(torch.randn(80, 16)) < 0.2
    # a decoder holding each feature (in any order, any positive scale, plus junk rows) recovers all
    W = torch.cat([3 * s.features[torch.randperm(40)], torch.randn(10, 16)])
    assert s.recovery(W) == 1.0
    # non-negative mixtures: every sample has a non-negative projection on its combination of features
    sub = synthetic(2000, 64, 8, active=2, seed=0)  # nearly orthogonal features: projections ~ codes
    proj = sub.x @ sub.features.t()
    assert float((proj > -0.6).float().mean()) > 0.99
    assert abs(float((proj > 0.4).float().sum(1).mean()) - 2) < 0.3
    with pytest.raises(ValueError, match="active"):
        synthetic(10, 4, 4, active=5)
    with pytest.raises(ValueError, match="n_features"):
        synthetic(10, 4, 0)
