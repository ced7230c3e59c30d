"""The ``triton`` backend: fused sparse SAE training on GPUs (DESIGN.md §2).

JumpReLU training step::

    encode_jumprelu      one GEMM x @ W_enc; epilogue keeps active ∪ window entries   (encode.py)
    sampled_encoder      attaches the encoder's sparse backward to those entries       (encode.py)
    jumprelu_decode      x̂ = Σ f·W_dec rows, l0; backward: SDDMM + per-latent segments (decode.py)

TopK / BatchTopK: ``encode_topk`` / ``encode_batchtopk`` (GEMM + per-tile top-k epilogue), then
``sampled_encoder`` and ``sparse_decode``. Nothing of size ``[B, d_sae]`` is written in training
(the cuBLAS-slab encoder holds one bounded slab of it at a time).

ReLU and Gated: the JumpReLU compaction with θ = 0 and no window (ε = NaN) keeps ``pre > 0`` (ReLU) or the open
gates (Gated, whose magnitudes are an SDDMM at those entries), then the same sampled encoder and sparse
decode. Dense or sparse: JumpReLU, ReLU and Gated run these kernels or the dense eager formulation from
the previous step's longest list against ``dispatch.CROSSOVERS[("triton", ...)]`` (``Backend.density``);
TopK / BatchTopK from k. Same math either way.

Inference (``encode``, ``encode_sparse``, ``reconstruct``): the same fused encoders (threshold — JumpReLU,
ReLU, a calibrated BatchTopK —, gated, topk, batchtopk), then the sparse decode.

Device→host reads: none in a TopK or BatchTopK step (BatchTopK's lists are CSR, whose sizes the host
knows), one in a sparse JumpReLU, ReLU or Gated step (the longest list, which sizes the lists; the next
density decision reuses it), one in their dense steps (the longest row, read at the next decision).
``tests/test_triton_syncs.py`` counts them.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (a correctness tool). Inputs
whose dtype the kernels do not take on a device (bf16 in the interpreter), empty batches, and the
architectures without fused kernels (AbsTopK, Matryoshka) use the eager reference — never an approximation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference as ref
from ..dispatch import Backend


def _triton_import_error():
    try:
        import triton  # noqa: F401  (the import is the check)
    except Exception as e:  # pragma: no cover - depends on the install
        return f"triton is not importable ({type(e).__name__}: {e}); install it with `pip install triton`"
    from .triton_common import MIN_TRITON, triton_version

    if triton_version() < MIN_TRITON:
        want = ".".join(map(str, MIN_TRITON))
        return (f"triton {triton.__version__} is older than {want}, whose masked vector tl.atomic_add returns the "
                f"old value to every thread (triton-lang/triton#7402); install triton>={want}")
    return None


class TritonBackend(Backend):
    """Triton kernels: fused encoder, sparse decode, sparse backward, elementwise JumpReLU/step, top-k."""

    name = "triton"

    @classmethod
    def availability(cls):
        why = _triton_import_error()
        if why is not None:
            return False, why
        from .triton_common import interpreting

        if torch.cuda.is_available():
            import triton

            return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
        if interpreting():
            return True, "triton interpreter on CPU tensors (TRITON_INTERPRET=1; slow, for testing)"
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU through the interpreter)"

    def supports(self, device):
        from .triton_common import interpreting

        if device.type == "cuda":
            return None
        if device.type == "cpu" and interpreting():
            return None
        return f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); got {device.type}"

    # -- helpers ------------------------------------------------------------------------
    @staticmethod
    def _ok(*tensors) -> bool:
        """Every tensor has a dtype the kernels take on its device, and there is work to do."""
        from .triton_common import kernel_dtypes

        for t in tensors:
            if t is None:
                continue
            if t.dtype not in kernel_dtypes(t.device) or t.numel() == 0:
                return False
        return True

    # -- elementwise and selection ops ----------------------------------------------------
    def jumprelu(self, pre, threshold, bandwidth):
        if not self._ok(pre, threshold, bandwidth):
            return super().jumprelu(pre, threshold, bandwidth)
        from . import jumprelu as ops

        return ops.jumprelu(pre, threshold, bandwidth.to(pre.device))

    def step(self, pre, threshold, bandwidth):
        if not self._ok(pre, threshold, bandwidth):
            return super().step(pre, threshold, bandwidth)
        from . import jumprelu as ops

        return ops.step(pre, threshold, bandwidth.to(pre.device))

    def topk(self, pre, k):
        if not self._ok(pre):
            return super().topk(pre, k)
        from . import topk as ops

        lead = pre.shape[:-1]
        v, i = ops.topk(pre.reshape(-1, pre.shape[-1]), k)
        return v.reshape(*lead, k), i.reshape(*lead, k)

    def sparse_decode(self, values, indices, W_dec, b_dec):
        if not self._ok(values, W_dec) or values.shape[-1] == 0:
            return super().sparse_decode(values, indices, W_dec, b_dec)
        from . import decode as ops

        lead, k = values.shape[:-1], values.shape[-1]
        out = ops.sparse_decode(values.reshape(-1, k), indices.reshape(-1, k), W_dec, b_dec)
        return out.reshape(*lead, W_dec.shape[1])

    # -- fused SAE training steps ----------------------------------------------------------
    # Each step with a data-dependent density runs the sparse kernels or the dense (eager reference) formulation,
    # as ``self.density`` chooses from the previous step (crossovers: ``dispatch.CROSSOVERS[("triton", ...)]``).
    # Triton's density is the longest row of its padded lists: the lists cost B x that, whatever the mean.
    def jumprelu_sae(self, x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input,
                     ste_to_input=False, need_values=False):
        if not self._ok(x, W_enc, b_enc, W_dec, b_dec, threshold):
            return super().jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input,
                                        ste_to_input, need_values)
        if not self.density.sparse("jumprelu", W_enc):
            out = ref.jumprelu_sae_forward(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input,
                                           ste_to_input, count_kept=True)
            self._record_dense(W_enc, out.kept)
            return out
        from .decode import jumprelu_decode

        # ε keeps its dtype: the kernels widen θ and ε to float32-or-wider exactly as reference._kernel_window does
        bandwidth = bandwidth.to(device=threshold.device).contiguous()
        lists = self._lists(x, W_enc, b_enc, b_dec, apply_b_dec_to_input, threshold, bandwidth)
        x_hat, l0, f = jumprelu_decode(lists.pre, lists.idx, lists.counts, threshold, bandwidth, W_dec, b_dec,
                                       lists.order, lists.offsets, False, bool(ste_to_input))
        with torch.no_grad():
            active = lists.valid() & (lists.pre > threshold[lists.idx.long()])
            fired = _fired(lists.idx, active, W_enc.shape[1])
        if not need_values:
            return ref.SAEForward(x_hat=x_hat, l0=l0, fired=fired)
        # the code in the padded layout of SAEForward (0 at padding and at window-only entries)
        return ref.SAEForward(x_hat=x_hat, l0=l0, fired=fired, values=f, indices=lists.idx.long())

    def relu_sae(self, x, W_enc, b_enc, W_dec, b_dec, apply_b_dec_to_input):
        if not self._ok(x, W_enc, b_enc, W_dec, b_dec):
            return super().relu_sae(x, W_enc, b_enc, W_dec, b_dec, apply_b_dec_to_input)
        if not self.density.sparse("relu", W_enc):
            out = super().relu_sae(x, W_enc, b_enc, W_dec, b_dec, apply_b_dec_to_input)
            self._record_dense(W_enc, out.l0)  # pre > 0 exactly where f > 0
            return out
        from .decode import sparse_decode

        lists = self._lists(x, W_enc, b_enc, b_dec, apply_b_dec_to_input, *_no_window(W_enc.shape[1], x))
        f = lists.pre  # relu(pre) = pre at the kept entries (pre > 0); 0 at padding
        x_hat = sparse_decode(f, lists.idx, W_dec, b_dec, lists.order, lists.offsets, None, None, False, lists.counts)
        # the decoder-norm-weighted L1 at the entries; autograd carries its gradient to W_dec's row norms
        sparsity = (f * W_dec.norm(dim=1)[lists.idx.long()]).sum(-1)
        with torch.no_grad():
            fired = _fired(lists.idx, lists.valid(), W_enc.shape[1])
        return ref.SAEForward(x_hat=x_hat, l0=lists.counts.float(), fired=fired, sparsity=sparsity)

    def gated_sae(self, x, W_enc, b_gate, r_mag, b_mag, W_dec, b_dec, apply_b_dec_to_input):
        if not self._ok(x, W_enc, b_gate, r_mag, b_mag, W_dec, b_dec):
            return super().gated_sae(x, W_enc, b_gate, r_mag, b_mag, W_dec, b_dec, apply_b_dec_to_input)
        if not self.density.sparse("gated", W_enc):
            out = ref.gated_sae_forward(x, W_enc, b_gate, r_mag, b_mag, W_dec, b_dec, apply_b_dec_to_input,
                                        count_kept=True)
            self._record_dense(W_enc, out.kept)
            return out
        from .decode import sparse_decode
        from .encode import sampled_encoder

        x = x.contiguous()
        # The gate's lists hold every entry the step needs: f, relu(π_gate) (the L1 term) and the frozen-decoder
        # reconstruction are all 0 where the gate is shut, and so are their gradients.
        lists = self._lists(x, W_enc, b_gate, b_dec, apply_b_dec_to_input, *_no_window(W_enc.shape[1], x))
        gate = lists.pre  # π_gate at the open gates (> 0: relu(π_gate) itself); 0 at padding
        # W_mag = exp(r_mag) ⊙ W_gate as the reference forms it (autograd takes its gradient to W_gate and r_mag),
        # transposed so that the SDDMM and the grad-x gather read contiguous rows
        W_mag_t = (W_enc * torch.exp(r_mag)).t().contiguous()
        mag = sampled_encoder(x, W_mag_t.t(), b_mag, b_dec if apply_b_dec_to_input else None, lists.idx,
                              lists.counts, self._sampled_pre(lists, W_mag_t, b_mag), lists.order, lists.offsets,
                              None, None, False)
        f = F.relu(mag)
        x_hat = sparse_decode(f, lists.idx, W_dec, b_dec, lists.order, lists.offsets, None, None, False, lists.counts)
        x_hat_frozen = sparse_decode(gate, lists.idx, W_dec.detach(), b_dec.detach(), lists.order, lists.offsets,
                                     None, None, False, lists.counts)
        with torch.no_grad():
            active = f > 0
            fired = _fired(lists.idx, active, W_enc.shape[1])
        return ref.SAEForward(x_hat=x_hat, l0=active.sum(-1).float(), fired=fired, sparsity=gate.sum(-1),
                              aux=ref.mse(x_hat_frozen, x))

    def kept_sae(self, x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input, per_row):
        if not self._ok(x, W_enc, b_enc, W_dec, b_dec) or \
                not self.density.sparse_at("topk" if per_row else "batchtopk", W_enc, k):
            return None
        from .encode import encode_batchtopk, encode_topk

        if per_row:
            x_hat, values, indices, active, fired, _, _ = self._kept_sae(
                x, W_enc, b_enc, W_dec, b_dec, apply_b_dec_to_input, lambda *a: encode_topk(*a, k))
            return ref.SAEForward(x_hat=x_hat, l0=active.sum(-1).float(), fired=fired, values=values,
                                  indices=indices)
        x_hat, values, indices, active, fired, rows, row_ptr = self._kept_sae(
            x, W_enc, b_enc, W_dec, b_dec, apply_b_dec_to_input, lambda *a: encode_batchtopk(*a, k))
        with torch.no_grad():
            # CSR lists: l0 per row from a prefix sum over the row segments, no host read
            c = torch.nn.functional.pad(active.cumsum(0, dtype=torch.int64), (1, 0))
            l0 = (c[row_ptr[1:]] - c[row_ptr[:-1]]).float()
            # +inf when nothing positive was kept (the reference returns None there, which would need a read)
            min_kept = torch.where(active, values.detach(), torch.full_like(values, float("inf"))).amin()
        return ref.SAEForward(x_hat=x_hat, l0=l0, fired=fired, values=values, indices=indices, rows=rows,
                              min_kept=min_kept)

    # -- the sparse steps' shared parts ---------------------------------------------------
    def _record_dense(self, W_enc, kept):
        """A dense step's per-row counts: the longest row, left on the device (read at the next decision)."""
        self.density.record(W_enc, kept.detach().max(), 1)

    def _lists(self, x, W_enc, b_enc, b_dec, apply_b_dec_to_input, threshold, bandwidth) -> "_Lists":
        """The encoder's compact lists (``pre > θ`` or inside the window), their latent segments, and the
        pre-activations there re-attached to the encoder's sparse backward; records the longest row."""
        from .encode import encode_jumprelu, longest_list, sampled_encoder
        from .triton_common import segments

        B, d_sae = x.shape[0], W_enc.shape[1]
        x = x.contiguous()
        with torch.no_grad():
            x_in = ref.encoder_input(x, b_dec, apply_b_dec_to_input).detach()
            idx, pre, counts = encode_jumprelu(x_in, W_enc.detach(), b_enc.detach(), threshold.detach(), bandwidth)
            order, offsets = segments(idx, counts, d_sae)
        self.density.record(W_enc, longest_list(B, d_sae), 1)  # host-known: the op read it to size the lists
        # the lists come from our own encoder: no index checks (checked=False)
        pre = sampled_encoder(x, W_enc, b_enc, b_dec if apply_b_dec_to_input else None, idx, counts, pre,
                              order, offsets, None, None, False)
        return _Lists(x_in, idx, counts, order, offsets, pre)

    @staticmethod
    def _sampled_pre(lists, W_t, bias):
        """``x_in[b] · W_t[j] + bias[j]`` at the lists' entries (an SDDMM; 0 at padding), without gradient."""
        from .decode import sddmm

        with torch.no_grad():
            s = sddmm(lists.x_in, lists.idx, W_t.detach(), None, False, lists.counts)
            return torch.where(lists.valid(), s + bias.detach()[lists.idx.long()], torch.zeros_like(s))

    @staticmethod
    def _kept_sae(x, W_enc, b_enc, W_dec, b_dec, apply_b_dec_to_input, select):
        """The shared body of TopK and BatchTopK: ``select(x_in, W_enc, b_enc)`` picks the kept entries
        without gradient — ``(values [B, k], indices)`` for TopK, CSR ``(values, indices, rows, row_ptr)``
        for BatchTopK; the sampled encoder re-attaches the gradient at exactly those entries, then the
        sparse decode."""
        from .decode import sparse_decode
        from .encode import sampled_encoder
        from .triton_common import segments

        d_sae = W_enc.shape[1]
        x = x.contiguous()
        with torch.no_grad():
            x_in = ref.encoder_input(x, b_dec, apply_b_dec_to_input)
            values, indices, *csr = select(x_in.detach(), W_enc.detach(), b_enc.detach())
            rows, row_ptr = csr if csr else (None, None)
            order, offsets = segments(indices.reshape(-1, indices.shape[-1]), None, d_sae)
        # the lists come from our own encoders: no index checks (checked=False)
        values = F.relu(sampled_encoder(x, W_enc, b_enc, b_dec if apply_b_dec_to_input else None, indices, None,
                                        values, order, offsets, rows, row_ptr, False))
        x_hat = sparse_decode(values, indices, W_dec, b_dec, order, offsets, rows, row_ptr, False)
        with torch.no_grad():
            active = values > 0
            fired = _fired(indices, active, d_sae)
        return x_hat, values, indices, active, fired, rows, row_ptr

    # -- inference: the fused GEMM + compaction encoders (no dense [B, d_sae] beyond one slab) ---------------
    _FUSED_KINDS = ("threshold", "gated", "topk", "batchtopk")

    def _fusable(self, enc, x, W_dec=None) -> bool:
        """The fused encoders have no backward: only calls autograd would not record, in the kernels' dtypes."""
        if enc.kind not in self._FUSED_KINDS or x.dim() != 2 or enc.needs_grad(x):
            return False
        if W_dec is not None and torch.is_grad_enabled() and W_dec.requires_grad:
            return False
        return self._ok(x, W_dec, *enc.tensors())

    def _code(self, enc, x):
        """The code as padded lists ``(values [B, K], indices [B, K] int, counts [B] or None)`` — padding holds
        value 0 at latent 0, zeros may sit among the entries — or CSR ``(values, indices, rows, row_ptr)``."""
        from .encode import encode_batchtopk, encode_jumprelu, encode_topk

        x = x.contiguous()
        x_in = ref.encoder_input(x, enc.b_dec, enc.apply_b_dec_to_input)
        if enc.kind == "topk":
            return (*encode_topk(x_in, enc.W_enc, enc.b_enc, enc.k), None)
        if enc.kind == "batchtopk":
            return encode_batchtopk(x_in, enc.W_enc, enc.b_enc, enc.k)
        no_theta, no_eps = _no_window(enc.d_sae, x)
        theta = enc.threshold.contiguous() if enc.kind == "threshold" else no_theta  # a calibrated BatchTopK's expands
        idx, pre, counts = encode_jumprelu(x_in, enc.W_enc, enc.b_enc, theta, no_eps)
        if enc.kind == "threshold":
            return pre, idx, counts  # pre > θ at every entry: f = pre there
        lists = _Lists(x_in, idx, counts, None, None, None)
        W_mag_t = (enc.W_enc * torch.exp(enc.r_mag)).t().contiguous()
        return F.relu(self._sampled_pre(lists, W_mag_t, enc.b_mag)), idx, counts

    def encode(self, enc, x):
        if not self._fusable(enc, x):
            return super().encode(enc, x)
        code = self._code(enc, x)
        f = x.new_zeros(x.shape[0], enc.d_sae)
        if len(code) == 4:  # CSR: every (row, latent) once
            values, indices, rows, _ = code
            return f.index_put_((rows.long(), indices.long()), values)
        values, indices, _ = code
        return f.scatter_add_(1, indices.long(), values)  # padding adds 0 (at latent 0, maybe a real entry's)

    def encode_sparse(self, enc, x):
        if not self._fusable(enc, x):
            return super().encode_sparse(enc, x)
        code = self._code(enc, x)
        if enc.kind == "topk":
            return code[0], code[1]  # the row's k largest, sorted, as the reference returns them
        if len(code) == 4:
            values, indices, rows, row_ptr = code
            slot = torch.arange(values.shape[0], device=x.device) - row_ptr[rows.long()]
            K = int((row_ptr[1:] - row_ptr[:-1]).max()) if x.shape[0] else 0
            pv = values.new_zeros(x.shape[0], K)
            pi = indices.new_zeros(x.shape[0], K)
            pv[rows.long(), slot] = values
            pi[rows.long(), slot] = indices
            values, indices = pv, pi
        else:
            values, indices, _ = code
        return _nonzero_first(values, indices)

    def reconstruct(self, enc, x, W_dec):
        if not self._fusable(enc, x, W_dec):
            return super().reconstruct(enc, x, W_dec)
        from .decode import sparse_decode

        code = self._code(enc, x)
        if len(code) == 4:
            values, indices, rows, row_ptr = code
            return sparse_decode(values, indices, W_dec, enc.b_dec, None, None, rows, row_ptr, False)
        values, indices, counts = code
        return sparse_decode(values, indices, W_dec, enc.b_dec, None, None, None, None, False, counts)


class _Lists:
    """A sparse step's compact lists: ``x_in``, ``idx``/``counts`` (padded rows), ``order``/``offsets`` (latent
    segments) and ``pre`` (the kept pre-activations, differentiable)."""

    def __init__(self, x_in, idx, counts, order, offsets, pre):
        self.x_in, self.idx, self.counts, self.order, self.offsets, self.pre = x_in, idx, counts, order, offsets, pre

    def valid(self):
        from .triton_common import valid_mask

        return valid_mask(self.counts, *self.idx.shape, self.idx.device)


def _no_window(d_sae, x):
    """``(θ = 0, ε = NaN)`` for the JumpReLU compaction: it then keeps exactly ``pre > 0`` (ReLU, Gated's gate).
    With a NaN bandwidth the window test ``-1/2 < (pre - θ)/ε < 1/2`` compares NaN, never true: no window (ε = 0
    would do too, through ±inf, but divides by zero)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (torch.zeros(d_sae, dtype=dtype, device=x.device),
            torch.full((d_sae,), float("nan"), dtype=dtype, device=x.device))


def _nonzero_first(values, indices):
    """Padded ``(values, indices int64) [B, K]`` of the nonzero entries of a row's list, in the list's (latent)
    order, ``K`` the longest row: the layout of ``inference.dense_to_padded`` (padding value 0 at latent 0)."""
    nz = values != 0
    order = torch.sort((~nz).to(torch.int8), dim=1, stable=True).indices
    K = int(nz.sum(1).max()) if values.shape[0] else 0
    order = order[:, :K]
    values = values.gather(1, order)
    indices = torch.where(values != 0, indices.long().gather(1, order), torch.zeros_like(order))
    return values, indices


def _fired(indices, active, d_sae):
    """``[d_sae]`` bool: latents active in at least one row, from compact lists (no dense code)."""
    slot = torch.where(active, indices.long(), torch.full_like(indices, d_sae, dtype=torch.long))
    hit = torch.zeros(d_sae + 1, dtype=torch.int8, device=indices.device)
    return hit.scatter_(0, slot.reshape(-1), 1)[:d_sae].bool()
