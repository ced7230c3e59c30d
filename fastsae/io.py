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

A corrupt or truncated file raises ``ValueError`` naming the file; a folder in none of these layouts
raises ``FileNotFoundError`` saying what was expected.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "sae.safetensors"
SAELENS_CONFIG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
SPARSIFY_CONFIG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"
GEMMA_SCOPE = "params.npz"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save(sae, path) -> Path:
    from safetensors.torch import save as st_save

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    atomic_write_bytes(path / WEIGHTS, st_save(tensors))
    cfg = dict(fastsae=FORMAT_VERSION, **sae.config())
    atomic_write_bytes(path / CONFIG, json.dumps(cfg, indent=2).encode())
    return path


def detect_format(path) -> str:
    """``"fastsae"``, ``"saelens"``, ``"sparsify"`` or ``"gemma_scope"`` for a file or folder."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".npz":
            return "gemma_scope"
        raise ValueError(f"{path} is a file fastsae cannot load as an SAE: pass its folder, or a Gemma Scope "
                         f"params.npz")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    has = lambda name: (path / name).is_file()  # noqa: E731
    if has(CONFIG) and has(WEIGHTS):
        return "fastsae"
    if has(SAELENS_CONFIG) and has(SAELENS_WEIGHTS):
        return "saelens"
    if has(SPARSIFY_CONFIG) and has(SPARSIFY_WEIGHTS):
        return "sparsify"
    if has(GEMMA_SCOPE):
        return "gemma_scope"
    raise FileNotFoundError(
        f"{path} is not a saved SAE: expected {CONFIG} + {WEIGHTS} (fastsae), {SAELENS_CONFIG} + "
        f"{SAELENS_WEIGHTS} (SAELens), {SPARSIFY_CONFIG} + {SPARSIFY_WEIGHTS} (sparsify) or {GEMMA_SCOPE} (Gemma Scope)")


def load(path, *, device=None, backend: str = "auto"):
    """Load an SAE: a folder written by ``sae.save``, a SAELens or sparsify folder, or a Gemma Scope
    ``params.npz`` (or a folder holding one). Returns the matching fastsae module in eval mode."""
    path = Path(path)
    if (path / "shards.json").is_file():  # latent-sharded checkpoint: fastsae.distributed.save_sharded
        from .distributed import load_sharded
        return load_sharded(path, device=device, backend=backend).eval()
    fmt = detect_format(path)
    if fmt == "fastsae":
        sae = _load_own(path, backend)
    elif fmt == "saelens":
        sae = _load_saelens(path, backend)
    elif fmt == "sparsify":
        sae = _load_sparsify(path, backend)
    else:
        sae = _load_gemma_scope(path if path.is_file() else path / GEMMA_SCOPE, backend)
    sae.eval()
    return sae.to(device) if device is not None else sae


# ----------------------------------------------------------------------------------------------
# Readers that turn every failure into a ValueError naming the file
# ----------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError, OSError, ...: truncated or not safetensors at all
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def _read_npz(path: Path) -> dict[str, Tensor]:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: torch.from_numpy(np.array(z[k])) for k in z.files}
    except Exception as e:  # BadZipFile, EOFError, ValueError, ...
        raise ValueError(f"{path} is not a readable .npz file: {e}") from e


def _need(state: dict, key: str, path: Path, shape: Optional[tuple] = None) -> Tensor:
    if key not in state:
        raise ValueError(f"{path} has no tensor {key!r} (found {sorted(state)})")
    t = state[key]
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{path}: {key} must have shape {list(shape)}, got {list(t.shape)}")
    return t


def _cfg_int(cfg: dict, key: str, path: Path) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{path}: {key!r} must be a positive integer, got {v!r}")
    return v


def _fill(sae, state: dict[str, Tensor], path: Path):
    """Copy ``state`` into ``sae`` (strict), in the module's dtypes."""
    own = sae.state_dict()
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"{path}: {k} has shape {list(v.shape)}, expected {list(own[k].shape)}")
    try:
        sae.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path} does not match the SAE it describes: {e}") from e
    return sae


# ----------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------


def _load_own(path: Path, backend: str):
    from .sae import ARCHITECTURES

    cfg_path, weights_path = path / CONFIG, path / WEIGHTS
    cfg = dict(_read_json(cfg_path))
    state = _read_safetensors(weights_path)
    cfg.pop("fastsae", None)
    arch = cfg.pop("architecture", None)
    if arch not in ARCHITECTURES:
        raise ValueError(f"{cfg_path}: unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}")
    try:
        dtype = getattr(torch, cfg.pop("dtype", "float32"))
        d_in, d_sae = cfg.pop("d_in"), cfg.pop("d_sae")
        cls = ARCHITECTURES[arch]
        args = (d_in, d_sae, cfg.pop("k")) if "k" in cfg else (d_in, d_sae)
        sae = cls(*args, **cfg, dtype=dtype, backend=backend)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"{cfg_path} does not describe a valid {arch} SAE: {e}") from e
    return _fill(sae, state, weights_path)


def _dtype_of(state: dict[str, Tensor]) -> torch.dtype:
    for v in state.values():
        if v.is_floating_point():
            return v.dtype
    return torch.float32


def _load_saelens(path: Path, backend: str):
    """SAELens (``sae_lens.SAE.save_model``): ``process_sae_in`` subtracts ``b_dec`` when
    ``apply_b_dec_to_input``; standard: ``relu(pre)``; topk: ``relu`` of the top-k of ``pre``;
    jumprelu: ``relu(pre) · 1[pre > θ]``; gated: as in the paper; decode ``f @ W_dec + b_dec``."""
    from .sae import GatedSAE, JumpReLUSAE, ReLUSAE, TopKSAE

    cfg_path, weights_path = path / SAELENS_CONFIG, path / SAELENS_WEIGHTS
    cfg = _read_json(cfg_path)
    state = _read_safetensors(weights_path)
    d_in, d_sae = _cfg_int(cfg, "d_in", cfg_path), _cfg_int(cfg, "d_sae", cfg_path)
    norm = cfg.get("normalize_activations", "none")
    # "expected_average_only_in" is folded into the weights by SAELens before saving; at inference it is
    # the identity in SAELens' own forward, as are "none"/None/False.
    if norm not in ("none", None, False, "expected_average_only_in"):
        raise ValueError(f"{cfg_path}: normalize_activations={norm!r} (a per-token normalisation) has no fastsae "
                         "equivalent; only 'none' and 'expected_average_only_in' load")
    arch = cfg.get("architecture", "standard")
    act = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    if arch == "standard" and act == "topk":  # pre-6.0 TopK SAEs
        arch = "topk"
    elif arch == "standard" and act not in ("relu", None):
        raise ValueError(f"{cfg_path}: activation_fn={act!r} is not supported (relu or topk)")
    b_dec_in = bool(cfg.get("apply_b_dec_to_input", True))
    dtype = _dtype_of(state)
    W_enc = _need(state, "W_enc", weights_path, (d_in, d_sae))
    W_dec = _need(state, "W_dec", weights_path, (d_sae, d_in)).clone()
    b_dec = _need(state, "b_dec", weights_path, (d_in,))
    scale = state.get("finetuning_scaling_factor", state.get("scaling_factor"))
    if scale is not None:
        # decode is (f * scale) @ W_dec: fold the per-latent scale into the decoder rows.
        W_dec = W_dec * _need({"s": scale}, "s", weights_path, (d_sae,)).to(W_dec.dtype)[:, None]
    common = dict(apply_b_dec_to_input=b_dec_in, dtype=dtype, backend=backend)
    out = dict(W_enc=W_enc, W_dec=W_dec, b_dec=b_dec)
    if arch == "standard":
        sae = ReLUSAE(d_in, d_sae, **common)
        out["b_enc"] = _need(state, "b_enc", weights_path, (d_sae,))
    elif arch == "topk":
        k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
        if cfg.get("rescale_acts_by_decoder_norm"):
            raise ValueError(f"{cfg_path}: rescale_acts_by_decoder_norm=True is not supported")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_sae:
            raise ValueError(f"{cfg_path}: a topk SAE needs k in 1..d_sae={d_sae}, got {k!r}")
        sae = TopKSAE(d_in, d_sae, k, **common)
        out["b_enc"] = _need(state, "b_enc", weights_path, (d_sae,))
    elif arch == "jumprelu":
        sae = JumpReLUSAE(d_in, d_sae, **common)
        out["b_enc"] = _need(state, "b_enc", weights_path, (d_sae,))
        if "threshold" in state:
            th = _need(state, "threshold", weights_path, (d_sae,))
        else:  # a SAELens training checkpoint stores log θ
            th = _need(state, "log_threshold", weights_path, (d_sae,)).exp()
        # relu(pre)·1[pre > θ] == pre·1[pre > max(θ, 0)]: clamping makes a negative θ exact too.
        out["threshold"] = th.clamp_min(0)
    elif arch == "gated":
        sae = GatedSAE(d_in, d_sae, **common)
        for key in ("b_gate", "r_mag", "b_mag"):
            out[key] = _need(state, key, weights_path, (d_sae,))
    else:
        raise ValueError(f"{cfg_path}: SAELens architecture {arch!r} is not supported "
                         "(standard, topk, jumprelu, gated)")
    return _fill_partial(sae, out, weights_path)


def _fill_partial(sae, tensors: dict[str, Tensor], path: Path):
    """Load the tensors a foreign format provides; the module's other state (e.g. bandwidth) keeps its defaults."""
    state = sae.state_dict()
    if "threshold" in tensors and "threshold" not in state and "log_threshold" in state:
        tensors = dict(tensors, log_threshold=tensors.pop("threshold").clamp_min(1e-38).log())
    for k, v in tensors.items():
        state[k] = v.to(state[k].dtype)
    return _fill(sae, state, path)


def _load_sparsify(path: Path, backend: str):
    """EleutherAI sparsify ``SparseCoder``: ``pre = relu(encoder(x - b_dec))``, keep the top k,
    ``x̂ = Σ acts · W_dec[idx] + b_dec``."""
    from .sae import TopKSAE

    cfg_path, weights_path = path / SPARSIFY_CONFIG, path / SPARSIFY_WEIGHTS
    cfg = _read_json(cfg_path)
    state = _read_safetensors(weights_path)
    for flag in ("transcode", "skip_connection"):
        if cfg.get(flag):
            raise ValueError(f"{cfg_path}: {flag}=True is not supported (fastsae loads autoencoders only)")
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{cfg_path}: activation={cfg.get('activation')!r} is not supported (topk only)")
    W = _need(state, "encoder.weight", weights_path)
    if W.dim() != 2:
        raise ValueError(f"{weights_path}: encoder.weight must be 2-D, got shape {list(W.shape)}")
    d_sae, d_in = W.shape
    if "d_in" in cfg and cfg["d_in"] != d_in:
        raise ValueError(f"{cfg_path} says d_in={cfg['d_in']} but encoder.weight has {d_in} columns")
    k = cfg.get("k")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_sae:
        raise ValueError(f"{cfg_path}: k must lie in 1..num_latents={d_sae}, got {k!r}")
    sae = TopKSAE(d_in, d_sae, k, apply_b_dec_to_input=True, dtype=_dtype_of(state), backend=backend)
    out = dict(
        W_enc=W.t().contiguous(),
        b_enc=_need(state, "encoder.bias", weights_path, (d_sae,)),
        W_dec=_need(state, "W_dec", weights_path, (d_sae, d_in)),
        b_dec=_need(state, "b_dec", weights_path, (d_in,)),
    )
    return _fill_partial(sae, out, weights_path)


def _load_gemma_scope(path: Path, backend: str):
    """Gemma Scope: ``pre = x @ W_enc + b_enc``, ``f = relu(pre) · 1[pre > threshold]``, ``x̂ = f @ W_dec + b_dec``."""
    from .sae import JumpReLUSAE

    raw = _read_npz(path)
    state = {("W_" + k[2:] if k.startswith("w_") else k): v for k, v in raw.items()}
    W_enc = _need(state, "W_enc", path)
    if W_enc.dim() != 2:
        raise ValueError(f"{path}: W_enc must be 2-D, got shape {list(W_enc.shape)}")
    d_in, d_sae = W_enc.shape
    sae = JumpReLUSAE(d_in, d_sae, apply_b_dec_to_input=False, dtype=_dtype_of(state), backend=backend)
    out = dict(
        W_enc=W_enc,
        W_dec=_need(state, "W_dec", path, (d_sae, d_in)),
        b_enc=_need(state, "b_enc", path, (d_sae,)),
        b_dec=_need(state, "b_dec", path, (d_in,)),
        threshold=_need(state, "threshold", path, (d_sae,)).clamp_min(0),
    )
    return _fill_partial(sae, out, path)
