"""What each architecture computes at inference, in one form every backend takes.

An :class:`Encoder` describes an SAE's inference encoder — four kinds cover the five architectures (and SAEs
loaded from SAELens, sparsify and Gemma Scope files, which load into the same modules):

- ``"threshold"``: ``f = pre · H(pre - θ_j)``, ``pre = x_in W_enc + b_enc``. JumpReLU (θ), ReLU (θ = 0) and a
  calibrated BatchTopK (θ = its global threshold τ ≥ 0, since ``relu(pre)·H(relu(pre) - τ) = pre·H(pre - τ)``).
- ``"gated"``: ``f = H(π_gate) · relu(π_mag)``, ``π_gate = x_in W_gate + b_gate``, ``π_mag = x_in (exp(r_mag) ⊙
  W_gate) + b_mag``.
- ``"topk"``: relu of each row's ``k`` largest pre-activations.
- ``"batchtopk"``: the ``B·k`` largest relu'd pre-activations of the batch (BatchTopK or Matryoshka BatchTopK
  before calibration).
- ``"abstopk"``: each row's ``k`` pre-activations of largest magnitude, sign kept (AbsTopK).

``x_in = x - b_dec`` when ``apply_b_dec_to_input``. The functions here are the eager implementation (the
default of ``Backend.encode`` / ``encode_sparse`` / ``reconstruct``); backends with fused kernels override them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference as ref

KINDS = ("threshold", "gated", "topk", "batchtopk", "abstopk")


@dataclass(frozen=True)
class Encoder:
    """An SAE's inference encoder (module docstring). Tensors are the module's own (not copies)."""

    kind: str
    W_enc: Tensor  # [d_in, d_sae]; Gated: W_gate
    b_enc: Tensor  # [d_sae]; Gated: b_gate
    b_dec: Tensor  # [d_in], also the decoder bias of reconstruct
    apply_b_dec_to_input: bool
    threshold: Optional[Tensor] = None  # [d_sae] ("threshold")
    bandwidth: Optional[Tensor] = None  # [d_sae] JumpReLU's ε: the eager path keeps θ's pseudo-gradient
    k: Optional[int] = None  # "topk", "batchtopk", "abstopk"
    r_mag: Optional[Tensor] = None  # [d_sae] ("gated")
    b_mag: Optional[Tensor] = None  # [d_sae] ("gated")

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def tensors(self) -> list[Tensor]:
        ts = [self.W_enc, self.b_enc, self.b_dec, self.threshold, self.r_mag, self.b_mag]
        return [t for t in ts if t is not None]

    def needs_grad(self, x: Tensor) -> bool:
        """Autograd would record this call: fused kernels (which have no backward) must not take it."""
        return torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in self.tensors()))


def encoder_of(sae) -> Encoder:
    """The :class:`Encoder` of a fastsae module (by its ``architecture``)."""
    common = dict(W_enc=sae.W_enc, b_dec=sae.b_dec, apply_b_dec_to_input=sae.apply_b_dec_to_input)
    arch = getattr(sae, "base_architecture", sae.architecture)  # a transcoder encodes like its architecture
    if arch == "jumprelu":
        return Encoder("threshold", b_enc=sae.b_enc, threshold=sae.threshold, bandwidth=sae.bandwidth, **common)
    if arch == "relu":
        return Encoder("threshold", b_enc=sae.b_enc, threshold=sae.b_enc.new_zeros(sae.d_sae), **common)
    if arch in ("batchtopk", "matryoshka_batchtopk"):  # Matryoshka's inference is BatchTopK's
        if sae.calibrated:
            return Encoder("threshold", b_enc=sae.b_enc, threshold=sae.threshold.expand(sae.d_sae), **common)
        return Encoder("batchtopk", b_enc=sae.b_enc, k=sae.k, **common)
    if arch in ("topk", "abstopk"):
        return Encoder(arch, b_enc=sae.b_enc, k=sae.k, **common)
    if arch == "gated":
        return Encoder("gated", b_enc=sae.b_gate, r_mag=sae.r_mag, b_mag=sae.b_mag, **common)
    raise NotImplementedError(f"no inference encoder for architecture {arch!r}: add it to fastsae/inference.py "
                              f"(or override the module's _dense_code)")


def _pre(enc: Encoder, x: Tensor) -> Tensor:
    return ref.encoder_input(x, enc.b_dec, enc.apply_b_dec_to_input) @ enc.W_enc + enc.b_enc


def dense_code(enc: Encoder, x: Tensor) -> Tensor:
    """``f [B, d_sae]``, eagerly."""
    if enc.kind == "threshold":
        pre = _pre(enc, x)
        if enc.bandwidth is not None:
            return ref.jumprelu(pre, enc.threshold, enc.bandwidth)
        return pre * (pre > enc.threshold).to(pre.dtype)
    if enc.kind == "gated":
        x_in = ref.encoder_input(x, enc.b_dec, enc.apply_b_dec_to_input)
        gate = (x_in @ enc.W_enc + enc.b_enc) > 0
        mag = F.relu(x_in @ (enc.W_enc * torch.exp(enc.r_mag)) + enc.b_mag)
        return gate.to(mag.dtype) * mag
    if enc.kind in ("topk", "abstopk"):
        values, indices = sparse_code(enc, x)
        return ref.topk_scatter(values, indices, enc.d_sae)
    if enc.kind == "batchtopk":
        pre = F.relu(_pre(enc, x))
        n_keep = min(x.shape[0] * enc.k, pre.numel())
        vals, idx = torch.topk(pre.reshape(-1), n_keep, sorted=False)
        return torch.zeros_like(pre).reshape(-1).scatter(0, idx, vals).reshape(pre.shape)
    raise ValueError(f"unknown encoder kind {enc.kind!r}; expected one of {list(KINDS)}")


def sparse_code(enc: Encoder, x: Tensor) -> tuple[Tensor, Tensor]:
    """Padded ``(values, indices) [B, K]``, eagerly: TopK's ``k`` entries sorted descending, else the nonzero
    entries of :func:`dense_code` in latent order (:func:`dense_to_padded`)."""
    if enc.kind == "topk":
        return ref.topk(F.relu(_pre(enc, x)), enc.k)
    if enc.kind == "abstopk":
        pre = _pre(enc, x)
        _, indices = ref.topk(pre.abs(), enc.k)
        return pre.gather(1, indices), indices
    return dense_to_padded(dense_code(enc, x))


def dense_to_padded(f: Tensor) -> tuple[Tensor, Tensor]:
    """Dense ``[B, d_sae]`` -> padded ``(values, indices) [B, K]`` of the nonzero entries, K = max row count.

    Each row's active latents come first, in latent order; the rest is padding (value 0, index 0).
    One pass over ``f`` plus O(nnz) work: no sort over ``d_sae``.
    """
    B = f.shape[0]
    rows, cols = (f != 0).nonzero(as_tuple=True)  # row-major order
    counts = torch.bincount(rows, minlength=B)
    K = int(counts.max()) if B else 0
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=f.device) - starts[rows]
    values = f.new_zeros(B, K)
    indices = torch.zeros(B, K, dtype=torch.long, device=f.device)
    values[rows, slot] = f[rows, cols]
    indices[rows, slot] = cols
    return values, indices
