"""The layouts of other libraries, read into fastsae modules whose outputs equal those libraries' own forward
passes, and written back (see :mod:`fastsae.io` for the list): SAELens, EleutherAI sparsify, Gemma Scope
``params.npz``, dictionary_learning trainer folders; in-memory conversion to and from ``sae_lens.SAE``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .files import _cfg_int, _cfg_typed, _fill, _is_int, _need, _read_json, _read_npz, _read_safetensors

SAELENS_CONFIG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
SPARSIFY_CONFIG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"
GEMMA_SCOPE = "params.npz"


# ----------------------------------------------------------------------------------------------
# SAELens, sparsify, Gemma Scope
# ----------------------------------------------------------------------------------------------


def _dtype_of(state: dict[str, Tensor]) -> torch.dtype:
    for v in state.values():
        if v.is_floating_point():
            return v.dtype
    return torch.float32


def _load_saelens(path: Path, backend: str):
    cfg_path, weights_path = path / SAELENS_CONFIG, path / SAELENS_WEIGHTS
    return saelens_to_fastsae(_read_json(cfg_path), _read_safetensors(weights_path), cfg_path, weights_path, backend)


def saelens_to_fastsae(cfg: dict, state: dict[str, Tensor], cfg_path, weights_path, backend: str = "auto"):
    """The fastsae module of a SAELens config + state dict (``cfg_path``/``weights_path`` name them in errors).

    SAELens (``sae_lens.SAE``): ``process_sae_in`` subtracts ``b_dec`` when ``apply_b_dec_to_input``; standard:
    ``relu(pre)``; topk: ``relu`` of the top-k of ``pre``; jumprelu: ``relu(pre) · 1[pre > θ]``; gated: as in the
    paper; decode ``f @ W_dec + b_dec``."""
    from ..sae import GatedSAE, JumpReLUSAE, ReLUSAE, TopKSAE

    cfg_path, weights_path = Path(cfg_path), Path(weights_path)
    d_in, d_sae = _cfg_int(cfg, "d_in", cfg_path), _cfg_int(cfg, "d_sae", cfg_path)
    norm = _cfg_typed(cfg, "normalize_activations", cfg_path, (str, type(None), bool), "none")
    # "expected_average_only_in" is folded into the weights by SAELens before saving; at inference it is
    # the identity in SAELens' own forward, as are "none"/None/False.
    if norm not in ("none", None, False, "expected_average_only_in"):
        raise ValueError(f"{cfg_path}: normalize_activations={norm!r} (a per-token normalisation) has no fastsae "
                         "equivalent; only 'none' and 'expected_average_only_in' load")
    arch = _cfg_typed(cfg, "architecture", cfg_path, (str,), "standard")
    act_key = "activation_fn" if "activation_fn" in cfg else "activation_fn_str"
    act = _cfg_typed(cfg, act_key, cfg_path, (str, type(None)), "relu")
    if arch == "standard" and act == "topk":  # pre-6.0 TopK SAEs
        arch = "topk"
    elif arch == "standard" and act not in ("relu", None):
        raise ValueError(f"{cfg_path}: activation_fn={act!r} is not supported (relu or topk)")
    b_dec_in = _cfg_typed(cfg, "apply_b_dec_to_input", cfg_path, (bool,), True)
    dtype = _dtype_of(state)
    if arch in SAELENS_TRANSCODERS:
        return _saelens_transcoder(cfg, state, arch, d_in, d_sae, cfg_path, weights_path, dtype, backend)
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
        kwargs = _cfg_typed(cfg, "activation_fn_kwargs", cfg_path, (dict, type(None)), None) or {}
        k = cfg.get("k", kwargs.get("k"))
        if _cfg_typed(cfg, "rescale_acts_by_decoder_norm", cfg_path, (bool, type(None)), False):
            raise ValueError(f"{cfg_path}: rescale_acts_by_decoder_norm=True is not supported")
        if not _is_int(k) or not 1 <= k <= d_sae:
            raise ValueError(f"{cfg_path}: field 'k': a topk SAE needs k in 1..d_sae={d_sae}, got {k!r}")
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


#: SAELens transcoder architectures -> (fastsae base architecture, skip connection)
SAELENS_TRANSCODERS = {"transcoder": ("relu", False), "skip_transcoder": ("relu", True),
                       "jumprelu_transcoder": ("jumprelu", False), "jumprelu_skip_transcoder": ("jumprelu", True)}


def _saelens_transcoder(cfg, state, arch, d_in, d_sae, cfg_path, weights_path, dtype, backend):
    """SAELens ``Transcoder``: ``ŷ = act(x @ W_enc + b_enc) @ W_dec + b_dec (+ x @ W_skipᵀ)``, never centred."""
    from ..sae import Transcoder

    base, skip = SAELENS_TRANSCODERS[arch]
    d_out = _cfg_int(cfg, "d_out", cfg_path)
    if _cfg_typed(cfg, "apply_b_dec_to_input", cfg_path, (bool,), False):
        raise ValueError(f"{cfg_path}: apply_b_dec_to_input=True is not valid for a SAELens transcoder")
    need = lambda key, shape: _need(state, key, weights_path, shape)  # noqa: E731
    out = dict(W_enc=need("W_enc", (d_in, d_sae)), b_enc=need("b_enc", (d_sae,)), W_dec=need("W_dec", (d_sae, d_out)),
               b_dec=need("b_dec", (d_out,)))
    if skip:
        out["W_skip"] = need("W_skip", (d_out, d_in)).t().contiguous()
    if base == "jumprelu":
        out["threshold"] = need("threshold", (d_sae,)).clamp_min(0)
    sae = Transcoder(base, d_in, d_sae, d_out=d_out, skip_connection=skip, dtype=dtype, backend=backend)
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
    from ..sae import TopKSAE

    cfg_path, weights_path = path / SPARSIFY_CONFIG, path / SPARSIFY_WEIGHTS
    cfg = _read_json(cfg_path)
    state = _read_safetensors(weights_path)
    transcode = bool(_cfg_typed(cfg, "transcode", cfg_path, (bool, type(None)), False))
    skip = bool(_cfg_typed(cfg, "skip_connection", cfg_path, (bool, type(None)), False))
    if _cfg_typed(cfg, "activation", cfg_path, (str,), "topk") != "topk":
        raise ValueError(f"{cfg_path}: activation={cfg.get('activation')!r} is not supported (topk only)")
    W = _need(state, "encoder.weight", weights_path)
    if W.dim() != 2:
        raise ValueError(f"{weights_path}: encoder.weight must be 2-D, got shape {list(W.shape)}")
    d_sae, d_in = W.shape
    if "d_in" in cfg and _cfg_int(cfg, "d_in", cfg_path) != d_in:
        raise ValueError(f"{cfg_path}: field 'd_in' says {cfg['d_in']} but encoder.weight has {d_in} columns")
    if cfg.get("num_latents") and _cfg_int(cfg, "num_latents", cfg_path) != d_sae:
        raise ValueError(f"{cfg_path}: field 'num_latents' says {cfg['num_latents']} but encoder.weight has "
                         f"{d_sae} rows")
    k = cfg.get("k")
    if not _is_int(k) or not 1 <= k <= d_sae:
        raise ValueError(f"{cfg_path}: field 'k' must lie in 1..num_latents={d_sae}, got {k!r}")
    if transcode or skip:  # sparsify transcoders never centre their input; W_skip [d_in, d_in] acts as x @ W_skipᵀ
        from ..sae import Transcoder

        sae = Transcoder("topk", d_in, d_sae, k=k, skip_connection=skip, dtype=_dtype_of(state), backend=backend)
        if not transcode:
            raise ValueError(f"{cfg_path}: skip_connection=True without transcode=True is not supported")
    else:
        sae = TopKSAE(d_in, d_sae, k, apply_b_dec_to_input=True, dtype=_dtype_of(state), backend=backend)
    out = dict(
        W_enc=W.t().contiguous(),
        b_enc=_need(state, "encoder.bias", weights_path, (d_sae,)),
        W_dec=_need(state, "W_dec", weights_path, (d_sae, d_in)),
        b_dec=_need(state, "b_dec", weights_path, (d_in,)),
    )
    if skip:
        out["W_skip"] = _need(state, "W_skip", weights_path, (d_in, d_in)).t().contiguous()
    return _fill_partial(sae, out, weights_path)


def _load_gemma_scope(path: Path, backend: str):
    """Gemma Scope: ``pre = x @ W_enc + b_enc``, ``f = relu(pre) · 1[pre > threshold]``, ``x̂ = f @ W_dec + b_dec``."""
    from ..sae import JumpReLUSAE

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


# ----------------------------------------------------------------------------------------------
# dictionary_learning (saprmarks/dictionary_learning): trainer_*/ae.pt + config.json
# ----------------------------------------------------------------------------------------------

DL_WEIGHTS, DL_CONFIG = "ae.pt", "config.json"
#: dictionary_learning's ``config["trainer"]["dict_class"]`` -> the fastsae architecture it loads as
DICTIONARY_LEARNING_CLASSES = {
    "AutoEncoder": "relu", "AutoEncoderNew": "relu", "GatedAutoEncoder": "gated", "JumpReluAutoEncoder": "jumprelu",
    "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk", "MatryoshkaBatchTopKSAE": "matryoshka_batchtopk",
}


def _dictionary_learning_files(path: Path) -> tuple[Path, Path]:
    """``(ae.pt, config.json)`` for a trainer folder, its ``ae.pt``, or a ``checkpoints/ae_<step>.pt``."""
    if path.is_dir():
        return path / DL_WEIGHTS, path / DL_CONFIG
    for folder in (path.parent, path.parent.parent):
        if (folder / DL_CONFIG).is_file():
            return path, folder / DL_CONFIG
    raise FileNotFoundError(f"{path}: no {DL_CONFIG} next to it or in the folder above (a dictionary_learning "
                            f"checkpoint is read with its trainer's {DL_CONFIG})")


def _load_dictionary_learning(path: Path, backend: str):
    """A dictionary_learning dictionary as the fastsae module whose forward equals the class's own ``forward``:

    - ``AutoEncoder``: ``relu(encoder(x - bias))``, ``decoder(f) + bias`` -> ReLUSAE(apply_b_dec_to_input=True);
      ``AutoEncoderNew`` (April update): no input centring, ``decoder.bias`` -> ReLUSAE(False).
    - ``GatedAutoEncoder``: ``π = encoder(x - decoder_bias)``, ``1[π + gate_bias > 0] · relu(exp(r_mag)·π +
      mag_bias)`` -> GatedSAE (W_mag = exp(r_mag) ⊙ W_gate is the same product).
    - ``JumpReluAutoEncoder``: ``relu(pre · 1[pre > θ])``, ``pre = x @ W_enc + b_enc`` -> JumpReLUSAE (θ clamped
      at 0, which is exact).
    - ``AutoEncoderTopK``: per-row top-k of ``relu(encoder(x - b_dec))`` -> TopKSAE.
    - ``BatchTopKSAE`` / ``MatryoshkaBatchTopKSAE``: ``relu(pre) · 1[relu(pre) > threshold]`` with the learned
      global threshold -> BatchTopKSAE / MatryoshkaBatchTopKSAE with that threshold (SAELens #608: these once
      loaded as ReLU SAEs). A threshold still at its initial -1 (saved before ``threshold_start_step``) makes
      dictionary_learning's own forward a dense ReLU; fastsae then applies the batch top-k and warns.

    ``ae.pt`` is read by :mod:`fastsae.torchfile` (never unpickled); ``k`` must agree between the file and
    ``config["trainer"]["k"]`` (dictionary_learning's ``load_dictionary`` checks the same).
    """
    from ..sae import ARCHITECTURES
    from ..torchfile import read_state_dict

    weights_path, cfg_path = _dictionary_learning_files(path)
    cfg = _read_json(cfg_path)
    trainer = cfg.get("trainer")
    if not isinstance(trainer, dict):
        raise ValueError(f"{cfg_path}: field 'trainer' (the trainer's config) is missing: not a dictionary_learning "
                         "config.json")
    dict_class = _cfg_typed(trainer, "dict_class", cfg_path, (str,))
    arch = DICTIONARY_LEARNING_CLASSES.get(dict_class)
    if arch is None or arch not in ARCHITECTURES:
        raise ValueError(f"{cfg_path}: trainer.dict_class={dict_class!r} is not supported (supported: "
                         f"{sorted(k for k, v in DICTIONARY_LEARNING_CLASSES.items() if v in ARCHITECTURES)})")
    state = read_state_dict(weights_path)
    dtype = _dtype_of(state)
    need = lambda key, shape=None: _need(state, key, weights_path, shape)  # noqa: E731

    def linear(key):  # nn.Linear stores [out, in]
        w = need(key)
        if w.dim() != 2:
            raise ValueError(f"{weights_path}: {key} must be 2-D, got shape {list(w.shape)}")
        return w

    if arch in ("relu", "gated", "topk", "batchtopk"):
        enc = linear("encoder.weight")
        d_sae, d_in = enc.shape
        out = dict(W_enc=enc.t().contiguous(), W_dec=need("decoder.weight", (d_in, d_sae)).t().contiguous())
    else:
        enc = need("W_enc")
        if enc.dim() != 2:
            raise ValueError(f"{weights_path}: W_enc must be 2-D, got shape {list(enc.shape)}")
        d_in, d_sae = enc.shape
        out = dict(W_enc=enc, W_dec=need("W_dec", (d_sae, d_in)), b_enc=need("b_enc", (d_sae,)),
                   b_dec=need("b_dec", (d_in,)))
    for key in ("activation_dim", "dict_size"):
        if key in trainer and trainer[key] != (d_in if key == "activation_dim" else d_sae):
            raise ValueError(f"{cfg_path}: trainer.{key}={trainer[key]!r} does not match {weights_path} "
                             f"(d_in={d_in}, d_sae={d_sae})")
    kwargs: dict = dict(dtype=dtype, backend=backend)
    if arch == "relu":
        # by its keys, not dict_class: StandardTrainerAprilUpdate writes "AutoEncoder" whatever class it trained
        centred = "bias" in state
        kwargs["apply_b_dec_to_input"] = centred
        out.update(b_enc=need("encoder.bias", (d_sae,)), b_dec=need("bias" if centred else "decoder.bias", (d_in,)))
    elif arch == "gated":
        out.update(b_gate=need("gate_bias", (d_sae,)), r_mag=need("r_mag", (d_sae,)), b_mag=need("mag_bias", (d_sae,)),
                   b_dec=need("decoder_bias", (d_in,)))
    elif arch == "jumprelu":
        kwargs["apply_b_dec_to_input"] = False
        out["threshold"] = need("threshold", (d_sae,)).clamp_min(0)
    else:  # the TopK family
        if arch in ("topk", "batchtopk"):
            out.update(b_enc=need("encoder.bias", (d_sae,)), b_dec=need("b_dec", (d_in,)))
        k_file = int(need("k", ()).item())
        k_cfg = trainer.get("k", k_file)
        if not _is_int(k_cfg) or k_cfg != k_file:
            raise ValueError(f"{cfg_path}: trainer.k={k_cfg!r} but {weights_path} holds k={k_file}")
        kwargs.update(k=k_file, apply_b_dec_to_input=True)
        if arch != "topk":
            th = float(need("threshold", ()).item())
            if th < 0:
                import warnings

                warnings.warn(f"{weights_path}: the BatchTopK threshold was never calibrated (saved before "
                              "threshold_start_step); dictionary_learning's forward would be a dense ReLU here, "
                              "fastsae applies the batch top-k instead", stacklevel=3)
            out["threshold"] = torch.tensor(th if th >= 0 else -1.0)
        if arch == "matryoshka_batchtopk":
            sizes = need("group_sizes")
            if sizes.dim() != 1 or sizes.is_floating_point() or bool((sizes <= 0).any()) or int(sizes.sum()) != d_sae:
                raise ValueError(f"{weights_path}: group_sizes must be positive integers summing to d_sae={d_sae}, "
                                 f"got {sizes.tolist()}")
            kwargs["widths"] = torch.cumsum(sizes, 0).tolist()
    try:
        sae = ARCHITECTURES[arch](d_in, d_sae, **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path} does not describe a valid {dict_class}: {e}") from e
    return _fill_partial(sae, out, weights_path)


# ----------------------------------------------------------------------------------------------
# Export: the layouts SAELens and sparsify read, and in-memory conversion to and from SAELens
# ----------------------------------------------------------------------------------------------

#: the SAELens config version written (6.0 is the layout ``SAE.load_from_disk`` reads without conversion)
SAELENS_VERSION = "6.0.0"


def _batch_threshold(sae) -> Tensor:
    """A BatchTopK-family module's global inference threshold as SAELens' per-latent JumpReLU threshold."""
    if not sae.calibrated:
        raise ValueError(f"this {sae.architecture} SAE has no calibrated inference threshold yet (it is set while "
                         "training); only a calibrated BatchTopK SAE has a batch-independent forward to export")
    return torch.full((sae.d_sae,), float(sae.threshold), dtype=sae.dtype, device=sae.device)


def saelens_parts(sae, metadata: Optional[dict] = None) -> tuple[dict, dict[str, Tensor]]:
    """``(cfg.json dict, tensors)`` of the SAELens 6.x inference SAE that computes what ``sae`` computes.

    relu -> ``standard``; topk -> ``topk`` (``rescale_acts_by_decoder_norm=False``); jumprelu -> ``jumprelu``;
    gated -> ``gated``; batchtopk / matryoshka_batchtopk -> ``jumprelu`` with the calibrated global threshold on
    every latent (SAELens saves its own BatchTopK SAEs the same way: ``relu(pre)·1[pre > θ]`` is their forward).
    Transcoders map to ``transcoder`` / ``jumprelu_transcoder`` (``skip_`` variants with ``W_skip [d_out, d_in]``);
    SAELens has no TopK or Gated transcoder.
    """
    arch = sae.architecture
    transcoder = bool(getattr(sae, "is_transcoder", False))
    base = getattr(sae, "base_architecture", arch)
    W_skip = getattr(sae, "W_skip", None)
    tensors = dict(W_enc=sae.W_enc, W_dec=sae.W_dec, b_dec=sae.b_dec)
    extra: dict = {}
    if base == "relu":
        kind = "standard"
        tensors["b_enc"] = sae.b_enc
    elif base == "topk":
        kind = "topk"
        tensors["b_enc"] = sae.b_enc
        extra = dict(k=sae.k, rescale_acts_by_decoder_norm=False)
    elif base == "jumprelu":
        kind = "jumprelu"
        tensors.update(b_enc=sae.b_enc, threshold=sae.threshold.detach().clamp_min(0).to(sae.dtype))
    elif base in ("batchtopk", "matryoshka_batchtopk"):
        kind = "jumprelu"
        tensors.update(b_enc=sae.b_enc, threshold=_batch_threshold(sae))
    elif base == "gated":
        kind = "gated"
        tensors.update(b_gate=sae.b_gate, r_mag=sae.r_mag, b_mag=sae.b_mag)
    else:
        raise ValueError(f"a {arch} SAE has no SAELens equivalent")
    if transcoder:
        if kind not in ("standard", "jumprelu"):
            raise ValueError(f"SAELens has no {base} transcoder (only ReLU and JumpReLU ones); "
                             + ("export it with format='sparsify'" if base == "topk" else "keep format='fastsae'"))
        kind = ("jumprelu_" if kind == "jumprelu" else "") + ("skip_transcoder" if W_skip is not None else "transcoder")
        extra["d_out"] = sae.d_out
        if W_skip is not None:
            tensors["W_skip"] = W_skip.t()
    meta = dict(sae_lens_version=SAELENS_VERSION, sae_lens_training_version=None,
                fastsae_architecture=arch)
    if metadata:
        json.dumps(metadata)  # a TypeError now rather than a half-written folder
        meta.update(metadata)
    cfg = dict(architecture=kind, d_in=sae.d_in, d_sae=sae.d_sae, dtype=str(sae.dtype).removeprefix("torch."),
               device="cpu", apply_b_dec_to_input=sae.apply_b_dec_to_input, normalize_activations="none",
               reshape_activations="none", **extra, metadata=meta)
    return cfg, {k: v.detach().to("cpu") for k, v in tensors.items()}


def sparsify_parts(sae) -> tuple[dict, dict[str, Tensor]]:
    """``(cfg.json dict, tensors)`` of the sparsify ``SparseCoder`` that computes what a TopK ``sae`` computes.

    sparsify always centres an autoencoder's input (``x - b_dec``): an SAE trained without it is exported with
    ``b_enc + b_dec @ W_enc`` as the encoder bias (the same pre-activations). Transcoders (sparsify's
    ``transcode``; ``d_out == d_in``, optional skip ``W_skip [d_in, d_in]``) never centre.
    """
    base = getattr(sae, "base_architecture", sae.architecture)
    if base != "topk":
        raise ValueError(f"sparsify stores TopK SAEs only; this is a {sae.architecture} SAE (use format='saelens')")
    transcoder = bool(getattr(sae, "is_transcoder", False))
    W_skip = getattr(sae, "W_skip", None)
    d_out = getattr(sae, "d_out", sae.d_in)
    if d_out != sae.d_in:
        raise ValueError(f"sparsify needs d_out == d_in; this transcoder maps {sae.d_in} -> {d_out}")
    b_enc = sae.b_enc.detach()
    if not transcoder and not sae.apply_b_dec_to_input:
        b_enc = b_enc + (sae.b_dec.detach().double() @ sae.W_enc.detach().double()).to(b_enc.dtype)
    tensors = {"encoder.weight": sae.W_enc.detach().t(), "encoder.bias": b_enc, "W_dec": sae.W_dec.detach(),
               "b_dec": sae.b_dec.detach()}
    if W_skip is not None:
        tensors["W_skip"] = W_skip.detach().t()
    cfg = dict(activation="topk", expansion_factor=max(1, sae.d_sae // sae.d_in), normalize_decoder=True,
               num_latents=sae.d_sae, k=sae.k, multi_topk=False, skip_connection=W_skip is not None,
               transcode=transcoder, d_in=sae.d_in)
    return cfg, {k: v.to("cpu") for k, v in tensors.items()}


def _sae_lens():
    try:
        import sae_lens  # noqa: F401
    except ImportError as e:
        raise ImportError("this needs sae-lens (pip install sae-lens); fastsae reads and writes SAELens folders "
                          "without it: fastsae.load(folder), sae.save(folder, format='saelens')") from e
    return sae_lens


def to_saelens(sae):
    """A ``sae_lens.SAE`` (inference class) with the same outputs as the fastsae module ``sae`` (see
    :func:`saelens_parts`), on ``sae``'s device. Needs sae-lens importable."""
    sae_lens = _sae_lens()
    cfg, tensors = saelens_parts(sae)
    cfg["device"] = str(sae.device)
    out = sae_lens.SAE.from_dict(cfg)
    out.load_state_dict({k: v.to(sae.device) for k, v in tensors.items()})
    return out.eval()


def from_saelens(sae, *, backend: str = "auto"):
    """The fastsae module equal to a ``sae_lens.SAE`` (an inference SAE, or a training SAE: converted to its
    inference form first, as SAELens' own ``save_inference_model`` does), in eval mode, on the SAE's device."""
    try:
        cfg_obj, state = sae.cfg, sae.state_dict()
    except AttributeError:
        raise TypeError(f"from_saelens expects a sae_lens.SAE, got {type(sae).__name__}") from None
    state = dict(state)
    if hasattr(sae, "process_state_dict_for_saving_inference"):
        sae.process_state_dict_for_saving_inference(state)
        cfg = cfg_obj.get_inference_sae_cfg_dict()
    else:
        sae.process_state_dict_for_saving(state)
        cfg = cfg_obj.to_dict()
    device = next((v.device for v in state.values() if isinstance(v, Tensor)), torch.device("cpu"))
    state = {k: v.detach().to("cpu") for k, v in state.items() if isinstance(v, Tensor)}
    where = f"<{type(sae).__name__} config>"
    out = saelens_to_fastsae(json.loads(json.dumps(cfg, default=str)), state, where, f"<{type(sae).__name__} weights>",
                             backend)
    return out.eval().to(device)
