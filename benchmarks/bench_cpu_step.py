"""One SAE training step (forward + backward) on CPU: the `cpp` backend against eager and the bare encoder GEMM.

    python benchmarks/bench_cpu_step.py                          # d_in=512, batch 2048, d_sae 8192, every arch
    python benchmarks/bench_cpu_step.py --d-sae 8192 32768 --archs jumprelu topk --repeats 7

Everything runs in one process with ``torch.set_num_threads(--threads)`` (default 2). Each round times every
provider of a row once, interleaved (``gemm``, ``eager``, ``cpp``, and for TopK EleutherAI sparsify's CPU recipe),
and each number is the median over ``--repeats`` rounds after a warm-up: on a shared machine the load moves all
providers of a round together, so the ratios are steadier than the absolute times.

Rows (the sparsity each is set to comes from the batch's own pre-activations):
- ``jumprelu``: thresholds at per-latent quantiles so each row has ~``--l0`` active latents (trained sparsity);
  ε = 1e-3 on inputs with E‖x‖² = 1 (the paper's setting); with its AuxK (the default, ``k_aux=8``: a second,
  unfused pass with a dense GEMM); ``jumprelu-noaux``: the same with ``k_aux=0``, the fused step alone.
- ``jumprelu-fresh``: the library's default initialisation, untouched: the first steps of a real run, where a
  JumpReLU fires on about half its latents (the dispatcher runs the dense formulation there).
- ``topk`` / ``batchtopk``: k = ``--k``, without AuxK (no dead latents); ``matryoshka_batchtopk``: the same
  BatchTopK with the default nested widths (1/16, 1/4, 1), its inner prefixes decoded from the kept entries.
- ``relu`` / ``gated``: encoder / gate biases shifted per latent so each row has ~``--l0`` active latents.
- ``relu-fresh`` / ``gated-fresh``: the library's default modules (about half the latents fire: the dense path).
The ``cpp`` module takes one warm-up step first, so its dispatcher (fastsae.dispatch.Density) has the previous
step's density, as in a run; ``path`` says which formulation it ran.

``gemm`` is ``torch.addmm(b_enc, x_in, W_enc, out=buf)`` for the whole batch into one preallocated ``[B, d_sae]``
``buf`` (allocated once, before the timing): the floor any encoder pays, bias included. Into a fresh output each
call it would also pay a page fault per 4 KB of its 64 MB (it moved between 105 and 140 ms from run to run at
d_sae 8192), which made the ratio look better than the step deserves; the step still produces all of its outputs
(the gradients in their own memory). ``gemm fresh ms`` is that fresh-output addmm, for comparison. Peak memory:
``torch.profiler`` allocation events during one step (the running sum in time order, above the level before it);
the C++ kernels allocate through the same allocator, so they are counted.

Results are printed and written to ``benchmarks/results/cpu/step_cpp.md``.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import fastsae
from bench_cpu_common import K_ARCHS, base_arch, build as build_sae, make_batch, peak_bytes, time_interleaved, write_table

ARCHS = ("jumprelu", "jumprelu-noaux", "jumprelu-fresh", "topk", "batchtopk", "matryoshka_batchtopk", "relu", "relu-fresh", "gated",
         "gated-fresh")


def module_step(sae, x):
    def run():
        for p in sae.parameters():
            p.grad = None
        out = sae.training_forward(x)
        out.loss.backward()
        return out

    return run


def sparsify_step(sae, x):
    """EleutherAI sparsify's CPU path: dense encoder + torch.topk, embedding_bag decode, plain autograd."""
    k = sae.k

    def run():
        for p in sae.parameters():
            p.grad = None
        pre = F.relu(F.linear(x - sae.b_dec, sae.W_enc.t(), sae.b_enc))
        values, indices = pre.topk(k, sorted=False)
        x_hat = F.embedding_bag(indices, sae.W_dec, per_sample_weights=values, mode="sum") + sae.b_dec
        loss = (x_hat - x).pow(2).sum(-1).mean()
        loss.backward()

    return run


def sparsity_label(arch, sae, out, x):
    if arch in K_ARCHS:
        return f"k={sae.k}"
    label = f"L0={float(out.l0):.1f}"
    if arch.startswith("jumprelu"):
        with torch.no_grad():
            pre = x @ sae.W_enc + sae.b_enc
            window = float(((pre - sae.threshold).abs() < 0.5 * sae.bandwidth).sum(-1).float().mean())
        label += f" (+{window:.1f} window)"
    return label


def bench(args):
    torch.set_num_threads(args.threads)
    rows = []
    x = make_batch(args.batch, args.d_in)
    for d_sae in args.d_sae:
        for arch in args.archs:
            cpp = build_sae(arch, "cpp", args.d_in, d_sae, x, args.l0 / d_sae, args.k)
            eager = build_sae(arch, "eager", args.d_in, d_sae, x, args.l0 / d_sae, args.k)
            steps = dict(eager=module_step(eager, x), cpp=module_step(cpp, x))
            if arch == "topk":
                steps["sparsify"] = sparsify_step(build_sae(arch, "eager", args.d_in, d_sae, x, args.l0 / d_sae,
                                                            args.k), x)
            out = steps["cpp"]()  # the dispatcher's first step: from here on it knows the density
            ops = cpp.ops()
            if arch in K_ARCHS:
                selection = "batchtopk" if arch == "matryoshka_batchtopk" else arch
                path = "sparse" if ops.density.sparse_at(selection, cpp.W_enc, cpp.k) else "dense"
            else:
                path = "sparse" if ops.density.sparse(base_arch(arch), cpp.W_enc) else "dense"
            with torch.no_grad():
                x_in = (x - cpp.b_dec if cpp.apply_b_dec_to_input else x).detach()
                W, b = cpp.W_enc.detach(), (cpp.b_gate if arch.startswith("gated") else cpp.b_enc).detach()
            buf = torch.empty(x_in.shape[0], W.shape[1], dtype=W.dtype)
            fns = dict(gemm=lambda: torch.addmm(b, x_in, W, out=buf), gemm_fresh=lambda: torch.addmm(b, x_in, W),
                       **steps)
            t = time_interleaved(fns, args.repeats, args.clock)
            mem = {} if args.no_memory else {k: peak_bytes(f) for k, f in steps.items()}
            row = dict(arch=arch, d_sae=d_sae, sparsity=sparsity_label(arch, cpp, out, x), path=path,
                       eager=t["eager"], cpp=t["cpp"], sparsify=t.get("sparsify"), gemm=t["gemm"],
                       gemm_fresh=t["gemm_fresh"],
                       mem_eager=mem.get("eager"), mem_cpp=mem.get("cpp"))
            rows.append(row)
            print(fmt_row(row), flush=True)
            del cpp, eager, steps, fns, buf
    return rows


HEADER = ("| arch | d_sae | sparsity | cpp path | eager ms | cpp ms | cpp vs eager | sparsify ms | cpp vs sparsify "
          "| gemm ms (out=) | cpp / gemm | gemm fresh ms | peak MiB eager | peak MiB cpp |")
RULE = "|" + "---|" * (HEADER.count("|") - 1)


def fmt_row(r) -> str:
    ms = lambda s: f"{1e3 * s:.1f}"  # noqa: E731
    mib = lambda b: "-" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    sp = r["sparsify"]
    sp_ms, sp_ratio = (ms(sp), f"{sp / r['cpp']:.2f}x") if sp else ("-", "-")
    return (f"| {r['arch']} | {r['d_sae']} | {r['sparsity']} | {r['path']} | {ms(r['eager'])} | {ms(r['cpp'])} | "
            f"{r['eager'] / r['cpp']:.2f}x | {sp_ms} | {sp_ratio} | {ms(r['gemm'])} | {r['cpp'] / r['gemm']:.2f}x | "
            f"{ms(r['gemm_fresh'])} | "
            f"{mib(r['mem_eager'])} | {mib(r['mem_cpp'])} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-sae", type=int, nargs="+", default=[8192])
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--l0", type=int, default=64, help="target active latents per row (JumpReLU, ReLU, Gated)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: the process's CPU time instead of elapsed time (a busy machine; with --threads 1)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory profiles")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu", "step_cpp.md"))
    args = p.parse_args(argv)
    if "cpp" not in fastsae.backends():
        raise SystemExit("the cpp backend is not built here (python setup.py build_ext --inplace)")
    print(f"torch {torch.__version__}, {args.threads} threads, d_in={args.d_in}, batch={args.batch}, float32")
    print(HEADER)
    print(RULE)
    rows = bench(args)
    write_table(args.out, "One training step (forward + backward), CPU, cpp backend vs eager and the encoder GEMM",
                argv, f"{args.threads} threads, d_in={args.d_in}, batch={args.batch}, float32, median of "
                f"{args.repeats} interleaved rounds, {args.clock} clock", [HEADER, RULE] + [fmt_row(r) for r in rows])


if __name__ == "__main__":
    main()
