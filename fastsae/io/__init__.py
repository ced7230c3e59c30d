"""Save and load SAEs.

Own format: a directory with ``config.json`` (``{"fastsae": 1, "architecture": ..., constructor args}``)
and ``sae.safetensors`` (the state dict). Files are written to a temporary name and renamed, so a
crash never leaves a half-written SAE behind.

:func:`load` also reads the layouts of other libraries, mapped onto fastsae modules so that the
outputs equal those libraries' own forward passes:

- SAELens folders: ``cfg.json`` + ``sae_weights.safetensors`` (architectures ``standard`` -> ReLUSAE,
  ``topk`` -> TopKSAE, ``jumprelu`` -> JumpReLUSAE, ``gated`` -> GatedSAE; pre-6.0 configs too).
- EleutherAI sparsify folders: ``cfg.json`` + ``sae.safetensors`` (``encoder.weight [num_latents, d_in]``,
  ``encoder.bias``, ``W_dec [num_latents, d_in]``, ``b_dec``) -> TopKSAE with ``b_dec`` subtracted from the input.
- Gemma Scope ``params.npz`` (``W_enc [d_in, d_sae]``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``) -> JumpReLUSAE.
- dictionary_learning trainer folders (``ae.pt`` + ``config.json``): every dictionary class as the architecture
  it trained (standard/April-update ReLU, gated, JumpReLU, TopK, BatchTopK, Matryoshka BatchTopK). ``ae.pt`` is a
  ``torch.save`` zip, read by :mod:`fastsae.torchfile` without unpickling.

``save(sae, path, format=...)`` writes the own format, or SAELens 6.x / sparsify folders whose own loaders give
this module's outputs (:func:`saelens_parts`, :func:`sparsify_parts`); :func:`to_saelens` / :func:`from_saelens`
convert in memory when sae-lens is importable.

A corrupt or truncated file raises ``ValueError`` naming the file; a folder in none of these layouts
raises ``FileNotFoundError`` saying what was expected.

Nothing here can execute code from a file: tensors are read by one validating safetensors reader
(:func:`read_safetensors`: every offset checked against the file, read with ordinary reads, never
memory-mapped), ``.npz``/``.npy`` with ``allow_pickle=False``, ``torch.save`` files by an opcode interpreter
that builds only dicts and tensors (:mod:`fastsae.torchfile`), everything else is JSON whose every field is
type-checked (:func:`sae_from_config`).

One job a module: :mod:`fastsae.io.files` (the one atomic writer :func:`atomic_write`, the safetensors reader
and writer, readers whose every failure names the file), :mod:`fastsae.io.native` (the own format, its config
checks, and the tensors + JSON form of optimizer state used by training checkpoints), :mod:`fastsae.io.peers`
(the other libraries' layouts), and here the front door: :func:`save`, :func:`detect_format`, :func:`load`, the
format registry (:func:`register_format`) and ``fastsae export``. Every name is importable from ``fastsae.io``.
"""
from __future__ import annotations

import json
import os  # noqa: F401  (fastsae.io.os: tests reach os.fsync through it to simulate a full disk)
from pathlib import Path
from typing import Callable, Optional

import torch

from .._saver import register_saver

# The package's submodules, one job each; every name stays importable from fastsae.io, where it always was.
from .files import (MAX_HEADER_BYTES, SafetensorsHeader, TensorInfo, atomic_write, atomic_write_bytes,  # noqa: F401
                    read_exact, read_json, read_safetensors, read_safetensors_header, write_safetensors)
from .native import (CONFIG, DTYPES, FORMAT_VERSION, WEIGHTS, _check_device, _load_own, pack_optimizer,  # noqa: F401
                     sae_from_config, unpack_optimizer)
from .peers import (DICTIONARY_LEARNING_CLASSES, DL_CONFIG, DL_WEIGHTS, GEMMA_SCOPE, SAELENS_CONFIG,  # noqa: F401
                    SAELENS_TRANSCODERS, SAELENS_VERSION, SAELENS_WEIGHTS, SPARSIFY_CONFIG, SPARSIFY_WEIGHTS,
                    _load_dictionary_learning, _load_gemma_scope, _load_saelens, _load_sparsify, from_saelens,
                    saelens_parts, saelens_to_fastsae, sparsify_parts, to_saelens)


#: what ``sae.save(path, format=...)`` writes
SAVE_FORMATS = ("fastsae", "saelens", "sparsify")


def save(sae, path, format: str = "fastsae", metadata: Optional[dict] = None) -> Path:
    """Write ``sae`` to the folder ``path`` in ``format`` (:data:`SAVE_FORMATS`); every file atomically.

    ``"fastsae"``: ``config.json`` + ``sae.safetensors`` (exact round trip). ``"saelens"``: a SAELens 6.x folder
    (``cfg.json`` + ``sae_weights.safetensors``) that ``sae_lens.SAE.load_from_disk`` reads with outputs equal to
    this module's (:func:`saelens_parts`). ``"sparsify"``: an EleutherAI sparsify folder (``cfg.json`` +
    ``sae.safetensors``), TopK only (:func:`sparsify_parts`). ``metadata`` (JSON values) goes into SAELens'
    ``cfg.json`` ``metadata`` (e.g. ``model_name``, ``hook_name``, which SAELens uses to attach the SAE).
    """
    if format not in SAVE_FORMATS:
        raise ValueError(f"format must be one of {list(SAVE_FORMATS)}, got {format!r}")
    if metadata is not None and format != "saelens":
        raise ValueError(f"metadata is written only with format='saelens', not {format!r}")
    path = Path(path)
    if format == "saelens":
        cfg, tensors = saelens_parts(sae, metadata)
        cfg_name, weights_name = SAELENS_CONFIG, SAELENS_WEIGHTS
    elif format == "sparsify":
        cfg, tensors = sparsify_parts(sae)
        cfg_name, weights_name = SPARSIFY_CONFIG, SPARSIFY_WEIGHTS
    else:
        cfg, tensors = dict(fastsae=FORMAT_VERSION, **sae.config()), sae.state_dict()
        cfg_name, weights_name = CONFIG, WEIGHTS
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / weights_name, {k: v.detach().contiguous() for k, v in tensors.items()})
    atomic_write_bytes(path / cfg_name, json.dumps(cfg, indent=2).encode())
    return path


register_saver(save)  # SAE.save calls it: fastsae.sae imports no io (ARCHITECTURE.md, registries)


def detect_format(path) -> str:
    """``"fastsae"``, ``"saelens"``, ``"sparsify"``, ``"dictionary_learning"`` or ``"gemma_scope"`` for a file
    or folder."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".npz":
            return "gemma_scope"
        if path.suffix == ".pt":
            return "dictionary_learning"
        raise ValueError(f"{path} is a file fastsae cannot load as an SAE: pass its folder, a Gemma Scope "
                         f"params.npz or a dictionary_learning ae.pt")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    has = lambda name: (path / name).is_file()  # noqa: E731
    if has(CONFIG) and has(WEIGHTS):
        return "fastsae"
    if has(DL_CONFIG) and has(DL_WEIGHTS):
        return "dictionary_learning"
    if has(SAELENS_CONFIG) and has(SAELENS_WEIGHTS):
        return "saelens"
    if has(SPARSIFY_CONFIG) and has(SPARSIFY_WEIGHTS):
        return "sparsify"
    if has(GEMMA_SCOPE):
        return "gemma_scope"
    raise FileNotFoundError(
        f"{path} is not a saved SAE: expected {CONFIG} + {WEIGHTS} (fastsae), {SAELENS_CONFIG} + "
        f"{SAELENS_WEIGHTS} (SAELens), {SPARSIFY_CONFIG} + {SPARSIFY_WEIGHTS} (sparsify), {DL_CONFIG} + {DL_WEIGHTS} "
        f"(dictionary_learning) or {GEMMA_SCOPE} (Gemma Scope)")


def load(path, *, device=None, backend: str = "auto"):
    """Load an SAE: a folder written by ``sae.save``, a SAELens or sparsify folder, a dictionary_learning trainer
    folder (``ae.pt`` + ``config.json``, or one ``.pt`` checkpoint), or a Gemma Scope ``params.npz`` (or a folder
    holding one). Returns the matching fastsae module in eval mode.

    Nothing read can execute code (no pickle anywhere); a malformed config or weights file raises ValueError
    naming the file and the field, before the module is allocated."""
    _check_device(device)
    path = Path(path)
    for detect, read in _FORMATS.values():  # registered from above (fastsae.distributed: sharded checkpoints)
        if detect(path):
            return read(path, device=device, backend=backend).eval()
    fmt = detect_format(path)
    if fmt == "fastsae":
        sae = _load_own(path, backend)
    elif fmt == "saelens":
        sae = _load_saelens(path, backend)
    elif fmt == "sparsify":
        sae = _load_sparsify(path, backend)
    elif fmt == "dictionary_learning":
        sae = _load_dictionary_learning(path, backend)
    else:
        sae = _load_gemma_scope(path if path.is_file() else path / GEMMA_SCOPE, backend)
    sae.eval()
    return sae.to(device) if device is not None else sae


#: Formats that modules above this one register (:func:`register_format`): name -> (detect, load). :func:`load`
#: tries them before the built-in layouts, so io imports none of the modules that read them.
_FORMATS: dict[str, tuple[Callable[[Path], bool], Callable[..., object]]] = {}


def register_format(name: str, detect: Callable[[Path], bool], load: Callable[..., object]) -> None:
    """Teach :func:`load` another layout: ``detect(path)`` is true for a ``Path`` holding it, and
    ``load(path, *, device, backend)`` returns the module. Registering a name again replaces it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not callable(detect) or not callable(load):
        raise TypeError(f"detect and load must be callables, got {detect!r} and {load!r}")
    _FORMATS[name] = (detect, load)

# ----------------------------------------------------------------------------------------------
# `fastsae export`
# ----------------------------------------------------------------------------------------------


def cmd_export(args) -> int:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {out} is not empty; pass --overwrite to replace the SAE files in it")
    sae = load(args.sae)
    if args.overwrite and out.is_dir():  # a stale file of another layout would change what detect_format sees
        for name in {CONFIG, WEIGHTS, SAELENS_CONFIG, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, DL_WEIGHTS}:
            (out / name).unlink(missing_ok=True)
    metadata = {k: v for k, v in (("model_name", args.model_name), ("hook_name", args.hook_name)) if v}
    save(sae, out, format=args.format, metadata=metadata or None if args.format == "saelens" else None)
    back = load(out)
    x = torch.randn(64, sae.d_in, generator=torch.Generator().manual_seed(0), dtype=sae.dtype)
    with torch.no_grad():
        err = float((back(x) - sae(x)).abs().max())
    print(f"{type(sae).__name__}(d_in={sae.d_in}, d_sae={sae.d_sae}) from {args.sae} -> {out} ({args.format}); "
          f"reloaded by fastsae: max |difference| {err:.3g} on 64 random inputs")
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("export", help="write a saved SAE (any format fastsae reads) as a SAELens or sparsify folder")
    p.add_argument("--sae", required=True, help="SAE folder or file: fastsae, SAELens, sparsify, dictionary_learning, "
                   "Gemma Scope")
    p.add_argument("--format", required=True, choices=list(SAVE_FORMATS), help="layout to write")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--hook-name", default=None, help="SAELens metadata.hook_name (e.g. blocks.6.hook_resid_post)")
    p.add_argument("--model-name", default=None, help="SAELens metadata.model_name")
    p.add_argument("--overwrite", action="store_true", help="replace the SAE files in a non-empty --out")
    p.set_defaults(func=cmd_export)
