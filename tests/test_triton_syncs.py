"""Device→host reads and autotuning keys of the Triton backend's training steps, checked under the interpreter.

Host reads. A ``TorchDispatchMode`` sees every aten op the backend's ops run — also inside their
``custom_op`` bodies and autograd formulas — and counts the ones that read device memory on the host
on a GPU: scalar reads (``.item()``, ``int()``, ``bool()``), ops whose output size depends on the
data (``nonzero``, boolean-mask indexing, ``unique``, ``bincount``, ``repeat_interleave`` without an
output size) and copies to the CPU. TopK and BatchTopK steps must make none, JumpReLU exactly one
(the capacity check), and so must ReLU and Gated steps (their lists are the same compaction); a dense step makes
one too, at the next step's dense-or-sparse decision (the longest row it counted). On a GPU, ``benchmarks/gpu_probe.py`` repeats this with
``torch.cuda.set_sync_debug_mode("error")``.

Tuning keys. Sizes that change from step to step (the JumpReLU list width tracking L0, the number of
dead latents seen by AuxK) enter autotuning keys as power-of-two buckets, so a drifting L0 re-tunes
once per bucket instead of once per value.
"""
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastsae
from fastsae import reference as ref
from fastsae.dispatch import override_crossover
from test_triton_backend import relu_gated_params, sae_params, _step  # noqa: E402  (tests/ is on sys.path)

pytestmark = pytest.mark.skipif("triton" not in fastsae.backends(),
                                reason="triton backend unavailable (needs CUDA or TRITON_INTERPRET=1)")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
backends_mod = importlib.import_module("fastsae.dispatch")

SCALAR_READS = {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal"}
DATA_SIZED = {"aten::nonzero", "aten::masked_select", "aten::unique_consecutive", "aten::_unique", "aten::_unique2",
              "aten::unique_dim", "aten::bincount"}


class HostReads(TorchDispatchMode):
    """Records the device→host reads of everything run inside it (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._library.custom_ops import _maybe_get_opdef

        kwargs = kwargs or {}
        name = func._schema.name
        if name in SCALAR_READS or name in DATA_SIZED:
            self.reads.append(name)
        elif name == "aten::repeat_interleave" and kwargs.get("output_size") is None and isinstance(args[0], torch.Tensor):
            self.reads.append(name)
        elif name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            self.reads.append(name + " (bool mask)")
        elif name == "aten::_to_copy" and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu" and \
                str(kwargs.get("device", "")) == "cpu":
            self.reads.append(name + " (to cpu)")
        # our own custom ops: run their Python bodies inside the mode, so their reads are seen too
        opdef = _maybe_get_opdef(func) if name.startswith("fastsae_triton::") else None
        if opdef is not None:
            with self:
                return opdef._init_fn(*args, **kwargs)
        return func(*args, **kwargs)


def backend():
    return backends_mod.get("triton", torch.device(DEV))


def test_counter_sees_host_reads():
    """The counter is not blind: the usual ways of reading a device tensor on the host are all recorded."""
    t = torch.randn(7, device=DEV)
    with HostReads() as m:
        int(t.argmax())
        bool((t > 0).any())
        t[t > 0]
        t.nonzero()
        torch.repeat_interleave(torch.tensor([1, 2], device=DEV))
    assert len(m.reads) >= 5, m.reads


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_topk_steps_make_no_host_reads(arch):
    """A TopK / BatchTopK step (forward, loss, backward) and the AuxK top-k + decode: no device→host read."""
    x, W_enc, b_enc, W_dec, b_dec, _, _ = sae_params(13, 11, 41, torch.float32)
    be = backend()
    with HostReads() as m, override_crossover(0.5, backend="triton"):  # k = 6 of 41: sparse, decided from k
        out = (be.topk_sae if arch == "topk" else be.batchtopk_sae)(x, W_enc, b_enc, W_dec, b_dec, 6, True)
        loss = ref.mse(out.x_hat, x)
        # AuxK's kernels (the dead-latent selection itself is the module's, see sae.py)
        v, i = be.topk(torch.relu(x @ W_enc[:, :17] + b_enc[:17]), 5)
        loss = loss + (be.sparse_decode(v, i, W_dec[:17], None) ** 2).mean()
        loss.backward()
    assert m.reads == [], m.reads
    assert out.l0.shape == (13,) and bool(out.fired.any())


@pytest.mark.parametrize("per_row", [False, True])
def test_matryoshka_step_makes_one_host_read(per_row):
    """The Matryoshka step is the BatchTopK (or, in its warm-up, TopK) step plus the inner prefixes' decode, whose
    size (the entries below the last inner width) is the one read."""
    x, W_enc, b_enc, W_dec, b_dec, _, _ = sae_params(13, 11, 41, torch.float32)
    be = backend()
    with HostReads() as m, override_crossover(0.5, backend="triton"):
        out = be.matryoshka_batchtopk_sae(x, W_enc, b_enc, W_dec, b_dec, 6, [5, 20, 41], True, per_row=per_row)
        ref.matryoshka_loss(out.prefixes, x, [0.1, 0.5]).add(ref.mse(out.x_hat, x)).backward()
    assert m.reads == ["aten::nonzero"], m.reads
    assert out.prefixes.shape == (3, 13, 11)


def test_jumprelu_step_makes_one_host_read_even_when_the_lists_overflow():
    from fastsae.ops import encode

    x, W_enc, b_enc, W_dec, b_dec, theta, eps = sae_params(13, 11, 41, torch.float32)
    be = backend()
    for hint in (None, 1):  # 1: the first pass overflows and retries at the exact bucket
        encode._capacity_hint.clear()
        if hint:
            encode._capacity_hint[(13, 41)] = hint
        with HostReads() as m, override_crossover("sparse", backend="triton"):
            out = be.jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, theta, eps, False)
            (ref.mse(out.x_hat, x) + 0.1 * out.l0.mean()).backward()
        assert m.reads == ["aten::item"], (hint, m.reads)


def _arch_step(be, arch, x, params, ste=False):
    if arch == "jumprelu":
        W_enc, b_enc, W_dec, b_dec, theta, eps = params
        out = be.jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, theta, eps, False, ste_to_input=ste, need_values=ste)
        loss = ref.mse(out.x_hat, x) + 0.1 * out.l0.mean()
        return loss + ref.tanh_sparsity(out.values, out.indices, W_dec, 1.5, x.shape[0]) if ste else loss
    return _step(be, arch, x, params, True)[1]


def _params(arch):
    if arch == "jumprelu":
        x, *p = sae_params(13, 11, 41, torch.float32)  # p: W_enc, b_enc, W_dec, b_dec, θ, ε
        return x, p, p[0]
    x, p = relu_gated_params(arch, 13, 11, 41, torch.float32)
    return x, p, p["W_enc"]


@pytest.mark.parametrize("arch,ste", [("jumprelu", True), ("relu", False), ("gated", False)])
def test_sparse_steps_make_one_host_read(arch, ste):
    """A sparse ReLU / Gated step, and JumpReLU with the straight-through gradient and the code for the tanh
    penalty: forward, loss, backward make the one read of the lists' width, and the next decision none."""
    x, params, W_enc = _params(arch)
    be = backend()
    with override_crossover(1e6, backend="triton"):  # sparse, but decided from the recorded count
        for step in range(2):
            with HostReads() as m:
                _arch_step(be, arch, x, params, ste).backward()
            assert m.reads == ["aten::item"], (arch, step, m.reads)


@pytest.mark.parametrize("arch", ["jumprelu", "relu", "gated"])
def test_dense_steps_make_one_host_read_at_the_next_decision(arch):
    """Dense steps leave their longest row on the device; the next step's decision reads it: one read a step."""
    x, params, W_enc = _params(arch)
    be = backend()
    with override_crossover(1e-6, backend="triton"):  # dense, decided from the recorded count
        reads = []
        for step in range(3):
            with HostReads() as m:
                _arch_step(be, arch, x, params).backward()
            reads.append(m.reads)
    assert reads[0] == [] and all(len(r) == 1 for r in reads[1:]), reads


# ------------------------------------------------------------------------------------------
# Tuning keys while L0 drifts
# ------------------------------------------------------------------------------------------


def _kernels():
    from fastsae.ops.triton_common import TritonKernel

    for k in TritonKernel.registry.values():
        k.seen_keys.clear()
        k.seen_raw.clear()
    return TritonKernel.registry


def test_tuning_keys_stay_in_buckets_while_l0_and_dead_latents_drift():
    """A JumpReLU run whose thresholds rise every step (L0 falls through many values) and a TopK run with
    AuxK over a drifting number of dead latents: every kernel's distinct tuning keys stay within the
    buckets the drifting sizes span, while the raw sizes take many more values."""
    from fastsae.ops import encode
    from fastsae.ops.topk import tile_shape
    from fastsae.ops.triton_common import bucket

    kernels = _kernels()
    encode._capacity_hint.clear()
    torch.manual_seed(0)
    B, d_in, d_sae = 6, 5, 64
    x, W_enc, b_enc, W_dec, b_dec, theta, eps = sae_params(B, d_in, d_sae, torch.float32)
    with torch.no_grad():
        theta.fill_(-1.2)
        eps.fill_(0.02)
    be = backend()
    widths = []
    with override_crossover("sparse", backend="triton"):  # the sparse kernels, whatever the density
        for step in range(16):
            with torch.no_grad():
                pre = x @ W_enc + b_enc
                u = (pre - theta) / eps
                widths.append(int(((pre > theta) | ((u > -0.5) & (u < 0.5))).sum(-1).max()))
            out = be.jumprelu_sae(x, W_enc, b_enc, W_dec, b_dec, theta, eps, False)
            (ref.mse(out.x_hat, x) + 0.1 * out.l0.mean()).backward()
            with torch.no_grad():
                theta.add_(0.15)  # L0 falls every step
    dead_counts = []
    for step in range(10):
        n_dead = 5 + 6 * step  # AuxK's dead latents: a new count every step
        dead_counts.append(n_dead)
        v, i = be.topk(torch.relu(x @ W_enc[:, :n_dead] + b_enc[:n_dead]), min(16, n_dead))
        be.sparse_decode(v, i, W_dec[:n_dead], None)
    assert len(set(widths)) >= 8, widths  # the drift is real

    def spanned(values):
        return len({bucket(v) for v in values})

    gather = kernels["_gather_rows_kernel"]
    # JumpReLU decode, AuxK decode: list widths K drift; D is fixed
    assert len(gather.seen_keys) <= spanned(widths) + spanned(min(16, n) for n in dead_counts)
    sddmm = kernels["_sddmm_kernel"]
    assert len(sddmm.seen_keys) <= spanned(widths) + 1
    dense_topk = kernels["_dense_topk_kernel"]
    assert len(dense_topk.seen_raw) == len(dead_counts)  # one raw N per step ...
    # ... a handful of tuning keys: N's bucket and the per-tile candidate count kp (a compile-time constant)
    assert len(dense_topk.seen_keys) <= len({(bucket(n), tile_shape(n, min(16, n))[1]) for n in dead_counts})
    assert len(dense_topk.seen_keys) < len(dead_counts)
    for name in ("_encode_jumprelu_kernel", "_segment_kernel"):  # no drifting size in their keys
        assert len(kernels[name].seen_keys) <= 2, (name, kernels[name].seen_keys)
