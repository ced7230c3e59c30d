"""fastsae: fast sparse autoencoders — fused Triton (GPU) and C++ (CPU) kernels behind drop-in modules."""
from .dispatch import backends
from .functional import jumprelu, sparse_decode, step, topk
from .io import from_saelens, load, to_saelens
from .sae import (SAE, AbsTopKSAE, AbsTopKTranscoder, BatchTopKSAE, BatchTopKTranscoder, GatedSAE, GatedTranscoder, JumpReLUSAE, JumpReLUTranscoder,
                  MatryoshkaBatchTopKSAE, MatryoshkaBatchTopKTranscoder, ReLUSAE, ReLUTranscoder, TopKSAE,
                  TopKTranscoder, Transcoder, TrainOutput)
from . import data, metrics  # noqa: E402  (fastsae.data.synthetic, fastsae.metrics.evaluate)
# The function shadows the submodule on the package; `from fastsae.training import ...` still reaches the module.
from .training import TrainResult, train
from . import distributed  # noqa: E402,F401  (registers the sharded checkpoint format with fastsae.io)

__version__ = "0.1.0"

__all__ = [
    "backends",
    "jumprelu",
    "step",
    "topk",
    "sparse_decode",
    "SAE",
    "JumpReLUSAE",
    "TopKSAE",
    "AbsTopKSAE",
    "BatchTopKSAE",
    "MatryoshkaBatchTopKSAE",
    "Transcoder",
    "ReLUTranscoder",
    "JumpReLUTranscoder",
    "TopKTranscoder",
    "AbsTopKTranscoder",
    "BatchTopKTranscoder",
    "MatryoshkaBatchTopKTranscoder",
    "GatedTranscoder",
    "GatedSAE",
    "ReLUSAE",
    "TrainOutput",
    "load",
    "from_saelens",
    "to_saelens",
    "train",
    "TrainResult",
    "data",
    "metrics",
]
