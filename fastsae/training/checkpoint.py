"""A run's state and its files: the run's file names, :class:`TrainResult`, the loop's state (metric sums,
dead-latent counters), atomic checkpoints (safetensors + JSON, no pickle: RNG, module, optimizer) and restoring
a run from one exactly, the first state of a fresh run (input scale, ``b_dec`` from the data)."""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..data import ActivationSource
from ..sae import SAE, TrainOutput
from .hyperparameters import estimate_input_scale, geometric_median
from .step import _row_width, _split


CHECKPOINT = "checkpoint.safetensors"
OLD_CHECKPOINT = "checkpoint.pt"  # the pickle format before version 2: refused, never read
METRICS = "metrics.jsonl"
#: what each metrics record holds, in the order accumulated per step
_SUMS = ("loss", "mse", "fvu", "l0", "sparsity", "aux")


# ----------------------------------------------------------------------------------------------
# State, metrics, checkpoints
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What :func:`train` returns. ``sae`` works on raw activations (the input scale is folded in)."""

    sae: SAE
    metrics: list  # one dict per logged step (also written as JSON lines)
    input_scale: float
    steps: int  # steps completed
    tokens: int
    seconds: float  # wall time of this call
    run_tokens: int = 0  # tokens trained on by this call (after a resume: only the new ones)

    @property
    def final(self) -> dict:
        return self.metrics[-1] if self.metrics else {}


@dataclass
class _State:
    step: int
    tokens: int
    scale: float
    since_fired: Tensor  # [d_sae] int64: tokens since each latent last fired
    sums: Tensor  # [len(_SUMS)] float64 metric sums since the last log
    n_summed: int
    metrics: list = field(default_factory=list)
    target_scale: Optional[float] = None  # a transcoder's targets' own scale (None: the input scale)
    resampled: int = 0  # latents resampled so far (fastsae/resample.py)


# A checkpoint is one safetensors file: every tensor (module parameters and *all* buffers, persistent or not;
# optimizer state; RNG states as bytes; the loop's counters) under a structured name, and everything else as
# JSON in the header's metadata. One file, so one rename makes a new checkpoint visible all at once, and
# nothing in it can execute code when read (the old pickle format is refused, never unpickled).
CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "fastsae-checkpoint", 2
_META_KEY = "fastsae.checkpoint"


def _rng_state(tensors: dict) -> dict:
    """The RNG states: generator bytes as uint8 tensors into ``tensors``, their small scalars returned as JSON."""
    tensors["rng.torch"] = torch.get_rng_state()
    n_cuda = 0
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
            n_cuda += 1
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype="<u4").view(np.uint8).copy())
    version, internal, gauss_next = random.getstate()
    tensors["rng.python"] = torch.from_numpy(np.asarray(internal, dtype="<u4").view(np.uint8).copy())
    return dict(numpy=dict(name=name, pos=int(pos), has_gauss=int(has_gauss), cached_gaussian=float(cached)),
                python=dict(version=version, gauss_next=gauss_next), cuda=n_cuda)


def _set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    m = meta["numpy"]
    np.random.set_state((m["name"], tensors["rng.numpy"].numpy().view("<u4").astype(np.uint32), m["pos"],
                         m["has_gauss"], m["cached_gaussian"]))
    py = meta["python"]
    random.setstate((py["version"], tuple(int(v) for v in tensors["rng.python"].numpy().view("<u4")),
                     py["gauss_next"]))
    if meta.get("cuda") and torch.cuda.is_available():
        n = min(meta["cuda"], torch.cuda.device_count())
        torch.cuda.set_rng_state_all([tensors[f"rng.cuda.{i}"] for i in range(n)])


def _module_tensors(module: torch.nn.Module) -> dict[str, Tensor]:
    """Every parameter and every buffer, persistent or not (running statistics such as the adaptive bandwidth's,
    controllers' state: whatever a module registers round-trips without the module doing anything)."""
    out = {f"module.{n}": p for n, p in module.named_parameters()}
    out.update((f"module.{n}", b) for n, b in module.named_buffers())
    return out


def _module_counters(module: torch.nn.Module) -> dict:
    """Private int/float/bool attributes of each submodule (e.g. ``_observed``, a step counter): state too."""
    out = {}
    for name, mod in module.named_modules():
        found = {k: v for k, v in vars(mod).items()
                 if k.startswith("_") and not k.startswith("__") and type(v) in (int, float, bool)}
        if found:
            out[name] = found
    return out


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write ``payload`` (from :func:`_payload`) atomically: a crash or a full disk leaves the previous checkpoint."""
    from ..io import write_safetensors

    write_safetensors(path, payload["tensors"], {_META_KEY: json.dumps(payload["meta"])})


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's JSON fields, with its tensors under ``"tensors"``. Refuses (ValueError naming the file) an
    old pickle checkpoint without unpickling it, and any file that is not a fastsae checkpoint."""
    from ..io import read_safetensors

    path = Path(path)
    old = ValueError(f"{path} is a checkpoint in the old pickle format, which fastsae no longer reads (loading a "
                     "pickle can execute code). Start the run afresh (fastsae train --overwrite), or finish it with "
                     "the fastsae version that wrote it")
    if path.suffix == ".pt":
        raise old
    try:
        tensors, metadata = read_safetensors(path)
    except ValueError as e:
        with open(path, "rb") as fh:
            magic = fh.read(2)
        if magic == b"PK" or magic[:1] == b"\x80":  # torch.save's zip container or a bare pickle
            raise old from e
        raise
    try:
        meta = json.loads(metadata[_META_KEY])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path} is not a fastsae checkpoint (no valid {_META_KEY!r} metadata)") from e
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a fastsae checkpoint")
    if meta.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is a fastsae checkpoint of version {meta.get('version')!r}; this fastsae reads "
                         f"version {CHECKPOINT_VERSION}")
    return dict(meta, tensors=tensors)


def _accumulate(state: _State, out: TrainOutput) -> None:
    vals = torch.stack([out.loss.detach(), out.mse.detach(), out.fvu, out.l0,
                        out.sparsity.detach(), out.aux.detach()]).to(torch.float64)
    state.sums += vals.to(state.sums.device)
    state.n_summed += 1


def reduce_metrics(state: _State) -> dict:
    """Means of the metric sums since the last log (a distributed trainer all-reduces ``state.sums`` here)."""
    means = (state.sums / max(state.n_summed, 1)).tolist()
    state.sums.zero_()
    state.n_summed = 0
    return dict(zip(_SUMS, means))


def _dead_mask(state: _State, dead_after: int) -> Tensor:
    return state.since_fired >= dead_after


def _update_dead(state: _State, out: TrainOutput, n_tokens: int) -> None:
    fired = out.fired.to(state.since_fired.device)
    state.since_fired = torch.where(fired, torch.zeros_like(state.since_fired), state.since_fired + n_tokens)


def _fresh_state(sae: SAE, source: ActivationSource, seed: int, scale_inputs: bool, input_scale, init_b_dec,
                 device) -> _State:
    sample = target_sample = None
    transcoder = getattr(sae, "is_transcoder", False)
    # a transcoder's targets get their own scale, estimated even when the input scale is given
    if scale_inputs and (input_scale is None or transcoder) or init_b_dec:
        sample = source.sample(16384, seed).to(torch.float64)
        if sample.shape[-1] != _row_width(sae):
            raise ValueError(f"data has d_in={sample.shape[-1]} but the SAE has d_in={sae.d_in}")
        # a transcoder: the scale comes from the input side, b_dec (the output bias) from the target side
        sample, target_sample = _split(sample, sae)
    if not scale_inputs:
        scale = 1.0
    elif input_scale is not None:
        scale = float(input_scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"input_scale must be a positive finite number, got {input_scale}")
    else:
        scale = estimate_input_scale(sample)
    # a transcoder's targets get their own scale (an MLP's output can be far smaller than its input)
    target_scale = estimate_input_scale(target_sample) if target_sample is not None and scale_inputs else None
    if init_b_dec:
        if target_sample is not None:
            b_sample, scale_b = target_sample, (1.0 if target_scale is None else target_scale)
        else:
            b_sample, scale_b = sample, scale
        if not bool(torch.isfinite(b_sample).all()):
            raise FloatingPointError("data contains NaN or inf values (found while initialising b_dec)")
        with torch.no_grad():
            sae.b_dec.copy_(geometric_median(b_sample * scale_b).to(sae.b_dec))
    if sample is not None:
        sae.init_from_data((sample * scale).to(device=sae.device, dtype=sae.dtype))
    return _State(step=0, tokens=0, scale=scale, target_scale=target_scale,
                  since_fired=torch.zeros(sae.d_sae, dtype=torch.int64, device=device),
                  sums=torch.zeros(len(_SUMS), dtype=torch.float64, device=device), n_summed=0)


def _payload(state: _State, sae: SAE, optimizer, config: dict, seed: int) -> dict:
    from ..io import pack_optimizer

    tensors = _module_tensors(sae)
    opt_tensors, opt_meta = pack_optimizer(optimizer, prefix="optimizer.")
    tensors.update(opt_tensors)
    rng = _rng_state(tensors)
    tensors.update({"train.since_fired": state.since_fired, "train.sums": state.sums})
    meta = dict(format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, config=config, step=state.step,
                tokens=state.tokens, scale=state.scale, target_scale=state.target_scale, n_summed=state.n_summed,
                metrics=state.metrics, resampled=state.resampled,
                counters=_module_counters(sae), optimizer=opt_meta, rng=rng, data=dict(seed=seed, rows=state.tokens),
                density=sae.ops().density.state(sae.W_enc))
    return dict(step=state.step, tensors=tensors, meta=meta)


def _restore(path: Path, sae: SAE, optimizer, config: dict, device) -> _State:
    """Load a checkpoint into ``sae``, ``optimizer`` and the RNGs, exactly; anything that does not fit this module
    (architecture, shapes, dtypes, the set of tensors) or is malformed raises ValueError naming ``path``."""
    import warnings

    from ..io import unpack_optimizer

    ck = load_checkpoint(path)
    tensors = ck["tensors"]
    try:
        saved, mine = ck["config"]["sae"], sae.config()
        for key in ("architecture", "d_in", "d_sae", "dtype"):
            if saved.get(key) != mine.get(key):
                raise ValueError(f"{path} was written for an SAE with {key}={saved.get(key)!r}, not {mine.get(key)!r}")
        changed = {k: (saved.get(k), mine.get(k)) for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k)}
        changed.update({k: (ck["config"].get(k), config.get(k)) for k in ("steps", "batch_size", "seed")
                        if ck["config"].get(k) != config.get(k)})
        for key, (old, new) in changed.items():
            warnings.warn(f"resuming {path} with {key}={new!r} (the checkpoint used {old!r}): the run will not "
                          "match an uninterrupted one", stacklevel=3)
        own = _module_tensors(sae)
        stored = {k for k in tensors if k.startswith("module.")}
        if stored != set(own):
            raise ValueError(f"{path} holds the state of another module: missing {sorted(set(own) - stored)}, "
                             f"unexpected {sorted(stored - set(own))}")
        for name, t in own.items():
            if tensors[name].shape != t.shape or tensors[name].dtype != t.dtype:
                raise ValueError(f"{path}: {name} has shape {list(tensors[name].shape)} and dtype "
                                 f"{tensors[name].dtype}, the module's {list(t.shape)} and {t.dtype}")
        with torch.no_grad():
            for name, t in own.items():
                t.copy_(tensors[name])
        for mod_name, found in ck["counters"].items():
            mod = sae.get_submodule(mod_name)
            for key, value in found.items():
                if type(vars(mod).get(key)) is not type(value):
                    raise ValueError(f"{path}: counter {mod_name}.{key} does not exist on this module")
                setattr(mod, key, value)
        unpack_optimizer(optimizer, tensors, ck["optimizer"], path, prefix="optimizer.")
        _set_rng_state(tensors, ck["rng"])
        sae.ops().density.load_state(sae.W_enc, ck.get("density"))
        state = _State(step=ck["step"], tokens=ck["tokens"], scale=ck["scale"],
                       since_fired=tensors["train.since_fired"].to(device), sums=tensors["train.sums"].to(device),
                       n_summed=ck["n_summed"], metrics=list(ck["metrics"]), target_scale=ck.get("target_scale"),
                       resampled=ck.get("resampled", 0))
        for key in ("step", "tokens", "n_summed", "resampled"):
            if isinstance(getattr(state, key), bool) or not isinstance(getattr(state, key), int):
                raise ValueError(f"{path}: field {key!r} must be an integer")
        if not (isinstance(state.scale, (int, float)) and math.isfinite(state.scale) and state.scale > 0):
            raise ValueError(f"{path}: field 'scale' must be a positive number, got {state.scale!r}")
        if state.since_fired.shape != (sae.d_sae,) or state.sums.shape != (len(_SUMS),):
            raise ValueError(f"{path}: the loop's counters have the wrong shapes")
    except ValueError as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{path} is not a valid fastsae checkpoint: {e}") from e
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{path} is not a valid fastsae checkpoint: {type(e).__name__}: {e}") from e
    return state


def _truncate_metrics(path: Optional[Path], step: int) -> None:
    """Drop records written after the checkpoint (a crash between checkpoints would duplicate them)."""
    if path is None or not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            break  # a half-written last line
    path.write_text("".join(k + "\n" for k in keep))
