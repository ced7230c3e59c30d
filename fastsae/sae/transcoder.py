"""Transcoders (Dunefsky et al. 2024) and skip transcoders (Paulo et al. 2025) of every architecture: the SAE
classes with a decoder to ``d_out`` dimensions; :func:`fastsae.sae.Transcoder` builds one by name."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import _checks as check
from .. import reference as ref
from ..dispatch import Backend
from .base import TrainOutput
from .jumprelu import JumpReLUSAE
from .l1 import GatedSAE, ReLUSAE
from .topk import AbsTopKSAE, BatchTopKSAE, MatryoshkaBatchTopKSAE, TopKSAE


# ----------------------------------------------------------------------------------------------
# Transcoders (Dunefsky et al. 2024) and skip transcoders (Paulo et al. 2025): every architecture
# ----------------------------------------------------------------------------------------------


class _EagerSAEForwards(Backend):
    """``inner``'s elementwise and selection kernels, with the whole-SAE forwards of the eager reference: the
    fused SAE kernels assume ``W_dec [d_sae, d_in]``, a transcoder's is ``[d_sae, d_out]``."""

    def __init__(self, inner: Backend):
        self.inner, self.name = inner, inner.name

    def jumprelu(self, pre, threshold, bandwidth):
        return self.inner.jumprelu(pre, threshold, bandwidth)

    def step(self, pre, threshold, bandwidth):
        return self.inner.step(pre, threshold, bandwidth)

    def topk(self, pre, k):
        return self.inner.topk(pre, k)

    def sparse_decode(self, values, indices, W_dec, b_dec):
        return self.inner.sparse_decode(values, indices, W_dec, b_dec)


class _Transcoder:
    """Mixed in before an SAE class: the same encoder, a decoder to ``d_out`` dimensions, and with
    ``skip_connection=True`` an affine skip ``x @ W_skip`` (``W_skip [d_in, d_out]``, zero-initialised).

    ``ŷ = decode(encode(x)) + x @ W_skip``; ``training_forward(x, target)`` reconstructs ``target [..., d_out]``.
    The input is never centred (``b_dec`` lives in the output space; as SAELens and sparsify). A skip transcoder
    trains the inner model on ``target - x @ W_skip`` (the same loss and gradients, W_skip's included), so every
    architecture's loss, AuxK and Matryoshka prefixes carry over unchanged.
    """

    is_transcoder = True
    #: the least-squares encoder rescale compares x̂ with x; a transcoder's output lives in another space, and
    #: init_from_data sees only the inputs
    fit_encoder_scale_at_init = False

    def __init__(self, d_in: int, d_sae: int, *args, d_out: Optional[int] = None, skip_connection: bool = False,
                 apply_b_dec_to_input: bool = False, **kwargs):
        if apply_b_dec_to_input:
            raise ValueError("apply_b_dec_to_input must be False for a transcoder (b_dec is the output bias)")
        super().__init__(d_in, d_sae, *args, apply_b_dec_to_input=False, **kwargs)
        self.d_out = check.positive_int("d_out", d_out if d_out is not None else d_in)
        self.skip_connection = bool(skip_connection)
        device = self.W_enc.device
        W_dec = torch.randn(d_sae, self.d_out, dtype=torch.float32, device=device)
        W_dec *= self.decoder_init_norm / W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec.to(self.dtype))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out, dtype=self.dtype, device=device))
        if self.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(d_in, self.d_out, dtype=self.dtype, device=device))

    @property
    def base_architecture(self) -> str:
        return self.architecture.removesuffix("_transcoder")

    def ops(self, device=None):
        inner = super().ops(device)
        return inner if self.d_out == self.d_in else _EagerSAEForwards(inner)

    def _skip(self, x2: Tensor) -> Optional[Tensor]:
        return x2 @ self.W_skip if self.skip_connection else None

    def decode(self, f: Tensor) -> Tensor:
        """``f @ W_dec + b_dec``: ``[..., d_sae] -> [..., d_out]`` (without the skip term, which needs ``x``)."""
        check.float_tensor("f", f)
        check.last_dim("f", f, self.d_sae, "d_sae")
        check.module_device(self, f=f)
        f2 = f.reshape(-1, self.d_sae).to(self.dtype)
        return (f2 @ self.W_dec + self.b_dec).reshape(*f.shape[:-1], self.d_out).to(f.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """The transcoder's output ``ŷ [..., d_out]`` for ``x [..., d_in]``."""
        x2, lead = self._flatten(x)
        values, indices = self._sparse_code(x2)
        y = self.ops(x2.device).sparse_decode(values, indices, self.W_dec, self.b_dec)
        skip = self._skip(x2)
        y = y if skip is None else y + skip
        return y.reshape(*lead, self.d_out).to(x.dtype)

    def training_forward(self, x: Tensor, target: Optional[Tensor] = None, **kwargs) -> TrainOutput:
        if target is None:
            if self.d_out != self.d_in:
                raise ValueError(f"a transcoder to d_out={self.d_out} needs target= (what it predicts from x)")
            target = x
        if not self.skip_connection:
            return super().training_forward(x, target, **kwargs)
        check.float_tensor("x", x)
        check.last_dim("x", x, self.d_in, "d_in")
        check.float_tensor("target", target)
        check.last_dim("target", target, self.d_out, "d_out")
        if target.shape[:-1] != x.shape[:-1]:
            raise ValueError(f"target must have the leading shape of x {tuple(x.shape[:-1])}, got {tuple(target.shape)}")
        x2 = x.reshape(-1, self.d_in)
        skip = x2.to(self.dtype) @ self.W_skip
        t2 = target.reshape(-1, self.d_out).to(self.dtype)
        out = super().training_forward(x2, t2 - skip, **kwargs)
        out.x_hat = out.x_hat + skip
        with torch.no_grad():
            out.fvu = ref.fvu(out.x_hat, t2)
        return out

    def config(self) -> dict:
        cfg = dict(super().config(), d_out=self.d_out, skip_connection=self.skip_connection)
        cfg.pop("apply_b_dec_to_input", None)
        return cfg

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, d_out={self.d_out}, skip_connection={self.skip_connection}"


def _transcoder_class(base: type) -> type:
    name = base.__name__.removesuffix("SAE") + "Transcoder"
    doc = f"{base.__name__} as a transcoder: ``x [..., d_in] -> ŷ [..., d_out]``; see :class:`_Transcoder`."
    return type(name, (_Transcoder, base), dict(architecture=f"{base.architecture}_transcoder", __doc__=doc,
                                               __module__=__name__))


ReLUTranscoder, JumpReLUTranscoder, TopKTranscoder, AbsTopKTranscoder, BatchTopKTranscoder, \
    MatryoshkaBatchTopKTranscoder, GatedTranscoder = TRANSCODERS = tuple(
        _transcoder_class(c) for c in (ReLUSAE, JumpReLUSAE, TopKSAE, AbsTopKSAE, BatchTopKSAE, MatryoshkaBatchTopKSAE,
                                       GatedSAE))
