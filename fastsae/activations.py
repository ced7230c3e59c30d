"""Harvest activations of a Hugging Face ``transformers`` model (optional extra ``hf``).

The output of any named submodule (``--hook encoder.layer.3``, ``model.layers.12``, ``transformer.h.6``: the
residual stream where the architecture has one) is collected over a text source and either

- written as memory-mapped shards plus a manifest (``harvest``), which ``fastsae.data`` reads lazily, or
- streamed as shuffled ``[batch_size, d_in]`` batches straight into training (``ActivationStream``).

Shard format (a contract with ``fastsae.data``): a folder with ``shard_00000.npy``, ``shard_00001.npy``, ...,
each a 2-D ``[n_tokens, d_in]`` float16/float32 array written with ``np.save`` (so ``np.load(mmap_mode="r")``
works), and ``manifest.json`` (model, hook, d_in, dtype, n_tokens, shards ``[{file, n_tokens}]``, text source,
context length, and the state a resume needs). Shards are written to a temporary name and renamed; the
manifest is rewritten (atomically) after every shard, so an interrupted harvest resumes from its last shard.

Text sources: a text file (one document), a JSON-lines file (one document per line, ``text_field``), a
``.json`` file holding a list of strings or of objects, a folder of such files (recursively, sorted), a
``"module:attribute"`` string naming a Python str / list of str / dict of str (``"pydoc_data.topics:topics"``,
the Python reference documentation that ships with Python), or any iterable of strings.

Documents are tokenised without special tokens, joined with the tokenizer's separator (``[SEP]`` or the
end-of-text token) and cut into fixed-length contexts that each get the model's own special tokens
(``[CLS] ... [SEP]`` for BERT, nothing for GPT-2). ``pack=False`` keeps each document in its own contexts
instead. Padding never reaches the data; ``drop_special=True`` also drops the special tokens.

``transformers`` is imported only inside the functions that load a model, so ``import fastsae`` never needs it.
"""
from __future__ import annotations

import importlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from .io import atomic_write

MANIFEST = "manifest.json"
FORMAT = "fastsae-activations"
FORMAT_VERSION = 1
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
# A plain text file is read in pieces of about this many characters, cut at line ends, so a
# multi-gigabyte file never sits in memory; pieces of one file are one document (no separator).
PIECE_CHARS = 1 << 20
# Settings that must match for a harvest to resume (anything else changes what the shards contain).
RESUME_KEYS = ("model", "hook", "d_in", "dtype", "text_source", "context_length", "batch_size", "pack",
               "drop_special", "skip_tokens", "shard_tokens", "tokenizer", "input_hook")

TextSource = Union[str, os.PathLike, Iterable[str]]


# ---------------------------------------------------------------------------------------------
# Text sources
# ---------------------------------------------------------------------------------------------
def _read_text_file(path: Path) -> Iterator[tuple[str, bool]]:
    """Pieces of one document: ``(text, continues_previous)``."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        first = True
        while True:
            piece = fh.read(PIECE_CHARS)
            if not piece:
                return
            rest = fh.readline()  # finish the line so no word is split between two pieces
            yield piece + rest, not first
            first = False


def _json_text(obj, text_field: str, where: str) -> str:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        if text_field not in obj:
            raise ValueError(f"text: {where} has no field {text_field!r} (set text_field); keys: {sorted(obj)[:8]}")
        value = obj[text_field]
        if not isinstance(value, str):
            raise ValueError(f"text: {where} field {text_field!r} is {type(value).__name__}, expected str")
        return value
    raise ValueError(f"text: {where} is {type(obj).__name__}, expected a string or an object with {text_field!r}")


def _read_jsonl(path: Path, text_field: str) -> Iterator[tuple[str, bool]]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"text: {path}:{lineno} is not valid JSON: {e}") from e
                yield _json_text(obj, text_field, f"{path}:{lineno}"), False


def _read_json(path: Path, text_field: str) -> Iterator[tuple[str, bool]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        # Many ".json" corpora are really JSON lines.
        yield from _read_jsonl(path, text_field)
        return
    items = data if isinstance(data, list) else [data]
    for i, obj in enumerate(items):
        yield _json_text(obj, text_field, f"{path}[{i}]"), False


def _read_file(path: Path, text_field: str) -> Iterator[tuple[str, bool]]:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path, text_field)
    if suffix == ".json":
        return _read_json(path, text_field)
    return _read_text_file(path)


def _module_attribute(spec: str):
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"text: {spec!r} is not a file or folder, and module {module_name!r} cannot be imported "
                         f"({e})") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"text: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return list(obj.values())
    if isinstance(obj, (list, tuple)):
        return list(obj)
    raise ValueError(f"text: {spec} is a {type(obj).__name__}; expected a str, a list of str or a dict of str")


def describe_text_source(text) -> str:
    """How the manifest names a text source (a resume checks that it is unchanged)."""
    if isinstance(text, (str, os.PathLike)):
        s = os.fspath(text)
        p = Path(s)
        return str(p.resolve()) if p.exists() else s
    return f"<{type(text).__name__}>"


def iter_documents(text: TextSource, *, text_field: str = "text") -> Iterator[tuple[str, bool]]:
    """The pieces of text of a source as ``(text, continues_previous_document)``; see the module docstring."""
    if isinstance(text, (str, os.PathLike)):
        s = os.fspath(text)
        path = Path(s)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file()
                           and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES + (".json",))
            if not files:
                raise ValueError(f"text: folder {s} holds no .txt/.md/.rst/.jsonl/.json files")
            for f in files:
                yield from _read_file(f, text_field)
            return
        if path.is_file():
            yield from _read_file(path, text_field)
            return
        if ":" in s and not os.sep in s.partition(":")[0]:
            for i, item in enumerate(_module_attribute(s)):
                if not isinstance(item, str):
                    raise ValueError(f"text: item {i} of {s} is {type(item).__name__}, expected str")
                yield item, False
            return
        raise ValueError(f"text: {s!r} is not a file, a folder, or a 'module:attribute' (e.g. pydoc_data.topics:topics)")
    try:
        items = iter(text)
    except TypeError:
        raise TypeError(f"text must be a path, a 'module:attribute' string or an iterable of str, "
                        f"got {type(text).__name__}") from None
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f"text: item {i} of the iterable is {type(item).__name__}, expected str")
        yield item, False


# ---------------------------------------------------------------------------------------------
# Tokenisation into fixed-length contexts
# ---------------------------------------------------------------------------------------------
@dataclass
class Template:
    """The special tokens a tokenizer wraps around one sequence, and the separator placed between documents."""

    prefix: list
    suffix: list
    separator: Optional[int]
    pad_id: int

    @property
    def special_ids(self) -> set:
        return set(self.prefix) | set(self.suffix) | ({self.separator} if self.separator is not None else set())


def tokenizer_template(tokenizer) -> Template:
    # transformers 5 dropped build_inputs_with_special_tokens; comparing a probe tokenised with and
    # without special tokens finds the template of any tokenizer.
    probe = "the quick brown fox"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe)["input_ids"])
    prefix, suffix = [], []
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            prefix, suffix = full[:start], full[start + len(plain):]
            break
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if pad is None:  # GPT-2 has no pad token; padded positions are masked out, so any id will do
        pad = sep if sep is not None else 0
    return Template(prefix, suffix, sep, int(pad))


def iter_contexts(tokenizer, text: TextSource, context_length: int, *, pack: bool = True,
                  text_field: str = "text", template: Optional[Template] = None) -> Iterator[list]:
    """Token-id lists of at most ``context_length`` ids, special tokens included; only the last
    context of the stream (``pack=True``) or of each document (``pack=False``) is shorter."""
    t = template or tokenizer_template(tokenizer)
    body = context_length - len(t.prefix) - len(t.suffix)
    if body < 1:
        raise ValueError(f"context_length={context_length} leaves no room next to the "
                         f"{len(t.prefix) + len(t.suffix)} special tokens")
    buf: list = []
    started = False
    for piece, continues in iter_documents(text, text_field=text_field):
        ids = tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"]
        if not ids:
            continue
        if not continues:
            if not pack and buf:
                yield t.prefix + buf + t.suffix
                buf = []
            elif pack and started and t.separator is not None:
                buf.append(t.separator)
        started = True
        buf.extend(ids)
        while len(buf) >= body:
            yield t.prefix + buf[:body] + t.suffix
            buf = buf[body:]
    if buf:
        yield t.prefix + buf + t.suffix


@dataclass
class Batch:
    input_ids: Tensor       # [B, L] int64, right-padded
    attention_mask: Tensor  # [B, L] int64
    keep: Tensor            # [B, L] bool: the positions whose activations are data
    contexts: list          # the B token-id lists


def make_batch(contexts: list, template: Template, drop_special: bool) -> Batch:
    L = max(len(c) for c in contexts)
    ids = torch.full((len(contexts), L), template.pad_id, dtype=torch.long)
    mask = torch.zeros((len(contexts), L), dtype=torch.long)
    for i, c in enumerate(contexts):
        ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, :len(c)] = 1
    # Padding is found from the mask, never from the id: GPT-2 pads with its end-of-text token.
    keep = mask.bool()
    if drop_special and template.special_ids:
        keep &= ~torch.isin(ids, torch.tensor(sorted(template.special_ids), dtype=torch.long))
    return Batch(ids, mask, keep, contexts)


def kept_tokens(context: list, template: Template, drop_special: bool) -> int:
    if not drop_special:
        return len(context)
    special = template.special_ids
    return sum(1 for t in context if t not in special)


def iter_batches(tokenizer, text: TextSource, *, context_length: int, batch_size: int, pack: bool = True,
                 drop_special: bool = False, skip_tokens: int = 0, skip_contexts: int = 0,
                 text_field: str = "text", template: Optional[Template] = None) -> Iterator[Batch]:
    """Batches of contexts. ``skip_tokens`` skips whole contexts until that many data tokens have gone by
    (a held-out split: harvest the first N tokens, evaluate with ``skip_tokens=N``); ``skip_contexts``
    then skips that many more (the resume point of a harvest)."""
    t = template or tokenizer_template(tokenizer)
    pending: list = []
    skipped_tokens = 0
    index = 0
    for ctx in iter_contexts(tokenizer, text, context_length, pack=pack, text_field=text_field, template=t):
        if skipped_tokens < skip_tokens:
            skipped_tokens += kept_tokens(ctx, t, drop_special)
            continue
        index += 1
        if index <= skip_contexts:
            continue
        pending.append(ctx)
        if len(pending) == batch_size:
            yield make_batch(pending, t, drop_special)
            pending = []
    if pending:
        yield make_batch(pending, t, drop_special)


# ---------------------------------------------------------------------------------------------
# Models and hooks
# ---------------------------------------------------------------------------------------------
def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError("fastsae.activations needs transformers: pip install 'fastsae[hf]'") from e


def load_model(model: Union[str, os.PathLike], *, device=None, dtype: Optional[torch.dtype] = None,
               allow_download: bool = False):
    """``(model, tokenizer)`` from a local folder or a Hugging Face model name, in eval mode.

    A causal LM is loaded with its LM head (so evaluation can measure the loss); anything else with
    ``AutoModel``. Nothing is downloaded unless ``allow_download`` (a name must already be in the cache).
    """
    _require_transformers()
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a path or a model name, got {type(model).__name__}")
    s = os.fspath(model)
    path = Path(s).expanduser()
    looks_like_path = s.startswith((".", "/", "~")) or os.sep in s and s.count("/") != 1 or path.exists()
    if looks_like_path and not path.exists():
        raise FileNotFoundError(f"model: {s} does not exist")
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"model: {s} has no config.json (not a transformers model folder)")
    kw = dict(local_files_only=not allow_download)
    try:
        config = AutoConfig.from_pretrained(str(path) if path.exists() else s, **kw)
    except OSError as e:
        hint = "" if allow_download else " (nothing is downloaded unless allow_download / --allow-download)"
        raise FileNotFoundError(f"model: cannot load {s!r}{hint}: {e}") from e
    src = str(path) if path.exists() else s
    archs = config.architectures or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    cls = AutoModelForCausalLM if causal else AutoModel
    m = cls.from_pretrained(src, dtype=dtype, **kw) if dtype is not None else cls.from_pretrained(src, **kw)
    tok = AutoTokenizer.from_pretrained(src, **kw)
    m.eval()
    if device is not None:
        m.to(device)
    return m, tok


def resolve_hook(model: nn.Module, hook: str) -> nn.Module:
    """The submodule named ``hook``; the base model's names also work (``h.3`` for ``transformer.h.3``)."""
    if not isinstance(hook, str) or not hook:
        raise ValueError(f"hook must be a non-empty submodule name, got {hook!r}")
    try:
        return model.get_submodule(hook)
    except AttributeError:
        pass
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if isinstance(base, nn.Module):
        try:
            return base.get_submodule(hook)
        except AttributeError:
            pass
    # Suggest the layer containers (names ending in a number), which are what people hook.
    names = [n for n, _ in model.named_modules() if n and n.split(".")[-1].isdigit() and n.count(".") <= 3]
    sample = ", ".join(names[:4] + (["...", names[-1]] if len(names) > 4 else []))
    raise ValueError(f"hook {hook!r} is not a submodule of {type(model).__name__}; layers include: {sample}")


def hooked_tensor(out, hook: str) -> Tensor:
    """The tensor a hooked module returns: the output itself or the first element of a tuple / ModelOutput."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    if hasattr(out, "to_tuple"):
        return out.to_tuple()[0]
    raise TypeError(f"hook {hook!r}: the module returns {type(out).__name__}, not a tensor or a tuple of tensors")


def replace_output(out, new: Tensor):
    """``out`` with its hooked tensor replaced by ``new`` (same container type)."""
    if isinstance(out, Tensor):
        return new
    if isinstance(out, tuple):
        return (new,) + tuple(out[1:])
    if isinstance(out, list):
        return [new] + list(out[1:])
    if hasattr(out, "to_tuple"):
        first = next(iter(out.keys()))
        out[first] = new
        return out
    raise TypeError(f"cannot replace a module output of type {type(out).__name__}")


class _StopForward(Exception):
    """Raised from the forward hook once the activation is captured: the layers after it never run."""


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class Capture:
    """Runs ``model`` on batches and returns the hooked module's output ``[B, L, d]``.

    With ``input_hook`` (transcoder pairs): the *input* of the module ``input_hook`` and the output of ``hook``
    (often the same module, e.g. an MLP), side by side as ``[B, L, d_in + d_out]``; ``pair_dims`` is then
    ``(d_in, d_out)``. ``stop_early`` aborts the forward pass once what is needed was captured, so the layers
    above it (and the LM head) cost nothing.
    """

    def __init__(self, model: nn.Module, hook: str, *, stop_early: bool = True, input_hook: Optional[str] = None):
        self.model, self.hook, self.stop_early, self.input_hook = model, hook, stop_early, input_hook
        self.module = resolve_hook(model, hook)
        self.input_module = resolve_hook(model, input_hook) if input_hook is not None else None
        self.device = model_device(model)
        self.pair_dims: Optional[tuple[int, int]] = None

    def __call__(self, batch: Batch) -> Tensor:
        captured, inputs = [], []

        def fn(module, args, out):
            captured.append(hooked_tensor(out, self.hook))
            if self.stop_early and (self.input_module is None or inputs):
                raise _StopForward

        def fn_in(module, args):
            if not args or not isinstance(args[0], Tensor):
                raise TypeError(f"input hook {self.input_hook!r}: the module's first argument is not a tensor")
            inputs.append(args[0])

        handles = [self.module.register_forward_hook(fn)]
        if self.input_module is not None:
            handles.append(self.input_module.register_forward_pre_hook(fn_in))
        try:
            with torch.inference_mode():
                self.model(input_ids=batch.input_ids.to(self.device),
                           attention_mask=batch.attention_mask.to(self.device))
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        if not captured or (self.input_module is not None and not inputs):
            raise RuntimeError(f"hook {self.hook!r}: the module never ran in the forward pass")
        B, L = batch.input_ids.shape
        parts = [(self.hook, captured[0])] if self.input_module is None else [(self.input_hook, inputs[0]),
                                                                            (self.hook, captured[0])]
        for name, x in parts:
            if x.dim() != 3 or x.shape[:2] != (B, L):
                raise ValueError(f"hook {name!r} has shape {tuple(x.shape)}; expected [batch={B}, "
                                 f"length={L}, d] (hook a layer, e.g. encoder.layer.3 or model.layers.12)")
        if self.input_module is None:
            return captured[0]
        self.pair_dims = (inputs[0].shape[-1], captured[0].shape[-1])
        return torch.cat([inputs[0], captured[0].to(inputs[0].dtype)], dim=-1)

    def data(self, batch: Batch) -> Tensor:
        """The kept positions only: ``[n_kept, d]`` (row-major over batch then position)."""
        x = self(batch)
        return x[batch.keep.to(x.device)]


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
    from ._checks import file_in_folder

    for e in m["shards"]:  # a manifest may not point outside its folder
        file_in_folder(mpath.parent, e.get("file"), f"data: {mpath}")
    return m


def _model_name(model, given) -> str:
    if isinstance(given, (str, os.PathLike)):
        p = Path(os.fspath(given))
        return str(p.resolve()) if p.exists() else os.fspath(given)
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return name or type(model).__name__


def _prepare(model, tokenizer, device):
    if isinstance(model, (str, os.PathLike)):
        m, tok = load_model(model, device=device)
        return m, (tokenizer or tok)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a path, a model name or an nn.Module, got {type(model).__name__}")
    if tokenizer is None:
        raise ValueError("tokenizer is required when model is an nn.Module")
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def _check_positive(name, v, allow_none=False):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return v


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


# ---------------------------------------------------------------------------------------------
# Streaming into training, without touching disk
# ---------------------------------------------------------------------------------------------
class ActivationStream:
    """Shuffled ``[batch_size, d_in]`` float32 batches of activations, harvested on the fly.

    Activations fill a buffer of ``buffer_tokens`` rows; once full, it is shuffled and the first half is
    served while the second half stays to mix with the next fill (the usual SAE shuffling buffer: tokens
    of one context end up spread over many batches). ``repeat=True`` starts the text again when it ends
    (a new shuffle each pass); otherwise iteration ends after the last partial buffer. Iterating again
    restarts from the beginning of the text.
    """

    def __init__(self, model, hook: str, text: TextSource, *, tokenizer=None, batch_size: int = 4096,
                 buffer_tokens: int = 1 << 16, max_tokens: Optional[int] = None, context_length: int = 128,
                 harvest_batch_size: int = 32, pack: bool = True, drop_special: bool = False,
                 skip_tokens: int = 0, text_field: str = "text", repeat: bool = False, seed: int = 0,
                 device=None, progress: bool = False):
        self.batch_size = _check_positive("batch_size", batch_size)
        self.buffer_tokens = _check_positive("buffer_tokens", buffer_tokens)
        if buffer_tokens < 2 * batch_size:
            raise ValueError(f"buffer_tokens must be at least 2 * batch_size = {2 * batch_size}, got {buffer_tokens}")
        self.max_tokens = _check_positive("max_tokens", max_tokens, allow_none=True)
        self.model, self.tokenizer = _prepare(model, tokenizer, device)
        self.capture = Capture(self.model, hook, stop_early=True)
        self.template = tokenizer_template(self.tokenizer)
        self.hook, self.text = hook, text
        self.kw = dict(context_length=_check_positive("context_length", context_length),
                       batch_size=_check_positive("harvest_batch_size", harvest_batch_size), pack=pack,
                       drop_special=drop_special, skip_tokens=skip_tokens, text_field=text_field)
        self.repeat, self.seed, self.progress = repeat, seed, progress
        self.d_in = self._probe_d_in()

    def _probe_d_in(self) -> int:
        for batch in iter_batches(self.tokenizer, self.text, template=self.template,
                                  **dict(self.kw, batch_size=1)):
            return int(self.capture(batch).shape[-1])
        raise ValueError(f"text: the text source {describe_text_source(self.text)} yielded no tokens")

    def _activations(self) -> Iterator[Tensor]:
        served = 0
        while True:
            any_batch = False
            for batch in iter_batches(self.tokenizer, self.text, template=self.template, **self.kw):
                any_batch = True
                x = self.capture.data(batch).float().cpu()
                if self.max_tokens is not None:
                    x = x[: self.max_tokens - served]
                served += x.shape[0]
                if x.shape[0]:
                    yield x
                if self.max_tokens is not None and served >= self.max_tokens:
                    return
            if not self.repeat or not any_batch:
                return

    def __iter__(self) -> Iterator[Tensor]:
        from tqdm.auto import tqdm

        g = torch.Generator().manual_seed(self.seed)
        buf = torch.empty(0, self.d_in)
        bar = tqdm(total=self.max_tokens, unit="tok", unit_scale=True, disable=not self.progress,
                   desc=f"stream {self.hook}")
        try:
            for x in self._activations():
                bar.update(x.shape[0])
                buf = torch.cat([buf, x])
                if buf.shape[0] >= self.buffer_tokens:
                    buf = buf[torch.randperm(buf.shape[0], generator=g)]
                    n_serve = (buf.shape[0] // 2) // self.batch_size * self.batch_size
                    for i in range(0, n_serve, self.batch_size):
                        yield buf[i:i + self.batch_size]
                    buf = buf[n_serve:]
            buf = buf[torch.randperm(buf.shape[0], generator=g)]
            for i in range(0, buf.shape[0], self.batch_size):
                yield buf[i:i + self.batch_size]
        finally:
            bar.close()


def stream(model, hook: str, text: TextSource, **kwargs) -> ActivationStream:
    """``ActivationStream(model, hook, text, **kwargs)``: shuffled activation batches, no disk."""
    return ActivationStream(model, hook, text, **kwargs)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def add_text_arguments(p) -> None:
    """Arguments shared by ``harvest`` and ``eval`` (they must tokenise the same way)."""
    p.add_argument("--model", required=True, help="transformers model folder or cached model name")
    p.add_argument("--hook", required=True, help="submodule whose output is used, e.g. encoder.layer.2")
    p.add_argument("--text", required=True,
                   help="text file, .jsonl file, folder of them, or module:attribute (e.g. pydoc_data.topics:topics)")
    p.add_argument("--text-field", default="text", help="JSON field holding the text (default: text)")
    p.add_argument("--context-length", type=int, default=128, help="tokens per context (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="contexts per forward pass (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens (default %(default)s)")
    p.add_argument("--skip-tokens", type=int, default=0,
                   help="skip the first N tokens of the text (e.g. evaluate on what was not harvested)")
    p.add_argument("--no-pack", dest="pack", action="store_false",
                   help="one document per context (padded) instead of packing documents into full contexts")
    p.add_argument("--drop-special", action="store_true", help="drop special tokens ([CLS], [SEP], separators)")
    p.add_argument("--device", default=None, help="torch device for the model (default: cpu)")
    p.add_argument("--allow-download", action="store_true", help="let transformers download a named model")


def cmd_harvest(args) -> int:
    model, tok = load_model(args.model, device=args.device, allow_download=args.allow_download)
    m = harvest(model, args.hook, args.text, args.out, tokenizer=tok, max_tokens=args.max_tokens,
                context_length=args.context_length, batch_size=args.batch_size, dtype=args.dtype,
                shard_tokens=args.shard_tokens, pack=args.pack, drop_special=args.drop_special,
                skip_tokens=args.skip_tokens, text_field=args.text_field, stop_early=not args.full_forward,
                resume=True, overwrite=args.overwrite, progress=not args.quiet,
                input_hook=(args.input_hook or args.hook) if args.transcode or args.input_hook else None)
    run = m.get("last_run", {})
    print(f"{m['n_tokens']} tokens x d_in={m['d_in']} ({m['dtype']}) in {len(m['shards'])} shard(s) -> {args.out}"
          + (f"; this run {run['tokens']} tokens at {run['tokens_per_s']:.0f} tok/s" if run else ""))
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("harvest", help="collect a transformers model's activations at a hook into shards")
    add_text_arguments(p)
    p.add_argument("--out", required=True, help="output folder (resumed if it holds an unfinished harvest)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="dtype on disk")
    p.add_argument("--shard-tokens", type=int, default=1 << 16, help="tokens per shard (default 65536)")
    p.add_argument("--overwrite", action="store_true", help="discard what --out holds instead of resuming")
    p.add_argument("--full-forward", action="store_true",
                   help="run the whole model instead of stopping after the hooked module")
    p.add_argument("--transcode", action="store_true",
                   help="harvest transcoder pairs: the hooked module's input and output side by side")
    p.add_argument("--input-hook", default=None,
                   help="with --transcode: take the input of this module instead (e.g. the MLP's first layer "
                        "when --hook is its last)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_harvest)
