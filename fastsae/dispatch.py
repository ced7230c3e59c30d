"""Which backends exist here, and the dispatch to them.

A backend is an object with the methods of :class:`Backend`. Every method has a working default
(the eager reference), so a backend overrides only what it accelerates and stays correct for the
rest. The modules and the functional API never branch on hardware: they call :func:`get`.

Adding a backend is a new file plus one line in ``_REGISTRY``.
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os
from typing import Optional, Union

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import reference as ref

NAMES = ("triton", "cpp", "eager")

# ----------------------------------------------------------------------------------------------
# Dense or sparse: the density-aware dispatch of the fused training steps
# ----------------------------------------------------------------------------------------------

#: Measured crossovers, the one place they live: for each (backend, device kind) and architecture, the
#: density — entries the sparse kernels keep per row (JumpReLU: active ∪ window; ReLU: active; Gated: open
#: gates; TopK / BatchTopK: k), as a fraction of d_sae — up to which the sparse step is faster than the dense
#: one (the GEMMs of the eager formulation with fused elementwise passes). Above it a backend runs the dense
#: step: same math, and never slower than eager. ``python benchmarks/bench_cpu_crossover.py`` measures the cpp
#: row and prints it in this form; a GPU backend adds rows keyed by :func:`device_kind` (e.g.
#: ``("triton", "cuda-sm90")``, falling back to ``("triton", "cuda")``). Override per process with
#: :func:`set_crossover` / :func:`override_crossover` or the environment variable ``FASTSAE_CROSSOVER``
#: (``"0.05"``, ``"jumprelu=0.1,relu=0.08"``, ``"dense"`` or ``"sparse"``).
CROSSOVERS: dict[tuple[str, str], dict[str, float]] = {
    # jumprelu / relu / gated: benchmarks/results/cpu-intel-xeon-2c/crossover_1t_cpu.md (Intel Xeon, 1 thread,
    # d_in 512, d_sae 8192, batch 2048, with the vectorised dense step and the row-blocked sparse backward);
    # topk / batchtopk: benchmarks/results/cpu/crossover.md (AMD EPYC, 2 threads, the same sizes, earlier kernels)
    ("cpp", "cpu"): dict(jumprelu=0.11, relu=0.11, gated=0.13, topk=0.09, batchtopk=0.26),
    # An ESTIMATE, not a measurement (no GPU has run it yet): replace it with the row that
    # ``python benchmarks/bench_gpu.py --crossover`` prints. Triton measures density as its padded lists' width
    # (the longest row). Two bounds, the smaller wins:
    # - memory: a compact entry costs ~3x a dense one (int32 latent + value, the int64 sort keys and order of
    #   ``segments``, the per-row sort of the encoder) against ~10 bytes per dense bf16 entry of the eager step
    #   (pre, f, masks, their gradients), so lists past ~0.3 · d_sae are larger than the dense step (and at
    #   d_sae = 2^20 would not fit);
    # - speed: each sparse pass (decode gather, SDDMM, the two segment reductions) replaces one dense GEMM of the
    #   eager step but runs on CUDA cores at ~1 flop per byte of gathered weights (L2 at ~8 TB/s) against the
    #   tensor cores' ~650 TFLOP/s in bf16: at B 4096, d_in 2304, d_sae 16384 the four passes cost what the four
    #   GEMMs (~2.4 ms) and the dense elementwise passes cost at ~1.5 % of d_sae. Rounded up to 0.02 (somewhere
    #   in 0.01-0.05 by the uncertainty of those rates); too low only costs eager speed, too high costs more.
    ("triton", "cuda"): dict(jumprelu=0.02, relu=0.02, gated=0.02, topk=0.02, batchtopk=0.02),
}
#: Used where the table has no row for a backend and device kind.
DEFAULT_CROSSOVER = 0.05

_NAMED = {"dense": 0.0, "sparse": math.inf}
_overrides: dict[tuple[str, str, str], float] = {}


def device_kind(device: Union[str, torch.device]) -> str:
    """The key of a device in :data:`CROSSOVERS`: ``"cpu"``, or ``"cuda-sm<major><minor>"`` for a CUDA device."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm{major}{minor}"
    return device.type


def _parse_crossover(value) -> float:
    if isinstance(value, str) and value.strip().lower() in _NAMED:
        return _NAMED[value.strip().lower()]
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"a crossover must be a number >= 0, 'dense' or 'sparse', got {value!r}") from None
    if not v >= 0:
        raise ValueError(f"a crossover must be a number >= 0, 'dense' or 'sparse', got {value!r}")
    return v


def _env_crossovers() -> dict[str, float]:
    text = os.environ.get("FASTSAE_CROSSOVER", "").strip()
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        arch, sep, value = part.rpartition("=")
        out[arch.strip() if sep else "*"] = _parse_crossover(value)
    return out


def get_crossover(backend: str, device: Union[str, torch.device], arch: str) -> float:
    """The crossover density ``backend`` uses for ``arch`` on ``device`` (overrides first, then
    ``FASTSAE_CROSSOVER``, then the measured :data:`CROSSOVERS`, then :data:`DEFAULT_CROSSOVER`)."""
    kind = device_kind(device)
    for key in ((backend, kind, arch), (backend, kind, "*"), (backend, "*", arch), (backend, "*", "*"),
                ("*", "*", arch), ("*", "*", "*")):
        if key in _overrides:
            return _overrides[key]
    env = _env_crossovers()
    if arch in env or "*" in env:
        return env.get(arch, env.get("*"))
    device_type = torch.device(device).type
    for key in ((backend, kind), (backend, device_type)):
        if key in CROSSOVERS and arch in CROSSOVERS[key]:
            return CROSSOVERS[key][arch]
    return DEFAULT_CROSSOVER


def set_crossover(value, *, arch: Optional[str] = None, backend: Optional[str] = None,
                  device_kind: Optional[str] = None) -> None:
    """Override the crossover for this process: a density in ``[0, inf]``, ``"dense"`` (0: always the dense
    step) or ``"sparse"`` (inf: always the sparse kernels), or ``None`` to remove the override. ``arch``,
    ``backend`` and ``device_kind`` narrow it (default: all)."""
    key = (backend or "*", device_kind or "*", arch or "*")
    if value is None:
        _overrides.pop(key, None)
    else:
        _overrides[key] = _parse_crossover(value)


@contextlib.contextmanager
def override_crossover(value, **scope):
    """``with override_crossover("sparse"): ...`` — :func:`set_crossover` for the duration of a block."""
    key = (scope.get("backend") or "*", scope.get("device_kind") or "*", scope.get("arch") or "*")
    before = _overrides.get(key)
    set_crossover(value, **scope)
    try:
        yield
    finally:
        if before is None:
            _overrides.pop(key, None)
        else:
            _overrides[key] = before


class Density:
    """Which formulation (sparse kernels or dense GEMMs) a backend runs for each SAE's next training step.

    The choice compares the previous step's kept entries per row with the crossover. State is keyed by the
    SAE's encoder weight (held weakly), so it follows the module without living in it. A step with no
    history counts as fully dense (a fresh SAE fires on about half its latents). ``entries`` may be a
    tensor: a GPU backend records its device-side count and it is read only at the next decision.
    """

    def __init__(self, backend: str):
        self.backend = backend
        self._last = WeakIdKeyDictionary()

    def sparse(self, arch: str, W_enc: Tensor) -> bool:
        """True when the next step of the SAE owning ``W_enc [d_in, d_sae]`` should run the sparse kernels.

        A forced choice (crossover ``"dense"`` / ``"sparse"``) reads no count: a device-side one would cost a
        device→host read for nothing."""
        crossover = get_crossover(self.backend, W_enc.device, arch)
        if crossover in (0.0, math.inf):
            return crossover == math.inf
        d_sae = W_enc.shape[1]
        last = self._last.get(W_enc)
        per_row = float(d_sae) if last is None else float(last[0]) / max(last[1], 1)
        return per_row <= crossover * d_sae

    def sparse_at(self, arch: str, W_enc: Tensor, per_row: float) -> bool:
        """The same choice for a known density (``per_row`` entries per row), e.g. TopK's ``k``."""
        return per_row <= get_crossover(self.backend, W_enc.device, arch) * W_enc.shape[1]

    def record(self, W_enc: Tensor, entries: Union[int, Tensor], rows: int) -> None:
        """This step kept ``entries`` (active ∪ window, ...) over ``rows`` rows. A backend whose lists are padded
        to their longest row (triton) records that row's count with ``rows=1``: its lists cost that much."""
        self._last[W_enc] = (entries, rows)

    def state(self, W_enc: Tensor) -> Optional[list]:
        """The record the next decision reads, as JSON numbers (``[entries, rows]``, or ``None`` before the first
        step): a checkpoint saves it so a resumed run makes the uninterrupted run's dense-or-sparse choices
        (the two formulations agree only to rounding, and an exact resume must not switch)."""
        last = self._last.get(W_enc)
        if last is None:
            return None
        entries = last[0].item() if isinstance(last[0], Tensor) else last[0]
        return [entries, int(last[1])]

    def load_state(self, W_enc: Tensor, state: Optional[list]) -> None:
        """Restore what :meth:`state` returned (``None`` forgets the record)."""
        if state is None:
            self._last.pop(W_enc, None)
            return
        entries, rows = state if isinstance(state, (list, tuple)) and len(state) == 2 else (None, None)
        if isinstance(entries, bool) or not isinstance(entries, (int, float)) or not entries >= 0 \
                or isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ValueError(f"a density record must be [entries >= 0, rows >= 0 (an integer)], got {state!r}")
        self._last[W_enc] = (entries, rows)

    def last(self, W_enc: Tensor) -> Optional[float]:
        """The previous step's entries per row, or ``None``."""
        last = self._last.get(W_enc)
        return None if last is None else float(last[0]) / max(last[1], 1)


class BackendUnavailable(RuntimeError):
    """The named backend cannot run here (not built, not installed, or wrong device)."""


class Backend:
    """The operations a backend provides. Defaults are the eager reference.

    Shapes follow reference.py: ``x [B, d_in]``; ``bandwidth`` is always a ``[d_sae]`` tensor here
    (the public boundary expands a scalar), ``threshold`` a ``[d_sae]`` tensor.

    Training steps (``*_sae``) return a :class:`reference.SAEForward`. A backend with a sparse and a dense
    formulation of a step asks ``self.density.sparse(arch, W_enc)`` (or ``sparse_at(arch, W_enc, k)`` for a
    known density) which to run, and reports what the sparse kernels keep (or would keep) with
    ``self.density.record(W_enc, entries, rows)``; the crossover comes from :data:`CROSSOVERS` under
    ``(self.name, device_kind(device))``. Both formulations must compute the same math.

    Inference (``encode``, ``encode_sparse``, ``reconstruct``) takes a :class:`fastsae.inference.Encoder`
    describing any architecture; a backend that fuses it must fall back (``super()``) when autograd would
    record the call (``enc.needs_grad(x)``).
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

    def kept_sae(self, x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input,
                 per_row: bool) -> Optional[ref.SAEForward]:
        """This backend's fused TopK (``per_row``: each row's ``k`` largest) or BatchTopK (the batch's ``B·k``
        largest) step, or ``None`` where it has none for these tensors (the eager reference runs instead). Its
        result also holds the kept entries: ``values`` (differentiable) at latents ``indices``, ``[B, k]`` for
        TopK, flat lists with their ``rows`` for BatchTopK. The TopK, BatchTopK and Matryoshka steps all come
        from here: Matryoshka decodes its inner prefixes from those entries."""
        return None

    def topk_sae(self, x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input) -> ref.SAEForward:
        out = self.kept_sae(x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input, per_row=True)
        return out if out is not None else ref.topk_sae_forward(x, W_enc, b_enc, W_dec, b_dec, k,
                                                                apply_b_dec_to_input)

    def abstopk_sae(self, x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input) -> ref.SAEForward:
        """Composed from this backend's ``topk`` (on ``|pre|``) and ``sparse_decode`` kernels."""
        return ref.abstopk_sae_forward(x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input, topk=self.topk,
                                       decode=self.sparse_decode)

    def batchtopk_sae(self, x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input) -> ref.SAEForward:
        out = self.kept_sae(x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input, per_row=False)
        return out if out is not None else ref.batchtopk_sae_forward(x, W_enc, b_enc, W_dec, b_dec, k,
                                                                     apply_b_dec_to_input)

    def relu_sae(self, x, W_enc, b_enc, W_dec, b_dec, apply_b_dec_to_input) -> ref.SAEForward:
        return ref.relu_sae_forward(x, W_enc, b_enc, W_dec, b_dec, apply_b_dec_to_input)

    def gated_sae(self, x, W_enc, b_gate, r_mag, b_mag, W_dec, b_dec, apply_b_dec_to_input) -> ref.SAEForward:
        return ref.gated_sae_forward(x, W_enc, b_gate, r_mag, b_mag, W_dec, b_dec, apply_b_dec_to_input)

    def matryoshka_batchtopk_sae(self, x, W_enc, b_enc, W_dec, b_dec, k, widths,
                                 apply_b_dec_to_input, per_row=False) -> ref.MatryoshkaForward:
        out = self.kept_sae(x, W_enc, b_enc, W_dec, b_dec, k, apply_b_dec_to_input, per_row=per_row)
        if out is None:  # the eager forward, sparse after its encoder GEMM (prefix running sums)
            return ref.matryoshka_batchtopk_sae_forward(x, W_enc, b_enc, W_dec, b_dec, k, widths,
                                                        apply_b_dec_to_input, per_row=per_row)
        return ref.matryoshka_from_kept(out, W_dec, b_dec, widths)

    @property
    def density(self) -> Density:
        """The dense-or-sparse choice of this backend's fused training steps (see :class:`Density`)."""
        d = self.__dict__.get("_density")
        if d is None:
            d = self.__dict__["_density"] = Density(self.name)
        return d

    # -- inference: an SAE's code and reconstruction (fastsae/inference.py) -------------------
    # ``enc`` is an :class:`fastsae.inference.Encoder`, ``x [B, d_in]`` in the encoder's dtype. A backend
    # with fused kernels writes no dense [B, d_sae] tensor for encode_sparse / reconstruct.
    def encode(self, enc, x: Tensor) -> Tensor:
        """Dense code ``f [B, d_sae]``."""
        from . import inference

        return inference.dense_code(enc, x)

    def encode_sparse(self, enc, x: Tensor) -> tuple[Tensor, Tensor]:
        """Padded ``(values [B, K], indices [B, K] int64)`` of the nonzero entries (TopK: ``k``, sorted)."""
        from . import inference

        return inference.sparse_code(enc, x)

    def reconstruct(self, enc, x: Tensor, W_dec: Tensor) -> Tensor:
        """``x̂ = decode(code) + b_dec`` ``[B, d_in]`` (the decoder bias is ``enc.b_dec``)."""
        values, indices = self.encode_sparse(enc, x)
        return self.sparse_decode(values, indices, W_dec, enc.b_dec)

    def __repr__(self) -> str:
        return f"<fastsae backend {self.name!r}>"


class EagerBackend(Backend):
    """The reference itself: dense, clear, and the baseline of every benchmark."""


# name -> "module:Class". One line per backend.
_REGISTRY = {
    "eager": "fastsae.dispatch:EagerBackend",
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
