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

One job a module: :mod:`fastsae.activations.text` (text sources, contexts, batches), :mod:`fastsae.activations.models`
(loading a model, hooks, :class:`Capture`), :mod:`fastsae.activations.shards` (``harvest`` to disk and its
manifest), :mod:`fastsae.activations.streaming` (``ActivationStream``), and here the ``harvest`` CLI. Every name
is importable from ``fastsae.activations``.
"""
from __future__ import annotations

# The package's submodules, one job each; every name stays importable from fastsae.activations.
from .models import (Capture, _check_positive, _prepare,  # noqa: F401
                     hooked_tensor, load_model, model_device, replace_output, resolve_hook)
from .shards import (FORMAT, FORMAT_VERSION, MANIFEST, RESUME_KEYS, harvest, open_shards,  # noqa: F401
                     read_manifest, write_manifest)
from .streaming import ActivationStream, stream  # noqa: F401
from .text import (JSONL_SUFFIXES, PIECE_CHARS, TEXT_SUFFIXES, Batch, Template, TextSource,  # noqa: F401
                   describe_text_source, iter_batches, iter_contexts, iter_documents, kept_tokens, make_batch,
                   tokenizer_template)


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
