"""fastsae: fast sparse autoencoders — fused Triton (GPU) and C++ (CPU) kernels behind drop-in modules."""
from .backends import backends
from .functional import jumprelu, sparse_decode, step, topk
from .io import load
from .sae import SAE, BatchTopKSAE, GatedSAE, JumpReLUSAE, ReLUSAE, TopKSAE, TrainOutput

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
    "BatchTopKSAE",
    "GatedSAE",
    "ReLUSAE",
    "TrainOutput",
    "load",
]
