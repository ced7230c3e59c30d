"""The ``triton`` backend: fused sparse SAE training on GPUs (DESIGN.md §2).

JumpReLU training step::

    encode_jumprelu      one GEMM x @ W_enc; epilogue keeps active ∪ window entries   (encode.py)
    sampled_encoder      attaches the encoder's sparse backward to those entries       (encode.py)
    jumprelu_decode      x̂ = Σ f·W_dec rows, l0; backward: SDDMM + per-latent segments (decode.py)

TopK / BatchTopK: ``encode_topk`` / ``encode_batchtopk`` (GEMM + per-tile top-k epilogue), then
``sampled_encoder`` and ``sparse_decode``. Nothing of size ``[B, d_sae]`` is written in training
(the cuBLAS-slab encoder holds one bounded slab of it at a time).

Device→host reads: none in a TopK or BatchTopK step (BatchTopK's lists are CSR, whose sizes the host
knows), one in a JumpReLU step (the longest list, which sizes the lists). ``tests/test_triton_syncs.py``
counts them.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (a correctness tool). Inputs
whose dtype the kernels do not take on a device (bf16 in the interpreter), empty batches, and the
architectures without fused kernels (ReLU, Gated) use the eager reference — never an approximation.
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

    # -- fused SAE forward passes ---------------------------------------------------------
    def jumprelu_sae(self, x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input,
                     ste_to_input=False, need_values=False):
        if ste_to_input or need_values:  # not in the fused kernels yet: the reference computes them
            return super().jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input,
                                        ste_to_input, need_values)
        if not self._ok(x, W_enc, b_enc, W_dec, b_dec, threshold):
            return super().jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input)
        from .decode import jumprelu_decode
        from .encode import encode_jumprelu, sampled_encoder
        from .triton_common import segments

        d_sae = W_enc.shape[1]
        x = x.contiguous()
        # ε keeps its dtype: the kernels widen θ and ε to float32-or-wider exactly as reference._kernel_window does
        bandwidth = bandwidth.to(device=threshold.device).contiguous()
        with torch.no_grad():
            x_in = ref.encoder_input(x, b_dec, apply_b_dec_to_input)
            idx, pre, counts = encode_jumprelu(x_in.detach(), W_enc.detach(), b_enc.detach(), threshold.detach(),
                                               bandwidth)
            order, offsets = segments(idx, counts, d_sae)
        # the lists come from our own encoder: no index checks (checked=False)
        pre = sampled_encoder(x, W_enc, b_enc, b_dec if apply_b_dec_to_input else None, idx, counts, pre,
                              order, offsets, None, None, False)
        x_hat, l0 = jumprelu_decode(pre, idx, counts, threshold, bandwidth, W_dec, b_dec, order, offsets, False)
        with torch.no_grad():
            K = idx.shape[1]
            valid = torch.arange(K, device=x.device).unsqueeze(0) < counts.unsqueeze(1)
            active = valid & (pre > threshold[idx.long()])
            fired = _fired(idx, active, d_sae)
        return ref.SAEForward(x_hat=x_hat, l0=l0, fired=fired)

    def topk_sae(self, x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input):
        if not self._ok(x, W_enc, b_enc, W_dec, b_dec):
            return super().topk_sae(x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input)
        from .encode import encode_topk

        x_hat, values, indices, active, fired, _ = self._kept_sae(
            x, W_enc, b_enc, W_dec, b_dec, apply_b_dec_to_input, lambda *a: encode_topk(*a, k))
        return ref.SAEForward(x_hat=x_hat, l0=active.sum(-1).float(), fired=fired, values=values, indices=indices)

    def batchtopk_sae(self, x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input):
        if not self._ok(x, W_enc, b_enc, W_dec, b_dec):
            return super().batchtopk_sae(x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input)
        from .encode import encode_batchtopk

        x_hat, values, indices, active, fired, row_ptr = self._kept_sae(
            x, W_enc, b_enc, W_dec, b_dec, apply_b_dec_to_input, lambda *a: encode_batchtopk(*a, k))
        with torch.no_grad():
            # CSR lists: l0 per row from a prefix sum over the row segments, no host read
            c = torch.nn.functional.pad(active.cumsum(0, dtype=torch.int64), (1, 0))
            l0 = (c[row_ptr[1:]] - c[row_ptr[:-1]]).float()
            # +inf when nothing positive was kept (the reference returns None there, which would need a read)
            min_kept = torch.where(active, values.detach(), torch.full_like(values, float("inf"))).amin()
        return ref.SAEForward(x_hat=x_hat, l0=l0, fired=fired, min_kept=min_kept)

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
        return x_hat, values, indices, active, fired, row_ptr


def _fired(indices, active, d_sae):
    """``[d_sae]`` bool: latents active in at least one row, from compact lists (no dense code)."""
    slot = torch.where(active, indices.long(), torch.full_like(indices, d_sae, dtype=torch.long))
    hit = torch.zeros(d_sae + 1, dtype=torch.int8, device=indices.device)
    return hit.scatter_(0, slot.reshape(-1), 1)[:d_sae].bool()
