"""Communication of distributed SAE training: bytes per step per scheme, DDP vs flat all-reduce, scaling.

Three modes:

    python benchmarks/bench_comm.py                 # bytes table: every scheme against the naive one
    python benchmarks/bench_comm.py --ddp           # 2 gloo CPU ranks: DDP vs fastsae's flat all-reduce step time
    torchrun --nproc-per-node N benchmarks/bench_comm.py --time [--latent-parallel L] [--arch topk] ...
                                                    # step time / tokens per s on N ranks (GPUs with NCCL) and the
                                                    # same step without collectives, for scaling efficiency

The bytes come from ``fastsae.distributed.comm_per_step`` — the exact list of collectives a step issues,
which tests/test_distributed.py checks against the collectives actually counted on gloo ranks. "payload"
is the tensor this rank hands to the collective; "received" is what a rank receives with ring algorithms
(all-reduce ``2(p-1)/p · n``, all-gather ``(p-1) · n``). The naive latent-sharded scheme all-gathers the
dense ``[B, d_sae/P]`` activations so every rank holds ``[B, d_sae]``.
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time

import torch

from fastsae import distributed as fd


def _mb(n: float) -> str:
    return f"{n / 2**20:9.2f}"


def bytes_table(args) -> list[dict]:
    rows = []
    configs = []
    for arch, k, aux in (("topk", args.k, False), ("topk", args.k, True), ("batchtopk", args.k, False),
                         ("jumprelu", 0, False)):
        for P in args.latent:
            configs.append((arch, k, aux, P))
    print(f"per rank, per step; B={args.batch} rows per rank, d_in={args.d_in}, d_sae={args.d_sae}, "
          f"k={args.k}, k_aux={args.k_aux}, {args.value_bytes}-byte values; MiB")
    print(f"{'scheme':38s} {'P':>3s} {'payload':>9s} {'received':>9s} {'naive recv':>10s} {'naive/ours':>10s}")
    for arch, k, aux, P in configs:
        common = dict(batch=args.batch, d_in=args.d_in, d_sae=args.d_sae, k=k, k_aux=args.k_aux, latent_size=P,
                      value_bytes=args.value_bytes, aux=aux, apply_b_dec_to_input=arch != "jumprelu")
        ours = fd.comm_per_step(arch, **common)
        naive = fd.comm_per_step(arch, naive=True, **common)
        pay = sum(b for *_, b in ours)
        recv = sum(fd.wire_bytes(op, n, b) for _, op, n, b in ours)
        nrecv = sum(fd.wire_bytes(op, n, b) for _, op, n, b in naive)
        name = f"latent-sharded {arch}" + (" + AuxK" if aux else "")
        print(f"{name:38s} {P:3d} {_mb(pay)} {_mb(recv)} {_mb(nrecv):>10s} {nrecv / recv:10.2f}")
        rows.append(dict(scheme=name, latent_size=P, payload=pay, received=recv, naive_received=nrecv))
    # The dense [B, d_sae] gather alone (what the merge replaces) against the candidates' gather.
    P = max(args.latent)
    dense = fd.wire_bytes("all_gather", P, args.batch * (-(-args.d_sae // P)) * args.value_bytes)
    cand = fd.wire_bytes("all_gather", P, args.batch * args.k * (args.value_bytes + 4))
    print(f"{'selection only: dense gather vs merge':38s} {P:3d} {'':9s} {_mb(cand)} {_mb(dense):>10s} "
          f"{dense / cand:10.2f}")
    for D in args.data:
        for arch in ("topk", "jumprelu"):
            ours = fd.comm_per_step(arch, batch=args.batch, d_in=args.d_in, d_sae=args.d_sae, k=args.k,
                                    data_size=D, value_bytes=args.value_bytes)
            pay = sum(b for *_, b in ours)
            recv = sum(fd.wire_bytes(op, n, b) for _, op, n, b in ours)
            name = f"data-parallel {arch} (D={D})"
            print(f"{name:38s} {1:3d} {_mb(pay)} {_mb(recv)} {'-':>10s} {'-':>10s}")
            rows.append(dict(scheme=name, data_size=D, payload=pay, received=recv))
    return rows


# ------------------------------------------------------------------------------------------------
# DDP vs flat all-reduce (2 gloo ranks on this machine)
# ------------------------------------------------------------------------------------------------


class _LossModule(torch.nn.Module):
    """DDP needs the work inside ``forward``: wrap ``training_forward`` and return the loss."""

    def __init__(self, sae):
        super().__init__()
        self.sae = sae

    def forward(self, x):
        return self.sae.training_forward(x).loss


def _ddp_worker(rank, world, port, args, q):
    import fastsae
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(args.threads)
    fd.init(init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=120)
    torch.manual_seed(0)
    saes = {name: fastsae.TopKSAE(args.d_in, args.d_sae, args.k) for name in ("flat", "ddp", "ddp-view", "none")}
    for s in saes.values():
        s.load_state_dict(saes["flat"].state_dict())
    flat = fd.DataParallel(saes["flat"])
    ddp = DDP(_LossModule(saes["ddp"]), broadcast_buffers=False)
    ddp_view = DDP(_LossModule(saes["ddp-view"]), broadcast_buffers=False, gradient_as_bucket_view=True)
    opts = {n: torch.optim.Adam(s.parameters(), lr=1e-4) for n, s in saes.items()}
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.d_in, generator=gen)

    def step(name):
        opt = opts[name]
        opt.zero_grad(set_to_none=True)
        if name == "flat":
            out = saes[name].training_forward(x)
            out.loss.backward()
            flat.reduce_gradients(out.loss)
        elif name == "none":  # the same local work without any communication
            saes[name].training_forward(x).loss.backward()
        else:
            (ddp if name == "ddp" else ddp_view)(x).backward()
        opt.step()

    times = {n: [] for n in saes}
    for rep in range(args.reps):
        for name in saes:  # interleaved, so load drift on a shared machine hits every scheme alike
            fd.barrier()
            t0 = time.perf_counter()
            step(name)
            fd.barrier()
            if rep >= 2:
                times[name].append(time.perf_counter() - t0)
    if rank == 0:
        q.put({n: statistics.median(t) for n, t in times.items()})
    fd.shutdown()


def ddp_vs_flat(args) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, args, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = q.get(timeout=900)
    for p in procs:
        p.join(60)
    grad_mb = (2 * args.d_in * args.d_sae + args.d_sae + args.d_in) * 4 / 2**20
    print(f"2 gloo ranks, TopK d_in={args.d_in} d_sae={args.d_sae} k={args.k} B={args.batch}/rank, "
          f"{grad_mb:.1f} MiB of gradients; median step time over {args.reps - 2} interleaved reps")
    base = res["none"]
    for name, t in res.items():
        print(f"  {name:9s} {t * 1e3:8.1f} ms   x{t / base:5.2f} of the step without communication   "
              f"x{t / res['flat']:5.2f} of flat")
    return res


# ------------------------------------------------------------------------------------------------
# torchrun: step time and scaling efficiency on the launched ranks
# ------------------------------------------------------------------------------------------------


def timed_run(args) -> None:
    import fastsae

    g = fd.init(args.latent_parallel)
    device = g.device if g.backend == "nccl" else torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    kw = dict(dtype=dtype, device=device)
    if args.arch == "jumprelu":
        sae = fastsae.JumpReLUSAE(args.d_in, args.d_sae, **kw)
    else:
        cls = fastsae.TopKSAE if args.arch == "topk" else fastsae.BatchTopKSAE
        sae = cls(args.d_in, args.d_sae, args.k, **kw)
    module = fd.ShardedSAE.from_full(sae, g) if g.latent_size > 1 else sae
    del sae
    dp = fd.DataParallel(module, g)
    opt = torch.optim.Adam(module.parameters(), lr=1e-4)
    x = torch.randn(args.batch, args.d_in, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(communicate=True):
        opt.zero_grad(set_to_none=True)
        out = module.training_forward(x)
        out.loss.backward()
        if communicate:
            dp.reduce_gradients(out.loss)
        opt.step()
        module.apply_constraints()
        if communicate:
            dp.sync_buffers()

    times = []
    for i in range(args.warmup + args.steps):
        fd.barrier()
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    local = None
    if g.latent_size == 1:  # the same step without gradient communication: the ideal for data parallel
        lt = []
        for i in range(args.warmup + args.steps):
            sync()
            t0 = time.perf_counter()
            step(communicate=False)
            sync()
            if i >= args.warmup:
                lt.append(time.perf_counter() - t0)
        local = statistics.median(lt)
    tokens = args.batch * g.data_size / t
    if g.is_main:
        rec = dict(world_size=g.world_size, data_size=g.data_size, latent_size=g.latent_size, backend=g.backend,
                   device=str(device), arch=args.arch, d_in=args.d_in, d_sae=args.d_sae, k=args.k,
                   batch_per_rank=args.batch, step_ms=t * 1e3, tokens_per_s=tokens,
                   local_step_ms=None if local is None else local * 1e3,
                   efficiency=None if local is None else local / t)
        print(json.dumps(rec))
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
    fd.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ddp", action="store_true", help="time DDP against the flat all-reduce on 2 gloo ranks")
    p.add_argument("--time", action="store_true", help="under torchrun: step time and scaling efficiency")
    p.add_argument("--batch", type=int, default=None, help="rows per rank")
    p.add_argument("--d-in", type=int, default=None)
    p.add_argument("--d-sae", type=int, default=None)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--k-aux", type=int, default=None)
    p.add_argument("--value-bytes", type=int, default=4)
    p.add_argument("--latent", type=int, nargs="+", default=[2, 4, 8], help="latent-parallel sizes (table)")
    p.add_argument("--data", type=int, nargs="+", default=[2, 8], help="data-parallel sizes (table)")
    p.add_argument("--latent-parallel", type=int, default=1, help="--time: ranks sharing one SAE's latents")
    p.add_argument("--arch", default="topk", choices=["topk", "batchtopk", "jumprelu"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu", help="--time with gloo: device of the tensors")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="append the JSON record(s) to this file")
    args = p.parse_args(argv)
    if args.ddp:
        args.batch = args.batch or 512
        args.d_in = args.d_in or 256
        args.d_sae = args.d_sae or 4096
        args.k = min(args.k, 32)
        res = ddp_vs_flat(args)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps(dict(mode="ddp", **{f"{k}_ms": v * 1e3 for k, v in res.items()})) + "\n")
    elif args.time or fd.launched():
        args.batch = args.batch or 4096
        args.d_in = args.d_in or 2304
        args.d_sae = args.d_sae or 65536
        timed_run(args)
    else:
        args.batch = args.batch or 4096
        args.d_in = args.d_in or 2304
        args.d_sae = args.d_sae or 65536
        args.k_aux = args.k_aux or args.d_in // 2
        rows = bytes_table(args)
        if args.out:
            with open(args.out, "a") as fh:
                for r in rows:
                    fh.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
