"""What is benchmarked: the cases (op and step, at which sizes) and how each provider runs them.

Every fastsae provider goes through the backend interface (``fastsae.dispatch.get`` via the modules'
and functional API's ``backend=...``), so whatever a backend accelerates shows up here without a
change to this file. ``compile`` is ``torch.compile`` of the eager reference. Peers (SAELens,
sparsify) live in :mod:`fastsae.bench.peers` and receive copies of the same weights and batch.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import fastsae
from fastsae import reference as ref
from fastsae.dispatch import BackendUnavailable, get as get_backend
from fastsae.sae import ARCHITECTURES

from .harness import Skip

ARCHS = ("jumprelu", "topk", "batchtopk", "relu", "gated")
# (op, mode) pairs of the op-level table. "encode" is the module's inference encode to a sparse code.
OPS = (
    ("encoder_gemm", "fwd"),
    ("encode_jumprelu", "fwd"),
    ("encode_topk", "fwd"),
    ("jumprelu", "fwd"),
    ("jumprelu", "bwd"),
    ("step", "fwd"),
    ("step", "bwd"),
    ("topk", "fwd"),
    ("topk", "bwd"),
    ("sparse_decode", "fwd"),
    ("sparse_decode", "bwd"),
)
BANDWIDTH = 1e-3


@dataclass(frozen=True)
class Case:
    """One op or one training step at one size. ``k`` is TopK's k, or the target L0 for JumpReLU."""

    group: str  # "op" | "step" (the tables) | "scale" (extra points of the scaling study)
    name: str  # architecture for steps, op name for ops
    mode: str  # "step" | "fwd" | "bwd" (backward alone) | "fwd+bwd"
    d_in: int
    d_sae: int
    batch: int
    k: int

    @property
    def label(self) -> str:
        return f"{self.name} {self.mode}"

    @property
    def key(self) -> tuple:
        return (self.name, self.mode, self.d_in, self.d_sae, self.batch, self.k)


# ------------------------------------------------------------------------------------------------
# Data: one batch and one set of weights per size, shared by every provider.
# ------------------------------------------------------------------------------------------------


@dataclass
class Data:
    x: torch.Tensor  # [B, d_in], E||x||^2 = 1 (the paper's normalisation)
    params: dict  # name -> tensor, in fastsae's (= SAELens's) parameter names
    pre: torch.Tensor  # x @ W_enc + b_enc, the realistic input of the elementwise ops


_DATA_CACHE: dict = {}


def make_data(case: Case, device: torch.device, seed: int = 0) -> Data:
    """Weights and batch for ``case``; the JumpReLU threshold is set per latent from quantiles of the
    pre-activations so that each latent fires on ``round(B·L0/d_sae)`` rows and the mean L0 is ``k``."""
    key = (case.d_in, case.d_sae, case.batch, case.k, str(device), seed)
    if key in _DATA_CACHE:
        return _DATA_CACHE[key]
    _DATA_CACHE.clear()  # one size at a time: large sizes hold hundreds of MB
    g = torch.Generator().manual_seed(seed)
    d_in, d_sae, B = case.d_in, case.d_sae, case.batch
    x = torch.randn(B, d_in, generator=g) / d_in**0.5
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.t().contiguous()
    b_enc = 0.01 * torch.randn(d_sae, generator=g)
    b_dec = 0.01 * torch.randn(d_in, generator=g)
    # Drawn on the CPU (the same numbers on every machine), computed with on the benchmark's device.
    x, W_enc, W_dec, b_enc, b_dec = (t.to(device) for t in (x, W_enc, W_dec, b_enc, b_dec))
    pre = x @ W_enc + b_enc
    rows = max(1, min(B - 1, round(B * case.k / d_sae)))
    # θ_j halfway between the smallest kept and the largest rejected pre-activation of latent j: a
    # threshold equal to one of the values would let float rounding differences between backends (a
    # different GEMM summation order) flip that entry and make equal outputs look different.
    # (topk, not torch.quantile: quantile refuses inputs above 16M elements.)
    # Where the two values are themselves within rounding of each other (it happens among tens of
    # thousands of latents), keep one more row for that latent instead.
    top = pre.topk(min(rows + 2, B), dim=0).values
    mid = 0.5 * (top[rows - 1] + top[rows])
    if rows + 1 < top.shape[0]:
        tight = (top[rows - 1] - top[rows]) < 1e-5 * top[rows - 1].abs().clamp_min(1e-3)
        mid = torch.where(tight, 0.5 * (top[rows] + top[rows + 1]), mid)
    threshold = mid.clamp_min(1e-4)
    params = dict(
        W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, threshold=threshold,
        b_gate=b_enc.clone(), r_mag=0.01 * torch.randn(d_sae, generator=g), b_mag=0.01 * torch.randn(d_sae, generator=g),
    )
    data = Data(x=x, params={k: v.to(device) for k, v in params.items()}, pre=pre)
    _DATA_CACHE[key] = data
    return data


def make_module(arch: str, case: Case, data: Data, backend: str, device: torch.device) -> fastsae.SAE:
    """A fastsae module of ``arch`` on ``backend`` holding the case's weights."""
    cls = ARCHITECTURES[arch]
    kwargs = dict(backend=backend, device=device)
    if arch in ("topk", "batchtopk"):
        sae = cls(case.d_in, case.d_sae, case.k, **kwargs)
    elif arch == "jumprelu":
        sae = cls(case.d_in, case.d_sae, bandwidth=BANDWIDTH, **kwargs)
    else:
        sae = cls(case.d_in, case.d_sae, **kwargs)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(data.params[name])
    return sae


# ------------------------------------------------------------------------------------------------
# Step level: zero the grads, training_forward, backward. Returns x_hat for the correctness check.
# ------------------------------------------------------------------------------------------------


def _step_fn(params, loss_and_xhat: Callable[[], tuple]) -> Callable[[], torch.Tensor]:
    params = list(params)

    def step():
        for p in params:
            p.grad = None
        loss, x_hat = loss_and_xhat()
        loss.backward()
        return x_hat.detach()

    return step


def build_step(provider: str, case: Case, device: torch.device) -> Callable[[], object]:
    data = make_data(case, device)
    x = data.x
    if provider in ("eager", "cpp", "triton"):
        _require_backend(provider, device)
        sae = make_module(case.name, case, data, provider, device)

        def run():
            out = sae.training_forward(x)
            return out.loss, out.x_hat

        return _step_fn(sae.parameters(), run)
    if provider == "compile":
        sae = make_module(case.name, case, data, "eager", device)

        def loss_and_xhat(x):
            out = sae.training_forward(x)
            return out.loss, out.x_hat

        compiled = torch.compile(loss_and_xhat)
        step = _step_fn(sae.parameters(), lambda: compiled(x))
        step()  # compile (forward and backward graphs) here, outside any timing
        return step
    from . import peers

    return peers.build_step(provider, case, data, device)


# ------------------------------------------------------------------------------------------------
# Op level, through the functional API (backend=...) or, for compile, the reference functions.
# ------------------------------------------------------------------------------------------------


def _require_backend(provider: str, device: torch.device) -> None:
    try:
        get_backend(provider, device)
    except BackendUnavailable as e:
        raise Skip(str(e)) from None


def _op_impl(provider: str, name: str, case: Case, data: Data, device):
    """``(fn, args, grad_inputs_idx)``: the op as a function of tensors, its inputs, which to differentiate."""
    p = data.params
    bw = torch.full((case.d_sae,), BANDWIDTH, device=device)
    if provider == "compile":
        impl = dict(jumprelu=ref.jumprelu, step=ref.step, topk=ref.topk, sparse_decode=ref.sparse_decode)
    else:
        _require_backend(provider, device)
        impl = dict(
            jumprelu=lambda pre, th, b: fastsae.jumprelu(pre, th, b, backend=provider),
            step=lambda pre, th, b: fastsae.step(pre, th, b, backend=provider),
            topk=lambda pre, k: fastsae.topk(pre, k, backend=provider),
            sparse_decode=lambda v, i, W, b: fastsae.sparse_decode(v, i, W, b, backend=provider),
        )
    if name in ("jumprelu", "step"):
        return impl[name], [data.pre.clone(), p["threshold"].clone(), bw], (0, 1)
    if name == "topk":
        return (lambda pre: impl["topk"](pre, case.k)[0]), [F.relu(data.pre)], (0,)
    if name == "sparse_decode":
        values, indices = torch.topk(F.relu(data.pre), case.k, dim=-1)
        return impl[name], [values.contiguous(), indices.contiguous(), p["W_dec"].clone(), p["b_dec"].clone()], (0, 2, 3)
    raise ValueError(f"unknown op {name!r}")


def build_op(provider: str, case: Case, device: torch.device) -> Callable[[], object]:
    data = make_data(case, device)
    if case.name == "encoder_gemm":
        # The dense floor every provider pays: one GEMM x @ W_enc + b_enc. Timed for eager only.
        if provider != "eager":
            raise Skip("the dense encoder GEMM is the floor of every provider: timed on eager only")
        x, W, b = data.x, data.params["W_enc"], data.params["b_enc"]
        return lambda: torch.addmm(b, x, W)
    if case.name.startswith("encode_"):
        arch = case.name.removeprefix("encode_")
        if provider == "compile":
            sae = make_module(arch, case, data, "eager", device)
            encode = torch.compile(sae.encode_sparse)
        else:
            _require_backend(provider, device)
            sae = make_module(arch, case, data, provider, device)
            encode = sae.encode_sparse

        def run():
            with torch.no_grad():
                values, _ = encode(data.x)
            # Row-sorted values compare across providers whatever order each keeps the entries in.
            return values.sort(dim=-1).values

        if provider == "compile":
            run()
        return run
    fn, args, diff = _op_impl(provider, case.name, case, data, device)
    if provider == "compile":
        fn = torch.compile(fn)
    if case.mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(*args)

        if provider == "compile":
            run()
        return run
    args = [a.detach().clone().requires_grad_(i in diff) if a.is_floating_point() else a for i, a in enumerate(args)]
    inputs = [args[i] for i in diff]
    out = fn(*args)
    if case.name == "topk":
        # Exactly tied pre-activations can be returned in either order (both are correct); a gradient
        # that is a function of the value makes the gradient reaching ``pre`` independent of that order.
        grad_out = torch.cos(997.0 * out.detach())
    else:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    if case.mode == "fwd+bwd":
        def run():
            return torch.autograd.grad(fn(*args), inputs, grad_out)

        if provider == "compile":
            run()
        return run
    # bwd: the forward ran once above; the timed call is the backward alone (retain_graph keeps it).

    def run():
        return torch.autograd.grad(out, inputs, grad_out, retain_graph=True)

    return run


def build(provider: str, case: Case, device: torch.device) -> Callable[[], object]:
    return (build_step if case.mode == "step" else build_op)(provider, case, torch.device(device))


# ------------------------------------------------------------------------------------------------
# Suites
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SuiteConfig:
    """Sizes and options of one run. ``main_*`` is the size of the op and per-architecture tables; the
    scaling study varies ``d_sae`` over ``d_saes`` (at ``main_k``) and ``k``/L0 over ``ks`` (at ``main_d_sae``)."""

    name: str
    d_in: int
    batch: int
    d_saes: tuple
    ks: tuple
    main_d_sae: int
    main_k: int
    repeats: int
    archs: tuple = ARCHS
    ops: tuple = OPS
    compile: str = "main"  # "all" | "main" (jumprelu/topk steps and the op table) | "steps" | "none"
    peers: bool = True
    scale_archs: tuple = ("jumprelu", "topk")
    max_case_seconds: Optional[float] = None

    def with_(self, **kw) -> "SuiteConfig":
        return replace(self, **kw)


FULL_CPU = SuiteConfig(
    name="full", d_in=512, batch=2048, d_saes=(4096, 8192, 16384, 32768), ks=(16, 32, 64, 128),
    main_d_sae=8192, main_k=64, repeats=5, compile="main", max_case_seconds=90.0,
)
QUICK_CPU = SuiteConfig(
    name="quick", d_in=128, batch=256, d_saes=(1024, 2048, 4096), ks=(8, 16, 32),
    main_d_sae=2048, main_k=16, repeats=3, compile="steps", archs=("jumprelu", "topk", "batchtopk", "relu", "gated"),
    ops=(("encoder_gemm", "fwd"), ("jumprelu", "fwd"), ("jumprelu", "bwd"), ("topk", "fwd"), ("topk", "bwd"),
         ("sparse_decode", "fwd"), ("sparse_decode", "bwd")),
    max_case_seconds=20.0,
)


def fastsae_providers(device: torch.device) -> list[str]:
    """Our backends usable for tensors on ``device`` (eager first). Triton's CPU interpreter is a
    correctness tool, not a speed one, so it is benchmarked on CUDA only."""
    names = ["eager"]
    for b in ("cpp", "triton"):
        try:
            get_backend(b, device)
        except BackendUnavailable:
            continue
        if b == "triton" and torch.device(device).type != "cuda":
            continue
        names.append(b)
    return names


def plan(cfg: SuiteConfig, device: torch.device) -> list[tuple[Case, list[str]]]:
    """Every case of the run with the providers that run it, deduplicated (the main size is shared
    between the tables and the scaling study)."""
    ours = fastsae_providers(device)
    mk = lambda group, name, mode, d_sae, k: Case(group, name, mode, cfg.d_in, d_sae, cfg.batch, k)  # noqa: E731
    use_compile = lambda group, name: (  # noqa: E731
        cfg.compile == "all"
        or (cfg.compile == "main" and group in ("op", "step"))
        or (cfg.compile == "steps" and group == "step" and name in ("jumprelu", "topk"))
    )
    out: list[tuple[Case, list[str]]] = []
    seen = set()

    def add(case: Case, providers: list[str]):
        if case.key in seen:
            return
        seen.add(case.key)
        out.append((case, providers))

    for arch in cfg.archs:
        c = mk("step", arch, "step", cfg.main_d_sae, cfg.main_k)
        prov = list(ours) + (["compile"] if use_compile("step", arch) else [])
        if cfg.peers:
            prov += ["saelens"] + (["sparsify"] if arch == "topk" else [])
        add(c, prov)
    for name, mode in cfg.ops:
        c = mk("op", name, mode, cfg.main_d_sae, cfg.main_k)
        if name == "encoder_gemm":
            add(c, ["eager"])
        else:
            # encode_* ends in a data-dependent compaction (nonzero): nothing for compile to fuse.
            compiled = use_compile("op", name) and not name.startswith("encode_")
            add(c, list(ours) + (["compile"] if compiled else []))
    # Scaling study: steps and the pieces that explain them (the dense GEMM floor, the sparse decode).
    for d_sae in cfg.d_saes:
        for arch in cfg.scale_archs:
            add(mk("scale", arch, "step", d_sae, cfg.main_k), list(ours))
        add(mk("scale", "encoder_gemm", "fwd", d_sae, cfg.main_k), ["eager"])
        add(mk("scale", "sparse_decode", "fwd+bwd", d_sae, cfg.main_k), list(ours))
    for k in cfg.ks:
        for arch in cfg.scale_archs:
            add(mk("scale", arch, "step", cfg.main_d_sae, k), list(ours))
        add(mk("scale", "sparse_decode", "fwd+bwd", cfg.main_d_sae, k), list(ours))
    return out
