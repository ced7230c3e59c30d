"""Eager PyTorch reference: every op and every loss of DESIGN.md §1, written for clarity.

This module is the oracle for every test and the "eager" backend. It materialises the dense
``[B, d_sae]`` tensors on purpose: it is what the fused backends must agree with.

Conventions (shared by every backend):
- ``x`` is ``[B, d_in]`` here; the modules flatten ``[..., d_in]`` before calling.
- ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``,
  ``threshold [d_sae]``, ``bandwidth`` a positive float or a ``[d_sae]`` tensor.
- JumpReLU: ``f = pre * H(pre - θ)`` with ``H(0) = 0``; the rectangle kernel is the *open*
  interval ``K(u) = 1{-1/2 < u < 1/2}``.
- Reconstruction error ``mse = mean_b Σ_i (x̂ - x)²`` (sum over d_in, mean over the batch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

Bandwidth = Union[float, Tensor]


def rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel ``K(u) = 1{-1/2 < u < 1/2}`` (open interval), in ``u``'s dtype."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _sum_to_latents(t: Tensor) -> Tensor:
    """Sum every leading (batch) dimension away, leaving ``[d_sae]``."""
    return t.reshape(-1, t.shape[-1]).sum(0)


def _kernel_window(pre: Tensor, threshold: Tensor, bandwidth: Tensor) -> tuple[Tensor, Tensor]:
    """``(K(u), ε)`` in float32-or-wider, ``u = (pre - θ) / ε``; θ and ε broadcast over rows."""
    wide = torch.promote_types(torch.promote_types(pre.dtype, threshold.dtype), torch.float32)
    eps = bandwidth.to(wide)
    u = (pre.to(wide) - threshold.to(wide)) / eps
    return rectangle(u), eps


class JumpReLUFunction(torch.autograd.Function):
    """``f = pre · H(pre - θ)``.

    ``∂f/∂pre = H(pre - θ)``; ``∂f/∂θ := -(θ/ε) K((pre - θ)/ε)`` (rectangle-kernel pseudo-derivative).
    With ``ste_to_input`` the jump's pseudo-derivative also reaches ``pre``: ``∂f/∂pre += (θ/ε) K``
    (Anthropic's January 2025 recipe; SAELens ``jumprelu_ste_to_input``).
    """

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: Tensor, ste_to_input: bool = False) -> Tensor:
        ctx.save_for_backward(pre, threshold, bandwidth)
        ctx.ste_to_input = ste_to_input
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold, bandwidth = ctx.saved_tensors
        grad_pre = grad_threshold = None
        if ctx.needs_input_grad[1] or ctx.ste_to_input:
            k, eps = _kernel_window(pre, threshold, bandwidth)
            jump = (threshold.to(eps.dtype) / eps) * k * grad.to(eps.dtype)  # (θ/ε) K · g
        if ctx.needs_input_grad[0]:
            grad_pre = grad * (pre > threshold).to(grad.dtype)
            if ctx.ste_to_input:
                grad_pre = grad_pre + jump.to(grad.dtype)
        if ctx.needs_input_grad[1]:
            grad_threshold = _sum_to_latents(-jump).to(threshold.dtype)
        return grad_pre, grad_threshold, None, None


class StepFunction(torch.autograd.Function):
    """``H(pre - θ)``.

    ``∂H/∂θ := -(1/ε) K((pre - θ)/ε)``; ``∂H/∂pre := 0`` (no gradient reaches the encoder through the
    step: the paper), or ``+(1/ε) K`` with ``ste_to_input``.
    """

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: Tensor, ste_to_input: bool = False) -> Tensor:
        ctx.save_for_backward(pre, threshold, bandwidth)
        ctx.ste_to_input = ste_to_input
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold, bandwidth = ctx.saved_tensors
        grad_pre = grad_threshold = None
        if ctx.needs_input_grad[1] or ctx.ste_to_input:
            k, eps = _kernel_window(pre, threshold, bandwidth)
            kick = (1.0 / eps) * k * grad.to(eps.dtype)  # (1/ε) K · g
        if ctx.needs_input_grad[0]:
            grad_pre = kick.to(grad.dtype) if ctx.ste_to_input else torch.zeros_like(pre)
        if ctx.needs_input_grad[1]:
            grad_threshold = _sum_to_latents(-kick).to(threshold.dtype)
        return grad_pre, grad_threshold, None, None


def _as_tensor(bandwidth: Bandwidth, like: Tensor) -> Tensor:
    if isinstance(bandwidth, Tensor):
        return bandwidth.to(like.device)
    return torch.tensor(float(bandwidth), dtype=like.dtype, device=like.device)


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: Bandwidth = 1e-3, ste_to_input: bool = False) -> Tensor:
    """JumpReLU ``pre · H(pre - θ)`` with the rectangle-kernel pseudo-derivative for ``θ`` (and for ``pre``
    too with ``ste_to_input``)."""
    return JumpReLUFunction.apply(pre, threshold, _as_tensor(bandwidth, threshold), bool(ste_to_input))


def step(pre: Tensor, threshold: Tensor, bandwidth: Bandwidth = 1e-3, ste_to_input: bool = False) -> Tensor:
    """Heaviside ``H(pre - θ)`` with the rectangle-kernel pseudo-derivative for ``θ`` (and for ``pre`` too
    with ``ste_to_input``)."""
    return StepFunction.apply(pre, threshold, _as_tensor(bandwidth, threshold), bool(ste_to_input))


def topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row, sorted descending: ``(values [.., k], indices [.., k] int64)``."""
    return torch.topk(pre, k, dim=-1, largest=True, sorted=True)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Optional[Tensor] = None) -> Tensor:
    """``x̂[b] = Σ_j values[b, j] · W_dec[indices[b, j]] (+ b_dec)``; ``[..., k] -> [..., d_in]``."""
    out = torch.einsum("...k,...kd->...d", values, W_dec[indices])
    return out if b_dec is None else out + b_dec


# ----------------------------------------------------------------------------------------------
# SAE forward passes. Every backend implements these with the same signature and outputs;
# the losses below are computed from their outputs and are shared by every backend.
# ----------------------------------------------------------------------------------------------


@dataclass
class SAEForward:
    """What one SAE forward pass hands to the loss.

    x_hat:    ``[B, d_in]`` reconstruction.
    l0:       ``[B]`` active latents per row (float). For JumpReLU it carries the step function's
              pseudo-gradient to the threshold, so ``l0.mean()`` is the differentiable L0 penalty.
    fired:    ``[d_sae]`` bool, latents active in at least one row (dead-latent tracking).
    values, indices: the code, differentiable: ``values [B, k]`` at ``indices [B, k]`` (TopK), any layout of
              entries with ``indices`` of the same shape (padding entries hold 0), or the dense ``[B, d_sae]``
              code with ``indices = None``. ``None`` where the backend does not expose it.
    sparsity: ``[B]`` differentiable per-row sparsity penalty where it is not ``l0`` (ReLU, Gated).
    aux:      scalar auxiliary loss computed inside the forward (Gated's frozen-decoder term).
    rows:     ``[nnz]`` integer, the row of each entry when ``values``/``indices`` are flat lists of entries (a
              fused BatchTopK step's kept entries, grouped by row); ``None`` otherwise.
    min_kept: BatchTopK's smallest kept activation (for its inference threshold).
    kept:     ``[B]`` int64, only when asked for (``count_kept``): the entries per row a sparse formulation of
              the step keeps (JumpReLU: active ∪ window; Gated: open gates) — what a backend's density-aware
              dispatch compares with its crossover after a dense step.
    """

    x_hat: Tensor
    l0: Tensor
    fired: Tensor
    values: Optional[Tensor] = None
    indices: Optional[Tensor] = None
    sparsity: Optional[Tensor] = None
    aux: Optional[Tensor] = None
    min_kept: Optional[Tensor] = None
    kept: Optional[Tensor] = None
    rows: Optional[Tensor] = None


def encoder_input(x: Tensor, b_dec: Tensor, apply_b_dec_to_input: bool) -> Tensor:
    return x - b_dec if apply_b_dec_to_input else x


def jumprelu_sae_forward(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    threshold: Tensor,
    bandwidth: Bandwidth,
    apply_b_dec_to_input: bool = False,
    ste_to_input: bool = False,
    *,
    count_kept: bool = False,
) -> SAEForward:
    """``values`` is the dense code ``f [B, d_sae]`` (``indices`` None), differentiable, for penalties on f."""
    pre = encoder_input(x, b_dec, apply_b_dec_to_input) @ W_enc + b_enc
    f = jumprelu(pre, threshold, bandwidth, ste_to_input)
    x_hat = f @ W_dec + b_dec
    l0 = step(pre, threshold, bandwidth, ste_to_input).sum(-1, dtype=torch.float32)
    fired = (pre > threshold).any(0)
    kept = None
    if count_kept:
        with torch.no_grad():
            window, _ = _kernel_window(pre, threshold, _as_tensor(bandwidth, threshold))
            kept = ((pre > threshold) | (window > 0)).sum(-1)
    return SAEForward(x_hat=x_hat, l0=l0, fired=fired, values=f, kept=kept)


def topk_scatter(values: Tensor, indices: Tensor, d_sae: int) -> Tensor:
    """Dense ``[B, d_sae]`` code from a sparse one (the eager way; what the fused path avoids)."""
    return torch.zeros(*values.shape[:-1], d_sae, dtype=values.dtype, device=values.device).scatter(
        -1, indices, values
    )


def topk_sae_forward(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    k: int,
    apply_b_dec_to_input: bool = True,
) -> SAEForward:
    pre = F.relu(encoder_input(x, b_dec, apply_b_dec_to_input) @ W_enc + b_enc)
    values, indices = topk(pre, k)
    f = topk_scatter(values, indices, W_enc.shape[1])
    x_hat = f @ W_dec + b_dec
    active = f > 0
    return SAEForward(
        x_hat=x_hat, l0=active.sum(-1).float(), fired=active.any(0), values=values, indices=indices
    )


def abstopk_sae_forward(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    k: int,
    apply_b_dec_to_input: bool = True,
    topk=topk,
    decode=sparse_decode,
) -> SAEForward:
    """AbsTopK: each row keeps the ``k`` pre-activations of largest ``|pre|`` with their sign,
    ``f = pre · 1[|pre| among the row's k largest]`` (no ReLU). TopK's selection on an elementwise key: ``topk``
    and ``decode`` are a backend's own kernels (selection on ``|pre|``, then the sparse decoder); gradients reach
    ``pre`` at the kept entries only, as TopK's."""
    pre = encoder_input(x, b_dec, apply_b_dec_to_input) @ W_enc + b_enc
    _, indices = topk(pre.detach().abs(), k)
    values = pre.gather(1, indices)
    x_hat = decode(values, indices, W_dec, b_dec)
    active = values != 0
    fired = torch.zeros(W_enc.shape[1], dtype=torch.bool, device=x.device).index_fill_(0, indices[active], True)
    return SAEForward(x_hat=x_hat, l0=active.sum(-1).float(), fired=fired, values=values, indices=indices)


def batchtopk_sae_forward(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    k: int,
    apply_b_dec_to_input: bool = True,
) -> SAEForward:
    """Keep the ``B·k`` largest activations of the whole batch (Bussmann et al. 2024)."""
    pre = F.relu(encoder_input(x, b_dec, apply_b_dec_to_input) @ W_enc + b_enc)
    B = pre.shape[0]
    flat = pre.reshape(-1)
    n_keep = min(B * k, flat.numel())
    kept_vals, kept_idx = torch.topk(flat, n_keep, sorted=False)
    f = torch.zeros_like(flat).scatter(0, kept_idx, kept_vals).reshape(pre.shape)
    x_hat = f @ W_dec + b_dec
    active = f > 0
    positive = kept_vals[kept_vals > 0]
    min_kept = positive.min().detach() if positive.numel() else None
    return SAEForward(x_hat=x_hat, l0=active.sum(-1).float(), fired=active.any(0), min_kept=min_kept)


def relu_sae_forward(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    apply_b_dec_to_input: bool = False,
) -> SAEForward:
    """ReLU SAE; ``sparsity`` is the decoder-norm-weighted L1 ``Σ_j f_j ‖W_dec[j]‖`` per row."""
    f = F.relu(encoder_input(x, b_dec, apply_b_dec_to_input) @ W_enc + b_enc)
    x_hat = f @ W_dec + b_dec
    sparsity = f @ W_dec.norm(dim=1)
    active = f > 0
    return SAEForward(x_hat=x_hat, l0=active.sum(-1).float(), fired=active.any(0), sparsity=sparsity)


def gated_sae_forward(
    x: Tensor,
    W_enc: Tensor,
    b_gate: Tensor,
    r_mag: Tensor,
    b_mag: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    apply_b_dec_to_input: bool = True,
    target: Optional[Tensor] = None,
    *,
    count_kept: bool = False,
) -> SAEForward:
    """Gated SAE (Rajamanoharan et al. 2024). ``W_enc`` is ``W_gate``; ``W_mag = exp(r_mag) ⊙ W_gate``.

    ``sparsity`` is ``‖relu(π_gate)‖₁`` per row; ``aux`` is ``mean_b ‖x - x̂_frozen(relu(π_gate))‖²``
    with *detached* decoder weights and bias, as in the paper (``target`` in place of ``x``: a transcoder).
    """
    x_in = encoder_input(x, b_dec, apply_b_dec_to_input)
    pi_gate = x_in @ W_enc + b_gate
    pi_mag = x_in @ (W_enc * torch.exp(r_mag)) + b_mag
    gate = pi_gate > 0
    f = gate.to(pi_mag.dtype) * F.relu(pi_mag)
    x_hat = f @ W_dec + b_dec
    relu_gate = F.relu(pi_gate)
    x_hat_frozen = relu_gate @ W_dec.detach() + b_dec.detach()
    aux = (x_hat_frozen - (x if target is None else target)).pow(2).sum(-1).mean()
    active = f > 0
    return SAEForward(
        x_hat=x_hat, l0=active.sum(-1).float(), fired=active.any(0), sparsity=relu_gate.sum(-1), aux=aux,
        kept=gate.sum(-1) if count_kept else None,
    )


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------


def mse(x_hat: Tensor, x: Tensor) -> Tensor:
    """``mean_b Σ_i (x̂ - x)²``."""
    return (x_hat - x).pow(2).sum(-1).mean()


def fvu(x_hat: Tensor, x: Tensor) -> Tensor:
    """Fraction of variance unexplained: ``Σ (x̂ - x)² / Σ (x - mean_b x)²`` over the batch."""
    total = (x - x.mean(0)).pow(2).sum()
    return (x_hat - x).pow(2).sum() / total.clamp_min(torch.finfo(total.dtype).tiny)


def auxk_loss(residual: Tensor, residual_hat: Tensor) -> Tensor:
    """AuxK (Gao et al. 2024): ``‖e - ê‖² / ‖e - mean e‖²`` over the batch; ``e`` is detached by the caller."""
    total = (residual - residual.mean(0)).pow(2).sum()
    return (residual_hat - residual).pow(2).sum() / total.clamp_min(torch.finfo(total.dtype).tiny)


def auxk_reconstruction(
    x_in: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, dead_mask: Tensor, k_aux: int,
    topk=topk, decode=sparse_decode,
) -> Optional[Tensor]:
    """``ê``: the residual reconstructed from the top ``k_aux`` dead pre-activations, *without* ``b_dec``.

    Only the dead latents' encoder columns are multiplied. ``topk``/``decode`` let a backend supply
    its own kernels. Returns ``None`` when no latent is dead.
    """
    dead = dead_mask.nonzero().squeeze(1)
    if dead.numel() == 0:
        return None
    pre_dead = F.relu(x_in @ W_enc[:, dead] + b_enc[dead])
    values, idx = topk(pre_dead, min(k_aux, dead.numel()))
    return decode(values, idx, W_dec[dead], None)


class _KeptEntries(torch.autograd.Function):
    """``values[b, j] = pre[b, idx[b, j]]`` (already computed, passed in) with the gradient of
    ``x_in @ W_enc + b_enc`` at those entries only: an index-add into ``W_enc``'s and ``b_enc``'s gradients, not a
    dense ``[B, d_sae]`` one."""

    @staticmethod
    def forward(ctx, values, x_in, W_enc, b_enc, idx):
        ctx.save_for_backward(x_in, idx)
        ctx.d_sae = W_enc.shape[1]
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        x_in, idx = ctx.saved_tensors
        flat = idx.reshape(-1)
        g_b = grad.new_zeros(ctx.d_sae).index_add_(0, flat, grad.reshape(-1))
        g_Wt = grad.new_zeros(ctx.d_sae, x_in.shape[1]).index_add_(
            0, flat, (grad.unsqueeze(-1) * x_in.unsqueeze(1)).reshape(-1, x_in.shape[1]))
        return None, None, g_Wt.t(), g_b, None


def quiet_auxk_loss(
    x_in: Tensor, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, threshold: Tensor, residual: Tensor, k_aux: int,
    max_firing: int = 16, topk=topk, decode=sparse_decode,
) -> Tensor:
    """JumpReLU's AuxK: on each row, the ``k_aux`` largest pre-activations among the latents that do *not* fire on
    it (``pre ≤ θ``) reconstruct ``e⊥``, the part of ``residual`` off the span of the decoder rows of the latents
    that do (the first ``max_firing`` by index where a row has more: a run's dense first steps, or an L0 above it);
    the loss is ``‖e⊥ - ê‖² / ‖e - mean e‖²`` over the rows (AuxK's, normalised by the whole residual: ``e⊥``
    vanishes where the firing rows span the space). The projection costs ``rows · m² · d_out`` for ``m ≤
    max_firing`` firing latents a row.

    A threshold gives a latent no gradient on the rows it stays below, so a feature no latent has yet is never
    learned (TopK's per-row rank hands every row's spare slots to the nearest latents instead). This term trains
    those nearest quiet latents towards what the firing ones miss; projecting the residual off the firing rows
    keeps it from growing a second latent along a firing one (the magnitude error of a feature the SAE has).
    Selection, firing set and projection are constants (no autograd, θ untouched); the gradient reaches
    ``W_enc``/``b_enc`` at the kept entries only and ``W_dec`` at the kept rows."""
    rows = x_in.shape[0]
    if rows == 0 or k_aux <= 0:
        return x_in.new_zeros(())
    x_in = x_in.detach()
    with torch.no_grad():
        W, b, th = W_enc.detach(), b_enc.detach(), threshold.to(W_enc.dtype)
        k = min(k_aux, W.shape[1])
        # [slab, d_sae] pre-activations at a time (~8 MB), each read while it is in cache
        slab = max(1, 2**21 // W.shape[1])
        pre = x_in.new_empty(min(rows, slab), W.shape[1])
        quiet, idx, firing_rows, firing = [], [], [], []
        for a in range(0, rows, slab):
            p = torch.mm(x_in[a:a + slab], W, out=pre[:min(slab, rows - a)]).add_(b)
            fires = p > th
            r_, c_ = fires.nonzero(as_tuple=True)  # row-major: grouped by row, latents ascending
            firing_rows.append(r_ + a)
            firing.append(c_)
            q, i = topk(p.masked_fill_(fires, 0), k)
            quiet.append(q)
            idx.append(i)
        quiet, idx, r, c = torch.cat(quiet), torch.cat(idx), torch.cat(firing_rows), torch.cat(firing)
        keep = quiet > 0  # a row with fewer positive quiet latents pads with zeros or negatives
        quiet = quiet * keep
        # the least squares in float32 at least (no bf16 solve; a bf16 Gram would lose the small singular values)
        wide = torch.promote_types(pre.dtype, torch.float32)
        e = residual.detach().to(wide).clone()
        total = (e - e.mean(0)).pow(2).sum()
        if r.numel():
            counts = torch.bincount(r, minlength=rows)
            starts = counts.cumsum(0) - counts
            pos = torch.arange(r.numel(), device=r.device) - starts[r]
            first = pos < max_firing
            r, c, pos, counts = r[first], c[first], pos[first], counts.clamp(max=max_firing)
            # rows grouped by their firing count rounded up to a power of two, so a row's least-squares system
            # is padded to at most twice its size (most rows fire on a few latents, a few on many)
            width = torch.where(counts > 0, 2 ** torch.ceil(torch.log2(counts.clamp_min(1).double())).long(), 0)
            for m in width.unique().tolist():
                if m == 0:
                    continue
                group = (width == m).nonzero().squeeze(1)
                slot = torch.full((rows,), -1, dtype=torch.long, device=r.device)
                slot[group] = torch.arange(group.numel(), device=r.device)
                mine = slot[r] >= 0
                D = e.new_zeros(group.numel(), m, W_dec.shape[1])
                D[slot[r[mine]], pos[mine]] = W_dec.detach()[c[mine]].to(wide)  # zero padding
                gram = D @ D.transpose(1, 2)
                # a small ridge keeps the padding and near-parallel decoder rows solvable
                diagonal, info = gram.diagonal(dim1=1, dim2=2), torch.finfo(wide)
                diagonal.add_(info.eps * D.shape[-1] * diagonal.mean() + info.tiny)
                eg = e[group]
                e[group] = eg - (D.transpose(1, 2) @ torch.linalg.solve(gram, D @ eg.unsqueeze(-1))).squeeze(-1)
    values = _KeptEntries.apply(quiet, x_in, W_enc, b_enc, idx) * keep
    return (decode(values, idx, W_dec, None) - e).pow(2).sum() / total.clamp_min(torch.finfo(total.dtype).tiny)


def entry_norms(W_dec: Tensor, indices: Optional[Tensor]) -> Tensor:
    """``‖W_dec[j]‖`` at each code entry: ``[d_sae]`` for a dense code, ``[..]`` like ``indices`` otherwise."""
    norms = W_dec.norm(dim=1)
    return norms if indices is None else norms[indices]


def tanh_sparsity(values: Tensor, indices: Optional[Tensor], W_dec: Tensor, scale: float, rows: int) -> Tensor:
    """Anthropic's smooth L0: ``mean_b Σ_j tanh(c · f_bj · ‖W_dec[j]‖)`` over ``rows`` rows, ``f ≥ 0``.

    ``values``/``indices`` is the code in any layout of :class:`SAEForward`; the gradient reaches f (hence θ
    through JumpReLU's pseudo-derivative) and the decoder norms.
    """
    t = torch.tanh(scale * values * entry_norms(W_dec, indices).to(values.dtype))
    return t.sum() / max(rows, 1)


def pre_activation_loss(x_in: Tensor, W_enc: Tensor, b_enc: Tensor, threshold: Tensor, W_dec: Tensor,
                        dead_mask: Tensor) -> Tensor:
    """``mean_b Σ_{j dead} relu(θ_j - pre_bj) · ‖W_dec[j]‖``: pulls dead latents' pre-activations up to their
    thresholds (Anthropic's pre-activation loss, applied to dead latents only as SAELens does). Only the dead
    latents' encoder columns are multiplied."""
    dead = dead_mask.nonzero().squeeze(1)
    if dead.numel() == 0 or x_in.shape[0] == 0:
        return x_in.new_zeros(())
    pre = x_in @ W_enc[:, dead] + b_enc[dead]
    gap = F.relu(threshold[dead].to(pre.dtype) - pre)
    return (gap * W_dec[dead].norm(dim=1)).sum(-1).mean()


def quadratic_l0(l0: Tensor, target: float) -> Tensor:
    """``(mean_b L0_b / T - 1)²``: zero at the target L0 ``T`` (dictionary_learning's target-L0 loss; with the
    step function's pseudo-derivative its gradient moves θ towards the target from both sides)."""
    return (l0.mean() / target - 1.0).pow(2)


def jumprelu_loss(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    threshold: Tensor,
    bandwidth: Bandwidth,
    sparsity_coefficient: float,
    apply_b_dec_to_input: bool = False,
) -> dict:
    """``mean_b Σ_i (x̂ - x)² + λ · mean_b Σ_j H(pre - θ)``."""
    out = jumprelu_sae_forward(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input)
    m = mse(out.x_hat, x)
    sparsity = out.l0.mean()
    return dict(loss=m + sparsity_coefficient * sparsity, mse=m, sparsity=sparsity, x_hat=out.x_hat)


def topk_loss(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    k: int,
    dead_mask: Optional[Tensor] = None,
    k_aux: int = 512,
    aux_coefficient: float = 1 / 32,
    apply_b_dec_to_input: bool = True,
    batch_topk: bool = False,
) -> dict:
    """``mean_b Σ_i (x̂ - x)² + α · AuxK`` (TopK, or BatchTopK with ``batch_topk=True``)."""
    forward = batchtopk_sae_forward if batch_topk else topk_sae_forward
    out = forward(x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input)
    m = mse(out.x_hat, x)
    aux = x.new_zeros(())
    if dead_mask is not None:
        x_in = encoder_input(x, b_dec, apply_b_dec_to_input)
        e_hat = auxk_reconstruction(x_in, W_enc, b_enc, W_dec, dead_mask, k_aux)
        if e_hat is not None:
            aux = auxk_loss((x - out.x_hat).detach(), e_hat)
    return dict(loss=m + aux_coefficient * aux, mse=m, aux=aux, x_hat=out.x_hat)


def relu_loss(x, W_enc, b_enc, W_dec, b_dec, sparsity_coefficient: float, apply_b_dec_to_input=False) -> dict:
    """``mean_b Σ_i (x̂ - x)² + λ · mean_b Σ_j f_j ‖W_dec[j]‖``."""
    out = relu_sae_forward(x, W_enc, b_enc, W_dec, b_dec, apply_b_dec_to_input)
    m = mse(out.x_hat, x)
    sparsity = out.sparsity.mean()
    return dict(loss=m + sparsity_coefficient * sparsity, mse=m, sparsity=sparsity, x_hat=out.x_hat)


def gated_loss(
    x, W_enc, b_gate, r_mag, b_mag, W_dec, b_dec, sparsity_coefficient: float, apply_b_dec_to_input=True
) -> dict:
    """``MSE + λ‖relu(π_gate)‖₁ + ‖x - x̂_frozen(relu(π_gate))‖²`` (all means over the batch)."""
    out = gated_sae_forward(x, W_enc, b_gate, r_mag, b_mag, W_dec, b_dec, apply_b_dec_to_input)
    m = mse(out.x_hat, x)
    sparsity = out.sparsity.mean()
    return dict(loss=m + sparsity_coefficient * sparsity + out.aux, mse=m, sparsity=sparsity, aux=out.aux,
                x_hat=out.x_hat)


# ----------------------------------------------------------------------------------------------
# Matryoshka BatchTopK (Bussmann et al. 2025): nested prefix reconstructions, computed sparsely
# ----------------------------------------------------------------------------------------------


@dataclass
class MatryoshkaForward(SAEForward):
    """A Matryoshka forward pass: ``prefixes [G, B, d_out]`` holds the reconstruction from the latents below each
    width ``widths[g]`` (plus ``b_dec``); ``prefixes[-1]`` is ``x_hat``. ``values``/``rows``/``cols``: the kept
    entries (differentiable values), flat, grouped by row (the reference's sorted by latent within a row)."""

    prefixes: Optional[Tensor] = None
    cols: Optional[Tensor] = None


def batchtopk_entries(pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``B·k`` largest entries of ``pre [B, d_sae]`` (already ReLU'd) as ``(values, rows, cols)``, sorted by
    row and then latent: sorting the flat indices ``row · d_sae + latent`` sorts both at once."""
    B, d_sae = pre.shape
    n_keep = min(B * k, pre.numel())
    _, flat = torch.topk(pre.detach().reshape(-1), n_keep, sorted=False)
    flat = flat.sort().values
    return pre.reshape(-1)[flat], flat // d_sae, flat % d_sae


def topk_entries(pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's ``k`` largest entries of ``pre [B, d_sae]`` (already ReLU'd) as ``(values, rows, cols)``, sorted like
    :func:`batchtopk_entries`' (the TopK selection, for a Matryoshka SAE's per-row warm-up)."""
    B, d_sae = pre.shape
    _, idx = torch.topk(pre.detach(), min(k, d_sae), dim=1, sorted=False)
    flat = (torch.arange(B, device=pre.device)[:, None] * d_sae + idx).reshape(-1).sort().values
    return pre.reshape(-1)[flat], flat // d_sae, flat % d_sae


def prefix_reconstructions(values: Tensor, rows: Tensor, cols: Tensor, W_dec: Tensor, b_dec: Tensor,
                           widths: list, n_rows: int) -> Tensor:
    """``[G, B, d_out]``: ``b_dec + Σ_{entries of row b with latent < widths[g]} value · W_dec[latent]``.

    Each entry's contribution goes to the segment of its group (the first width above its latent); a cumulative
    sum over the groups makes every prefix a running sum. Cost O(nnz · d_out) plus one ``[B, d_out]`` per width;
    no dense ``[B, d_sae]`` code and no per-prefix matmul.
    """
    G, d_out = len(widths), W_dec.shape[1]
    group = torch.bucketize(cols, torch.tensor(widths, device=cols.device), right=True)
    parts = values.new_zeros(G * n_rows, d_out).index_add(0, group * n_rows + rows,
                                                          values[:, None] * W_dec[cols])
    return parts.reshape(G, n_rows, d_out).cumsum(0) + b_dec


def matryoshka_batchtopk_sae_forward(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    k: int,
    widths: list,
    apply_b_dec_to_input: bool = True,
    per_row: bool = False,
) -> MatryoshkaForward:
    """BatchTopK code (``B·k`` largest of ``relu(pre)`` over the batch; ``per_row``: each row's ``k`` largest, the
    TopK selection), decoded at every Matryoshka width."""
    pre = F.relu(encoder_input(x, b_dec, apply_b_dec_to_input) @ W_enc + b_enc)
    values, rows, cols = (topk_entries if per_row else batchtopk_entries)(pre, k)
    prefixes = prefix_reconstructions(values, rows, cols, W_dec, b_dec, widths, x.shape[0])
    with torch.no_grad():
        active = values > 0
        l0 = torch.zeros(x.shape[0], device=x.device).index_add_(0, rows, active.float())
        fired = torch.zeros(W_enc.shape[1], dtype=torch.bool, device=x.device).index_fill_(0, cols[active], True)
        min_kept = values[active].min() if bool(active.any()) else None
    return MatryoshkaForward(x_hat=prefixes[-1], l0=l0, fired=fired, min_kept=min_kept, prefixes=prefixes,
                             values=values, rows=rows, cols=cols)


def matryoshka_from_kept(out: SAEForward, W_dec: Tensor, b_dec: Tensor, widths: list) -> MatryoshkaForward:
    """The Matryoshka forward from a fused TopK / BatchTopK step (``Backend.kept_sae``): that step's ``x_hat`` is
    the full width's reconstruction, and the inner prefixes are running sums of one ``embedding_bag`` over the
    entries below ``widths[-2]`` only, one bag per (inner group, row) — the full width's entries, the most, are
    decoded once, by the step. About 3x less time than :func:`prefix_reconstructions`' gather and ``index_add``
    at d_sae 8192, k 32 (AMD EPYC); one device→host read (how many entries are inner)."""
    B = out.x_hat.shape[0]
    values, cols = out.values.reshape(-1), out.indices.reshape(-1).long()
    rows = out.rows.long() if out.rows is not None else \
        torch.arange(B, device=cols.device).repeat_interleave(out.values.shape[-1])
    prefixes = out.x_hat[None]
    if len(widths) > 1:
        G = len(widths) - 1
        group = torch.bucketize(cols, cols.new_tensor(widths), right=True)
        inner = (group < G).nonzero().squeeze(1)
        bag, order = torch.sort(group[inner] * B + rows[inner], stable=True)
        inner = inner[order]
        starts = torch.searchsorted(bag, torch.arange(G * B, device=bag.device))
        parts = F.embedding_bag(cols[inner], W_dec, starts, mode="sum", per_sample_weights=values[inner])
        prefixes = torch.cat([parts.reshape(G, B, W_dec.shape[1]).cumsum(0) + b_dec, prefixes])
    return MatryoshkaForward(x_hat=out.x_hat, l0=out.l0, fired=out.fired, min_kept=out.min_kept, prefixes=prefixes,
                             values=values, rows=rows, cols=cols)


def matryoshka_loss(prefixes: Tensor, target: Tensor, weights: Optional[Sequence[float]] = None) -> Tensor:
    """``Σ_g w_g · mean_b Σ_i (x̂_g - target)²`` over the inner prefixes (the full width is the ordinary MSE, weight
    1). ``weights``: one per inner prefix (``len(prefixes) - 1``); None = all 1, SAELens' ``matryoshka_batchtopk``
    weighting (each prefix once, unweighted; dictionary_learning's default ``1/G`` for every group, the full one
    included, is the same up to the overall scale)."""
    per_prefix = (prefixes[:-1] - target).pow(2).sum(-1).mean(-1)
    if weights is None:
        return per_prefix.sum()
    if len(weights) != per_prefix.shape[0]:
        raise ValueError(f"matryoshka_loss: {per_prefix.shape[0]} inner prefixes but {len(weights)} weights")
    return (per_prefix * per_prefix.new_tensor(list(weights))).sum()
