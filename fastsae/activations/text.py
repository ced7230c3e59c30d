"""Text sources and their tokenisation: documents from files, folders, ``"module:attribute"`` strings or
iterables (see :mod:`fastsae.activations`), cut into fixed-length contexts with the model's own special tokens
and grouped into padded :class:`Batch` es that say which positions are data."""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import torch
from torch import Tensor

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
# A plain text file is read in pieces of about this many characters, cut at line ends, so a
# multi-gigabyte file never sits in memory; pieces of one file are one document (no separator).
PIECE_CHARS = 1 << 20

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
