"""Which backends exist here, and the dispatch to them.

A backend is an object with the methods of :class:`Backend`. Every method has a working default
(the eager reference), so a backend overrides only what it accelerates and stays correct for the
rest. The modules and the functional API never branch on hardware: they call :func:`get`.

Adding a backend is a new file plus one line in ``_REGISTRY``.
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch
from torch import Tensor

from . import reference as ref

NAMES = ("triton", "cpp", "eager")


class BackendUnavailable(RuntimeError):
    """The named backend cannot run here (not built, not installed, or wrong device)."""


class Backend:
    """The operations a backend provides. Defaults are the eager reference.

    Shapes follow reference.py: ``x [B, d_in]``; ``bandwidth`` is always a ``[d_sae]`` tensor here
    (the public boundary expands a scalar), ``threshold`` a ``[d_sae]`` tensor.
    """

    name = "eager"

    # -- availability ---------------------------------------------------------------------
    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """``(usable, reason)``; ``reason`` says why not when unusable."""
        return True, "pure PyTorch"

    def supports(self, device: torch.device) -> Optional[str]:
        """``None`` if tensors on ``device`` can run here, else the reason they cannot."""
        return None

    # -- elementwise and selection ops ----------------------------------------------------
    def jumprelu(self, pre: Tensor, threshold: Tensor, bandwidth: Tensor) -> Tensor:
        return ref.jumprelu(pre, threshold, bandwidth)

    def step(self, pre: Tensor, threshold: Tensor, bandwidth: Tensor) -> Tensor:
        return ref.step(pre, threshold, bandwidth)

    def topk(self, pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return ref.topk(pre, k)

    def sparse_decode(self, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Optional[Tensor]) -> Tensor:
        return ref.sparse_decode(values, indices, W_dec, b_dec)

    # -- whole SAE forward passes (what training_forward differentiates) ------------------
    def jumprelu_sae(self, x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input,
                     ste_to_input: bool = False, need_values: bool = False) -> ref.SAEForward:
        """``ste_to_input``: the jump's pseudo-derivative reaches ``pre`` too. ``need_values``: the result's
        ``values``/``indices`` must hold the code, differentiable (a penalty on f uses it)."""
        return ref.jumprelu_sae_forward(x, W_enc, b_enc, W_dec, b_dec, threshold, bandwidth, apply_b_dec_to_input,
                                        ste_to_input)

    def topk_sae(self, x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input) -> ref.SAEForward:
        return ref.topk_sae_forward(x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input)

    def abstopk_sae(self, x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input) -> ref.SAEForward:
        """Composed from this backend's ``topk`` (on ``|pre|``) and ``sparse_decode`` kernels."""
        return ref.abstopk_sae_forward(x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input, topk=self.topk,
                                       decode=self.sparse_decode)

    def batchtopk_sae(self, x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input) -> ref.SAEForward:
        return ref.batchtopk_sae_forward(x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input)

    def relu_sae(self, x, W_enc, b_enc, W_dec, b_dec, apply_b_dec_to_input) -> ref.SAEForward:
        return ref.relu_sae_forward(x, W_enc, b_enc, W_dec, b_dec, apply_b_dec_to_input)

    def gated_sae(self, x, W_enc, b_gate, r_mag, b_mag, W_dec, b_dec, apply_b_dec_to_input) -> ref.SAEForward:
        return ref.gated_sae_forward(x, W_enc, b_gate, r_mag, b_mag, W_dec, b_dec, apply_b_dec_to_input)

    def matryoshka_batchtopk_sae(self, x, W_enc, b_enc, W_dec, b_dec, k, widths,
                                 apply_b_dec_to_input) -> ref.MatryoshkaForward:
        # No fused kernel yet: the eager path is already sparse after the encoder GEMM (prefix running sums).
        return ref.matryoshka_batchtopk_sae_forward(x, W_enc, b_enc, W_dec, b_dec, k, widths, apply_b_dec_to_input)

    def __repr__(self) -> str:
        return f"<fastsae backend {self.name!r}>"


class EagerBackend(Backend):
    """The reference itself: dense, clear, and the baseline of every benchmark."""


# name -> "module:Class". One line per backend.
_REGISTRY = {
    "eager": "fastsae.backends:EagerBackend",
    "cpp": "fastsae.ops.cpp:CppBackend",
    "triton": "fastsae.ops.triton_backend:TritonBackend",
}
_instances: dict[str, Backend] = {}
_failures: dict[str, str] = {}


def _load(name: str) -> Optional[Backend]:
    if name in _instances:
        return _instances[name]
    if name in _failures:
        return None
    module_name, cls_name = _REGISTRY[name].split(":")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
        ok, why = cls.availability()
    except Exception as e:  # an import error is a reason, not a crash: the package still works eagerly
        ok, why = False, f"{type(e).__name__}: {e}"
    if not ok:
        _failures[name] = why
        return None
    _instances[name] = cls()
    return _instances[name]


def status() -> dict[str, tuple[bool, str]]:
    """For each backend name: ``(usable here, reason)``."""
    out = {}
    for name in NAMES:
        b = _load(name)
        out[name] = (True, type(b).availability()[1]) if b is not None else (False, _failures[name])
    return out


def backends() -> list[str]:
    """The backends usable on this machine, fastest first: a subset of ``["triton", "cpp", "eager"]``.

    ``"triton"`` needs CUDA, or ``TRITON_INTERPRET=1`` to run its kernels on CPU tensors.
    """
    return [name for name in NAMES if _load(name) is not None]


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_name(backend: str) -> None:
    if not isinstance(backend, str) or (backend != "auto" and backend not in NAMES):
        raise ValueError(f"backend must be 'auto' or one of {list(NAMES)}, got {backend!r}")


def get(backend: str, device: torch.device) -> Backend:
    """The backend to run tensors on ``device`` with. ``"auto"``: Triton on CUDA, C++ on CPU, else eager.

    Triton's CPU interpreter is never chosen automatically (it is a correctness tool, and slow).
    """
    check_name(backend)
    device = torch.device(device)
    if backend == "auto":
        order = ("triton", "eager") if device.type == "cuda" else ("cpp", "eager")
        for name in order:
            b = _load(name)
            if b is not None and b.supports(device) is None:
                return b
        return _load("eager")
    b = _load(backend)
    if b is None:
        raise BackendUnavailable(f"backend {backend!r} is not available here: {_failures[backend]}")
    why = b.supports(device)
    if why is not None:
        raise BackendUnavailable(f"backend {backend!r} cannot run on {device}: {why}")
    return b
