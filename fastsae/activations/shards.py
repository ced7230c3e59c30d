"""Harvest to disk: activations written as ``.npy`` shards plus a ``manifest.json`` that ``fastsae.data`` reads
(the shard format is described in :mod:`fastsae.activations`), resumable after an interruption."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..io import atomic_write
from .models import Capture, _check_positive, _prepare
from .text import TextSource, describe_text_source, iter_batches, tokenizer_template

MANIFEST = "manifest.json"
FORMAT = "fastsae-activations"
FORMAT_VERSION = 1
# Settings that must match for a harvest to resume (anything else changes what the shards contain).
RESUME_KEYS = ("model", "hook", "d_in", "dtype", "text_source", "context_length", "batch_size", "pack",
               "drop_special", "skip_tokens", "shard_tokens", "tokenizer", "input_hook")


# ---------------------------------------------------------------------------------------------
# Harvest to disk
# ---------------------------------------------------------------------------------------------
def write_manifest(out: Path, manifest: dict) -> None:
    atomic_write(out / MANIFEST, lambda fh: fh.write(json.dumps(manifest, indent=2).encode()))


def read_manifest(path) -> dict:
    """The manifest of a harvest folder (``path`` is the folder or its ``manifest.json``), checked."""
    path = Path(path)
    mpath = path / MANIFEST if path.is_dir() else path
    if not mpath.is_file():
        raise FileNotFoundError(f"data: {path} has no {MANIFEST} (not a fastsae activation folder)")
    try:
        m = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"data: {mpath} is not valid JSON: {e}") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"data: {mpath} is not a {FORMAT} manifest")
    for key in ("d_in", "dtype", "n_tokens", "shards"):
        if key not in m:
            raise ValueError(f"data: {mpath} lacks {key!r}")
    if not isinstance(m["shards"], list) or not all(isinstance(e, dict) for e in m["shards"]):
        raise ValueError(f"data: {mpath}: field 'shards' must be a list of objects")
    from .._checks import file_in_folder

    for e in m["shards"]:  # a manifest may not point outside its folder
        file_in_folder(mpath.parent, e.get("file"), f"data: {mpath}")
    return m


def _model_name(model, given) -> str:
    if isinstance(given, (str, os.PathLike)):
        p = Path(os.fspath(given))
        return str(p.resolve()) if p.exists() else os.fspath(given)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return name or type(model).__name__



def harvest(
    model,
    hook: str,
    text: TextSource,
    out,
    *,
    tokenizer=None,
    max_tokens: Optional[int] = None,
    context_length: int = 128,
    batch_size: int = 32,
    dtype: str = "float32",
    shard_tokens: int = 1 << 16,
    pack: bool = True,
    drop_special: bool = False,
    skip_tokens: int = 0,
    text_field: str = "text",
    stop_early: bool = True,
    resume: bool = True,
    overwrite: bool = False,
    device=None,
    progress: bool = True,
    input_hook: Optional[str] = None,
) -> dict:
    """Write the activations of ``model``'s submodule ``hook`` over ``text`` to ``out`` as shards; return the manifest.

    Args:
        model: a local folder or model name (loaded with ``load_model``), or an ``nn.Module`` (then
            ``tokenizer`` is required).
        hook: submodule name, e.g. ``"encoder.layer.2"`` (BERT) or ``"transformer.h.6"`` (GPT-2).
        text: see the module docstring.
        max_tokens: stop after this many data tokens (all of the text when None).
        dtype: ``"float32"`` or ``"float16"`` on disk.
        shard_tokens: a shard is flushed once it holds at least this many tokens (at a batch boundary).
        resume: continue an unfinished harvest found in ``out`` (same settings) instead of starting over.
        overwrite: discard whatever ``out`` holds.
        stop_early: stop the forward pass at the hooked module (False runs the whole model).
        input_hook: harvest transcoder pairs: each row is the input of the module ``input_hook`` followed by the
            output of ``hook`` (the same module for an MLP: ``input_hook=hook``); the manifest's ``pair`` says
            ``{"d_in", "d_out"}`` and ``fastsae.train`` splits the rows for a transcoder.
    """
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    _check_positive("max_tokens", max_tokens, allow_none=True)
    _check_positive("context_length", context_length)
    _check_positive("batch_size", batch_size)
    _check_positive("shard_tokens", shard_tokens)
    if not isinstance(skip_tokens, int) or skip_tokens < 0:
        raise ValueError(f"skip_tokens must be a non-negative integer, got {skip_tokens!r}")
    if out is None:
        raise ValueError("out must be a folder path")
    given = model
    model, tokenizer = _prepare(model, tokenizer, device)
    capture = Capture(model, hook, stop_early=stop_early, input_hook=input_hook)
    template = tokenizer_template(tokenizer)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp*"):
        stale.unlink()

    settings = dict(
        model=_model_name(model, given), hook=hook, d_in=None, dtype=dtype,
        text_source=describe_text_source(text), context_length=context_length, batch_size=batch_size,
        pack=pack, drop_special=drop_special, skip_tokens=skip_tokens, shard_tokens=shard_tokens,
        tokenizer=getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__, input_hook=input_hook,
    )
    manifest = None
    if (out / MANIFEST).exists() and not overwrite:
        old = read_manifest(out)
        if not resume:
            raise FileExistsError(f"out: {out} already holds a harvest; pass overwrite=True (--overwrite) "
                                  "or resume=True")
        diff = {k: (old.get(k), settings[k]) for k in RESUME_KEYS if k != "d_in" and old.get(k) != settings[k]}
        if diff:
            raise ValueError(f"out: {out} holds a harvest with other settings {diff} (old, new); "
                             "use another folder or overwrite=True (--overwrite)")
        if old.get("complete"):
            if max_tokens is not None and old["n_tokens"] < max_tokens and old.get("max_tokens") is not None \
                    and old["n_tokens"] >= old["max_tokens"]:
                raise ValueError(f"out: {out} is a finished harvest of {old['n_tokens']} tokens; it cannot be "
                                 f"extended to max_tokens={max_tokens}: use overwrite=True (--overwrite)")
            return old
        manifest = old
    elif overwrite:
        for f in list(out.glob("shard_*.npy")) + [out / MANIFEST]:
            if f.exists():
                f.unlink()
    if manifest is None:
        manifest = dict(format=FORMAT, version=FORMAT_VERSION, **settings, n_tokens=0, shards=[],
                        contexts_done=0, complete=False, max_tokens=max_tokens, sum_sq_norm=0.0,
                        special_token_ids=sorted(template.special_ids), created=time.time())
        write_manifest(out, manifest)
    manifest["max_tokens"] = max_tokens

    from tqdm.auto import tqdm

    n_tokens = manifest["n_tokens"]
    np_dtype = np.dtype(dtype)
    bar = tqdm(total=max_tokens, initial=n_tokens, unit="tok", unit_scale=True, disable=not progress,
               desc=f"harvest {hook}")
    pending: list = []
    pending_tokens = 0
    contexts_done = manifest["contexts_done"]
    contexts_in_pending = 0
    t0 = time.perf_counter()
    new_tokens = 0

    def flush(final: bool):
        nonlocal pending, pending_tokens, contexts_in_pending
        if pending:
            arr = np.concatenate(pending, axis=0)
            index = len(manifest["shards"])
            name = f"shard_{index:05d}.npy"
            atomic_write(out / name, lambda fh: np.save(fh, arr, allow_pickle=False))
            sq = float(np.square(arr, dtype=np.float64).sum())
            manifest["shards"].append(dict(file=name, n_tokens=int(arr.shape[0]), sum_sq_norm=sq))
            manifest["n_tokens"] += int(arr.shape[0])
            manifest["sum_sq_norm"] += sq
            manifest["d_in"] = int(arr.shape[1])  # the width of a row (input and output of a pair)
            if capture.pair_dims is not None:
                manifest["pair"] = dict(d_in=capture.pair_dims[0], d_out=capture.pair_dims[1],
                                        input_hook=input_hook, output_hook=hook)
        manifest["contexts_done"] += contexts_in_pending
        manifest["complete"] = final
        manifest["mean_sq_norm"] = manifest["sum_sq_norm"] / max(manifest["n_tokens"], 1)
        manifest["updated"] = time.time()
        write_manifest(out, manifest)
        pending, pending_tokens, contexts_in_pending = [], 0, 0

    try:
        batches = iter_batches(tokenizer, text, context_length=context_length, batch_size=batch_size, pack=pack,
                               drop_special=drop_special, skip_tokens=skip_tokens, skip_contexts=contexts_done,
                               text_field=text_field, template=template)
        done = max_tokens is not None and n_tokens >= max_tokens
        saw_any = contexts_done > 0 or manifest["n_tokens"] > 0
        for batch in ([] if done else batches):
            saw_any = True
            x = capture.data(batch)
            if max_tokens is not None and n_tokens + x.shape[0] > max_tokens:
                x = x[: max_tokens - n_tokens]
            pending.append(x.float().cpu().numpy().astype(np_dtype, copy=False))
            pending_tokens += x.shape[0]
            contexts_in_pending += len(batch.contexts)
            n_tokens += x.shape[0]
            new_tokens += x.shape[0]
            bar.update(x.shape[0])
            if max_tokens is not None and n_tokens >= max_tokens:
                break
            if pending_tokens >= shard_tokens:
                flush(final=False)
        if not saw_any:
            raise ValueError(f"text: the text source {describe_text_source(text)} yielded no tokens"
                             + (f" after skip_tokens={skip_tokens}" if skip_tokens else ""))
        flush(final=True)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    manifest["last_run"] = dict(tokens=new_tokens, seconds=elapsed, tokens_per_s=new_tokens / max(elapsed, 1e-9))
    write_manifest(out, manifest)
    if manifest["n_tokens"] == 0:
        raise ValueError(f"text: the text source {describe_text_source(text)} yielded no data tokens "
                         "(all padding or special tokens?)")
    return manifest


def open_shards(path) -> list:
    """The shards of a harvest folder as read-only memory maps ``[n_tokens, d_in]`` (nothing is read yet)."""
    m = read_manifest(path)
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    return [np.load(folder / s["file"], mmap_mode="r", allow_pickle=False) for s in m["shards"]]
