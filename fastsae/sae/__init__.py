"""Drop-in SAE modules: JumpReLUSAE, TopKSAE, BatchTopKSAE, GatedSAE, ReLUSAE.

Parameter names follow SAELens / Gemma Scope (``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_in]``,
``b_dec``, ``threshold``). Modules never branch on hardware: every kernel comes from
``backends.get(self.backend, device)``.

Inputs may be ``[B, d_in]`` or ``[..., d_in]``, any float dtype, contiguous or not. The SAE computes
in its parameters' dtype and returns results in the input's dtype.

One family a module: :mod:`fastsae.sae.base` (:class:`TrainOutput`, :class:`SAE`, what every architecture
shares), :mod:`fastsae.sae.jumprelu`, :mod:`fastsae.sae.topk` (TopK, AbsTopK, BatchTopK, Matryoshka BatchTopK),
:mod:`fastsae.sae.l1` (ReLU, Gated), :mod:`fastsae.sae.transcoder` (every architecture as a transcoder), and here
the registry :data:`ARCHITECTURES` (architecture name -> class) and :func:`Transcoder`. Every name is importable
from ``fastsae.sae``.
"""
from __future__ import annotations

from typing import Optional

from ..inference import dense_to_padded, encoder_of  # noqa: F401  (dense_to_padded: kept importable from here)
# The package's submodules, one family each; every name stays importable from fastsae.sae, where it always was.
from .base import SAE, TrainOutput  # noqa: F401
from .jumprelu import JumpReLUSAE
from .l1 import GatedSAE, ReLUSAE, _L1FamilySAE  # noqa: F401
from .topk import AbsTopKSAE, BatchTopKSAE, MatryoshkaBatchTopKSAE, TopKSAE
from .transcoder import (TRANSCODERS, AbsTopKTranscoder, BatchTopKTranscoder, GatedTranscoder,  # noqa: F401
                         JumpReLUTranscoder, MatryoshkaBatchTopKTranscoder, ReLUTranscoder, TopKTranscoder,
                         _EagerSAEForwards, _Transcoder, _transcoder_class)


ARCHITECTURES = {cls.architecture: cls for cls in (JumpReLUSAE, TopKSAE, AbsTopKSAE, BatchTopKSAE, ReLUSAE,
                                                   GatedSAE)}


ARCHITECTURES[MatryoshkaBatchTopKSAE.architecture] = MatryoshkaBatchTopKSAE


ARCHITECTURES.update((cls.architecture, cls) for cls in TRANSCODERS)


def Transcoder(architecture: str, d_in: int, d_sae: int, *args, d_out: Optional[int] = None,
               skip_connection: bool = False, **kwargs) -> SAE:
    """A transcoder of any architecture (``"relu"``, ``"jumprelu"``, ``"topk"``, ``"abstopk"``, ``"batchtopk"``,
    ``"matryoshka_batchtopk"``, ``"gated"``) mapping ``d_in`` to ``d_out`` (default ``d_in``); the architecture's
    own arguments pass through (``k=``, ``widths=``, ``sparsity_coefficient=``, ...)."""
    cls = ARCHITECTURES.get(f"{architecture}_transcoder")
    if cls is None:
        names = sorted(c.architecture.removesuffix("_transcoder") for c in TRANSCODERS)
        raise ValueError(f"architecture must be one of {names}, got {architecture!r}")
    return cls(d_in, d_sae, *args, d_out=d_out, skip_connection=skip_connection, **kwargs)
