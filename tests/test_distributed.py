"""Data-parallel and latent-sharded training on torch.distributed, tested with CPU processes and gloo.

Each test spawns 2, 3 or 4 processes on loopback. Every rank also computes the single-process run on the
same global batch (the sizes are tiny) and compares loss, gradients and parameters after several steps; a
rank that finds a mismatch raises, which fails the test with the rank's traceback.
"""
import itertools
import os
import socket
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

import fastsae
from fastsae import distributed as fd

D_IN, B = 7, 12  # per-rank batch; odd sizes on purpose
STEPS = 3
TOL = dict(atol=1e-9, rtol=1e-9)  # float64: the sharded/data-parallel math is the same sums, reordered


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, scenario, out_dir, timeout_s):
    """Process entry point: join the group, run one scenario, record the outcome."""
    torch.set_num_threads(1)
    status = "ok"
    try:
        if scenario == "train":
            # What torchrun (or any launcher) sets: fastsae.train must find its way from these alone. The
            # scenario first computes its single-process references, then sets them.
            SCENARIOS[scenario](rank, world, out_dir, dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FASTSAE_DIST_TIMEOUT=str(timeout_s)))
        else:
            fd.init(scenario_lp(scenario, world), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                    world_size=world, timeout=timeout_s)
            SCENARIOS[scenario](rank, world, out_dir)
    except BaseException:  # noqa: BLE001 — report every failure to the parent
        status = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as fh:
        fh.write(status)
    try:
        fd.shutdown()
    except Exception:
        pass
    # Skip interpreter teardown: a peer that died may leave gloo threads that would block a clean exit.
    os._exit(0)


def scenario_lp(scenario, world):
    return {"hung": 1, "train": 1, "dp": 1, "latent": world, "grid2d": 2, "killed": 1, "nan": 1}[scenario.split(":")[0]]


def _context():
    # forkserver: one fresh server process imports torch and fastsae once, and every rank of every test
    # forks from it (a spawned rank would pay the imports again; forking pytest itself is unsafe after OpenMP).
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "fastsae", "fastsae.distributed", __name__])
    return ctx


def _spawn(scenario, world, tmp_path, timeout_s=30.0, wait_s=90.0):
    out_dir = str(tmp_path)
    ctx = _context()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, scenario, out_dir, timeout_s)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + wait_s
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:  # never leave a process behind, even when the test fails
        p.kill()
        p.join(5)
    assert not alive, f"{len(alive)} rank(s) still running after {wait_s}s"
    results = {}
    for r in range(world):
        f = os.path.join(out_dir, f"rank{r}.txt")
        results[r] = open(f).read() if os.path.exists(f) else f"no report (exit code {procs[r].exitcode})"
    return results


def _assert_ok(results):
    bad = {r: s for r, s in results.items() if s != "ok"}
    assert not bad, "\n".join(f"--- rank {r} ---\n{s}" for r, s in bad.items())


# ------------------------------------------------------------------------------------------------
# Scenarios (run inside the spawned ranks)
# ------------------------------------------------------------------------------------------------


def _make(arch, d_sae, seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    if arch == "jumprelu":  # without its AuxK, which latent sharding does not compute
        sae = fastsae.JumpReLUSAE(D_IN, d_sae, bandwidth=0.3, threshold_init=0.1, dtype=dtype,
                                  **dict(dict(k_aux=0), **kw))
    elif arch == "topk":
        sae = fastsae.TopKSAE(D_IN, d_sae, k=kw.pop("k", 4), k_aux=kw.pop("k_aux", 3), dtype=dtype, **kw)
    elif arch == "batchtopk":
        sae = fastsae.BatchTopKSAE(D_IN, d_sae, k=kw.pop("k", 3), k_aux=3, dtype=dtype, **kw)
    else:
        sae = fastsae.ReLUSAE(D_IN, d_sae, dtype=dtype, **kw)
    with torch.no_grad():  # break W_enc = W_decᵀ and give the biases values
        sae.W_enc.add_(0.2 * torch.randn_like(sae.W_enc))
        sae.b_dec.add_(0.1 * torch.randn_like(sae.b_dec))
        sae.b_enc.add_(0.1 * torch.randn_like(sae.b_enc))
    return sae


def _batches(global_rows, steps, dtype=torch.float64):
    g = torch.Generator().manual_seed(1234)
    return [torch.randn(global_rows, D_IN, generator=g, dtype=dtype) for _ in range(steps)]


def _dead_mask(d_sae, step):
    g = torch.Generator().manual_seed(99 + step)
    return torch.rand(d_sae, generator=g) < 0.4


def _reference_run(arch, d_sae, xs, use_dead, **kw):
    """The single-process run on the global batches: per step (loss, grads), and the final parameters."""
    sae = _make(arch, d_sae, **kw)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    history = []
    for step, x in enumerate(xs):
        opt.zero_grad()
        sae.on_train_step(step, len(xs))  # BatchTopK: its TopK warm-up, then the batch top-k
        out = sae.training_forward(x, dead_mask=_dead_mask(d_sae, step) if use_dead else None)
        out.loss.backward()
        history.append((out.loss.detach().clone(), {n: p.grad.clone() for n, p in sae.named_parameters()},
                        out.fired.clone(), out.l0.clone()))
        opt.step()
        sae.apply_constraints()
    return sae, history


def _close(a, b, what):
    torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{what}: {m}")


def _check_model(log, arch, sae, batch, data_size, latent_size, use_dead):
    """The collectives actually issued are exactly those of fd.comm_per_step (the benchmark's byte model)."""
    cfg = sae.config()
    model = fd.comm_per_step(arch, batch=batch, d_in=D_IN, d_sae=cfg["d_sae"], k=cfg.get("k", 0),
                             k_aux=cfg.get("k_aux", 0), latent_size=latent_size, data_size=data_size,
                             value_bytes=8, aux=use_dead, apply_b_dec_to_input=cfg["apply_b_dec_to_input"],
                             per_row_selection=sae.training and getattr(sae, "per_row_selection", False))
    assert sorted(log) == sorted((op, n, b) for _, op, n, b in model), (arch, log, model)


def _run_dp(arch, rank, world, d_sae=11, **kw):
    g = fd.grid()
    xs = _batches(B * world, STEPS)
    ref_sae, history = _reference_run(arch, d_sae, xs, use_dead=False, **kw)
    sae = _make(arch, d_sae, **kw)
    dp = fd.DataParallel(sae)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for step, x in enumerate(xs):
        opt.zero_grad()
        x_local = fd.shard_rows(x)
        assert x_local.shape[0] == B
        with fd.count_bytes() as log:
            out = sae.training_forward(x_local)
            out.loss.backward()
            loss = dp.reduce_gradients(out.loss)
            dp.sync_buffers()
            fired = dp.reduce_fired(out.fired)
        _check_model(log, arch, sae, B, world, 1, use_dead=False)
        ref_loss, ref_grads, ref_fired, _ = history[step]
        _close(loss, ref_loss, f"{arch} dp loss step {step}")
        for n, p in sae.named_parameters():
            _close(p.grad, ref_grads[n], f"{arch} dp grad {n} step {step}")
        opt.step()
        sae.apply_constraints()
        sae.observe(x_local, out)
        dp.sync_buffers()
        assert torch.equal(fired, ref_fired)
    for n, p in sae.named_parameters():
        _close(p.detach(), dict(ref_sae.named_parameters())[n].detach(), f"{arch} dp final {n}")
    for n, b in sae.named_buffers():
        _close(b, dict(ref_sae.named_buffers())[n], f"{arch} dp buffer {n}")
    fd.assert_in_sync(sae)
    assert g.data_size == world


def _run_latent(arch, rank, world, d_sae, use_dead, data_size=1, **kw):
    g = fd.grid()
    xs = _batches(B * data_size, STEPS)
    ref_sae, history = _reference_run(arch, d_sae, xs, use_dead, **kw)
    sharded = fd.ShardedSAE.from_full(_make(arch, d_sae, **kw), g)
    assert sharded.d_sae == d_sae and sharded.d_sae_local == fd.split_sizes(d_sae, g.latent_size)[g.latent_rank]
    dp = fd.DataParallel(sharded)
    opt = torch.optim.Adam(sharded.parameters(), lr=1e-2)
    lo, hi = sharded.start, sharded.stop
    for step, x in enumerate(xs):
        opt.zero_grad()
        x_local = fd.shard_rows(x)
        # The whole [d_sae] mask on even steps, this shard's slice on odd ones: both are accepted.
        dead = (_dead_mask(d_sae, step)[lo:hi] if step % 2 else _dead_mask(d_sae, step)) if use_dead else None
        sharded.on_train_step(step, len(xs))
        with fd.count_bytes() as log:
            out = sharded.training_forward(x_local, dead_mask=dead)
            out.loss.backward()
            loss = dp.reduce_gradients(out.loss)
            dp.sync_buffers()
            dp.reduce_fired(out.fired)
        _check_model(log, arch, sharded, B, data_size, g.latent_size, use_dead=use_dead)
        ref_loss, ref_grads, ref_fired, ref_l0 = history[step]
        _close(loss, ref_loss, f"{arch} latent loss step {step}")
        if data_size == 1:
            _close(out.l0, ref_l0, f"{arch} latent l0 step {step}")
            assert torch.equal(out.fired, ref_fired), f"{arch} fired step {step}"
        for n, p in sharded.shard.named_parameters():
            _close(p.grad, fd._slice(ref_grads[n], sharded.split[n], lo, hi), f"{arch} latent grad {n} step {step}")
        opt.step()
        sharded.apply_constraints()
        sharded.observe(x_local, out)
        dp.sync_buffers()
    ref_params = dict(ref_sae.named_parameters())
    for n, p in sharded.shard.named_parameters():
        _close(p.detach(), fd._slice(ref_params[n].detach(), sharded.split[n], lo, hi), f"{arch} latent final {n}")
    if arch == "batchtopk":  # the running threshold, then the end-of-training calibration over all latents
        _close(sharded.threshold, ref_sae.threshold, "batchtopk latent running threshold")
        x = torch.randn(17, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        assert sharded.calibrate(x) == ref_sae.calibrate(x)
        _close(sharded.threshold, ref_sae.threshold, "batchtopk latent calibrated threshold")
    elif arch in ("topk", "relu", "jumprelu"):
        assert getattr(sharded, "calibrate", None) is None
    return sharded, ref_sae


def sc_dp(rank, world, out_dir):
    for arch in ("jumprelu", "topk", "relu"):
        _run_dp(arch, rank, world)
    # A float32 run agrees to float32 tolerance too (the brief's bar).
    _run_dp_f32(rank, world)
    # Σ total / Σ count over the data group (e.g. the dataset's mean squared norm): ranks hold 1..world rows.
    assert fd.global_mean(float(rank + 1) * 2.0, rank + 1) == 2.0
    assert fd.global_mean(float(rank), 1) == sum(range(world)) / world
    _run_dp_adaptive(rank, world)


def _run_dp_adaptive(rank, world):
    """Adaptive bandwidth: each rank updates its running statistics from its own rows, sync_buffers makes
    every rank hold the same ε and statistics (the average of the per-rank updates)."""
    torch.manual_seed(0)
    sae = fastsae.JumpReLUSAE(D_IN, 11, bandwidth="adaptive", threshold_init=0.1, dtype=torch.float64)
    dp = fd.DataParallel(sae)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(100 + rank)  # different rows on every rank
    before = sae.bandwidth.clone()
    for _ in range(3):
        opt.zero_grad()
        x = torch.randn(B, D_IN, dtype=torch.float64, generator=gen)
        out = sae.training_forward(x)
        out.loss.backward()
        dp.reduce_gradients(out.loss)
        opt.step()
        sae.apply_constraints()
        sae.observe(x, out)
        dp.sync_buffers()
    assert not torch.equal(sae.bandwidth, before)
    for name, b in sae.named_buffers():
        if b.is_floating_point():
            everyone = fd.all_gather(b, fd.grid().data_group)
            assert all(torch.equal(everyone[0], e) for e in everyone), name
    fd.assert_in_sync(sae)


def _run_dp_f32(rank, world):
    xs = _batches(B * world, 2, torch.float32)
    full = _make("topk", 13, dtype=torch.float32)
    sae = _make("topk", 13, dtype=torch.float32)
    fd.DataParallel(sae)  # just the broadcast
    dp = fd.DataParallel(sae, broadcast=False)
    for x in xs:
        full.zero_grad()
        sae.zero_grad()
        ref = full.training_forward(x)
        ref.loss.backward()
        out = sae.training_forward(fd.shard_rows(x))
        out.loss.backward()
        loss = dp.reduce_gradients(out.loss)
        torch.testing.assert_close(loss, ref.loss.detach(), atol=1e-5, rtol=1e-5)
        for (n, p), q in zip(sae.named_parameters(), full.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"f32 grad {n}: {m}")


def sc_latent(rank, world, out_dir):
    d_sae = 10 if world == 3 else 9  # uneven shards: 4/3/3 and 5/4
    # k = 4 exceeds the 3-latent shards of the 3-way split: padded candidates must never win.
    _run_latent("topk", rank, world, d_sae, use_dead=True, k=4)
    _run_latent("jumprelu", rank, world, d_sae, use_dead=False, apply_b_dec_to_input=True)
    _run_latent("batchtopk", rank, world, d_sae, use_dead=True)  # step 0 in the TopK warm-up (1/3 of 3 steps)
    sharded, ref_sae = _run_latent("relu", rank, world, d_sae, use_dead=False)
    # Sharded checkpoint -> single-process SAE with the same outputs; resume on the same grid.
    path = os.path.join(out_dir, "ckpt")
    gen = torch.Generator().manual_seed(11)  # the latent group must see the same rows
    x = torch.randn(5, D_IN, dtype=torch.float64, generator=gen)
    _close(sharded(x), ref_sae(x), "sharded forward")
    opt = torch.optim.Adam(sharded.parameters(), lr=1e-2)
    sharded.training_forward(torch.randn(3, D_IN, dtype=torch.float64, generator=gen)).loss.backward()
    opt.step()  # an optimizer with state to round-trip
    expected = sharded(x)
    fd.save_sharded(sharded, path, optimizer=opt)
    loaded = fastsae.load(path)  # fastsae.io's format registry recognises shards.json
    _close(loaded(x), expected, "load_sharded outputs")
    resumed = fd.load_shard(path)
    for (n, p), q in zip(resumed.shard.named_parameters(), sharded.shard.parameters()):
        assert torch.equal(p, q), n
    opt2 = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    fd.load_optimizer_shard(path, opt2)
    for a, b in zip(opt2.state.values(), opt.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    # A different latent size (here: one process) re-slices the same checkpoint.
    single = fd.load_shard(path, fd.Grid())
    _close(single(x), expected, "load_shard on another latent size")


def sc_grid2d(rank, world, out_dir):
    g = fd.grid()
    assert (g.data_size, g.latent_size) == (2, 2)
    # AuxK normalises by each data rank's own residual variance, so the 2-D check runs without dead latents.
    _run_latent("topk", rank, world, 10, use_dead=False, data_size=2)
    _run_latent("jumprelu", rank, world, 10, use_dead=False, data_size=2)


def sc_killed(rank, world, out_dir):
    sae = _make("topk", 9)
    dp = fd.DataParallel(sae)
    t0 = time.monotonic()
    for step in range(1000):
        if rank == 1 and step == 2:
            os._exit(1)
        out = sae.training_forward(torch.randn(B, D_IN, dtype=torch.float64))
        out.loss.backward()
        try:
            dp.reduce_gradients(out.loss)
        except fd.DistributedError as e:
            elapsed = time.monotonic() - t0
            assert "rank 0" in str(e) and "all_reduce" in str(e), str(e)
            assert elapsed < fd.grid().timeout.total_seconds() + 5, elapsed
            return
    raise AssertionError("the surviving rank never noticed that its peer died")


def sc_hung(rank, world, out_dir):
    """A rank that stays alive but never arrives: the others raise when the group's time-out expires."""
    sae = _make("topk", 9)
    dp = fd.DataParallel(sae)
    limit = fd.grid().timeout.total_seconds()
    if rank == 1:
        time.sleep(limit + 4)
        os._exit(0)
    out = sae.training_forward(torch.randn(B, D_IN, dtype=torch.float64))
    out.loss.backward()
    t0 = time.monotonic()
    try:
        dp.reduce_gradients(out.loss)
    except fd.DistributedError as e:
        elapsed = time.monotonic() - t0
        assert limit - 0.5 <= elapsed < limit + 3, elapsed
        assert "time-out" in str(e), str(e)
        return
    raise AssertionError("the all-reduce returned although a rank never arrived")


def sc_nan(rank, world, out_dir):
    sae = _make("jumprelu", 9)
    dp = fd.DataParallel(sae)
    for step in range(3):
        x = torch.randn(B, D_IN, dtype=torch.float64)
        if step == 1 and rank == world - 1:
            x[0, 0] = float("nan")
        out = sae.training_forward(x)
        out.loss.backward()
        try:
            dp.reduce_gradients(out.loss)
        except fd.NonFiniteLossError as e:
            assert step == 1 and f"rank(s) [{world - 1}]" in str(e), str(e)
            return
    raise AssertionError("the NaN on the last rank was not reported")


def _train(sae, x, out_dir, steps, batch_size, **kw):
    return fastsae.train(sae, x, steps=steps, batch_size=batch_size, progress=False, lr=1e-2, lr_warmup_steps=0,
                         lr_decay_steps=0, seed=3, **kw).sae


def sc_train(rank, world, out_dir, env):
    """fastsae.train unchanged under a launcher's environment: data parallel, then latent-sharded, each with a
    checkpoint at step 2 and a resumed run to step 4, against one process on the global batch."""
    x = torch.randn(400, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    # the single-process runs on the same global batches, before this process joins the group
    refs = {lp: _train(_make("topk", 10, k=3), x, None, 4, B * world // lp) for lp in (1, world)}
    os.environ.update(env)
    for lp in (1, world):
        ref = refs[lp]
        ck = os.path.join(out_dir, f"run-lp{lp}")
        _train(_make("topk", 10, k=3), x, None, 2, B, checkpoint_dir=ck, latent_parallel=lp)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "resuming with steps=4 (the checkpoint used 2)": intended here
            # another initialisation: only the checkpoint can make this run match the reference
            got = _train(_make("topk", 10, k=3, seed=7), x, None, 4, B, checkpoint_dir=ck, resume=True,
                         latent_parallel=lp)
        for (n, a), b in zip(got.state_dict().items(), ref.state_dict().values()):
            torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"train lp={lp} {n}: {m}")
        if lp == 1:  # a plain iterable is each rank's own stream; the same one everywhere is refused
            batches_same = [x[i:i + B] for i in range(0, 96, B)]
            with pytest.raises(ValueError, match="got the same first rows"):
                _train(_make("topk", 10, k=3), batches_same, None, 2, B, init_b_dec=False, scale_inputs=False)
            mine = [t + rank for t in batches_same]
            _train(_make("topk", 10, k=3), mine, None, 2, B, init_b_dec=False, scale_inputs=False)
        if lp > 1:  # one complete generation of shard files, named by the manifest written last
            import json

            manifest = json.load(open(os.path.join(ck, "checkpoint.json")))
            assert manifest["step"] == 4 and len(manifest["files"]) == lp
            assert sorted(f for f in os.listdir(ck) if f.endswith(".safetensors")) == sorted(manifest["files"])


SCENARIOS = {"hung": sc_hung, "train": sc_train, "dp": sc_dp, "latent": sc_latent, "grid2d": sc_grid2d,
             "killed": sc_killed, "nan": sc_nan}


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


def test_data_parallel_matches_single_process_2_ranks(tmp_path):
    _assert_ok(_spawn("dp", 2, tmp_path))


def test_latent_sharding_matches_single_process_uneven_3_ranks(tmp_path):
    """TopK (+AuxK), JumpReLU, BatchTopK, ReLU over 3 uneven shards; sharded checkpoint round trip."""
    _assert_ok(_spawn("latent", 3, tmp_path))


def test_data_times_latent_grid_4_ranks(tmp_path):
    _assert_ok(_spawn("grid2d", 4, tmp_path))


def test_fastsae_train_under_launcher_env_matches_single_process(tmp_path):
    """fastsae.train, unchanged, under RANK/WORLD_SIZE/MASTER_*: data parallel and latent-sharded, with resume."""
    _assert_ok(_spawn("train", 2, tmp_path))


def test_killed_rank_ends_the_others_with_an_error(tmp_path):
    t0 = time.monotonic()
    results = _spawn("killed", 2, tmp_path, timeout_s=5.0, wait_s=60.0)
    assert results[0] == "ok", results[0]
    assert results[1].startswith("no report"), results[1]
    assert time.monotonic() - t0 < 60


def test_hung_rank_times_out_with_an_error(tmp_path):
    results = _spawn("hung", 2, tmp_path, timeout_s=3.0, wait_s=60.0)
    assert results[0] == "ok", results[0]


def test_nan_on_one_rank_stops_every_rank(tmp_path):
    _assert_ok(_spawn("nan", 2, tmp_path))


# -- single-process pieces (no spawn) --------------------------------------------------------------


def test_split_and_shard_helpers():
    assert fd.split_sizes(10, 3) == [4, 3, 3]
    assert [fd.shard_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    g = fd.Grid(rank=1, world_size=2, data_rank=1, data_size=2)
    assert fd.shard_items(list("abcde"), g) == ["b", "d"]
    x = torch.arange(10.0).reshape(5, 2)
    assert torch.equal(fd.shard_rows(x, g), x[3:])


def test_rank_sliced_shard_folder_reads_only_its_rows(tmp_path):
    """Rank slices of a shard folder: disjoint, covering, and identical to slicing the full stream."""
    import numpy as np

    from fastsae.data import ShardSource, batches

    g = torch.Generator().manual_seed(0)
    for i, n in enumerate((37, 50, 13)):
        np.save(tmp_path / f"s{i}.npy", torch.randn(n, 3, generator=g).numpy())
    src = ShardSource(tmp_path, block_rows=8, buffer_rows=20)

    class Opaque:  # hides the ShardSource type: the generic path slices the full stream
        d_in, resumable = src.d_in, True

        def chunks(self, seed, start_row=0):
            return src.chunks(seed, start_row)

    Bl, D = 7, 3
    take = lambda it, n: list(itertools.islice(it, n))  # noqa: E731  (the streams are endless)
    full = take(batches(src, Bl * D, seed=4), 12)
    read = []
    for shard in src.shards:  # count the rows the fast path reads
        shard.take = (lambda f: lambda idx: (read.append(len(idx)), f(idx))[1])(shard.take)
        shard.rows = None  # the fast path must never read whole blocks
    grid0 = fd.Grid(rank=0, world_size=D, data_rank=0, data_size=D)
    take(batches(fd.RankSlicedSource(src, Bl, grid0), Bl, seed=4), 12)
    assert 12 * Bl <= sum(read) < 12 * Bl + 20  # at most one buffer (20 rows) read ahead; 1/D of the stream
    for shard in src.shards:
        del shard.take, shard.rows
    for r in range(D):
        grid_r = fd.Grid(rank=r, world_size=D, data_rank=r, data_size=D)
        for start in (0, 5):
            fast = take(batches(fd.RankSlicedSource(src, Bl, grid_r), Bl, seed=4, start_batch=start), 12 - start)
            slow = take(batches(fd.RankSlicedSource(Opaque(), Bl, grid_r), Bl, seed=4, start_batch=start), 12 - start)
            for step, (a, b) in enumerate(zip(fast, slow)):
                assert torch.equal(a, b), (r, start, step)
                assert torch.equal(a, full[start + step][r * Bl:(r + 1) * Bl])


def test_single_process_init_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    g = fd.init()
    assert not g.distributed and g.is_main and g.world_size == 1
    with pytest.raises(ValueError, match="latent_parallel"):
        fd.init(2)
    with pytest.raises(ValueError, match="latent_parallel"):
        fd.init(0)
    with pytest.raises(ValueError, match="timeout"):
        fd.init(timeout=-1)


def test_merge_topk_local_and_packing():
    v = torch.tensor([[3.0, 1.0, float("-inf")], [0.5, 2.0, 1.0]])
    i = torch.tensor([[4, 7, 0], [1, 2, 3]])
    top, idx, mine = fd.merge_topk(v, i, 2, None, 0)
    assert torch.equal(top, torch.tensor([[3.0, 1.0], [2.0, 1.0]]))
    assert torch.equal(idx, torch.tensor([[4, 7], [2, 3]]))
    assert torch.equal(mine, torch.tensor([[True, True, False], [False, True, True]]))
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for index_dtype, big in ((torch.int32, 2**31 - 1), (torch.int64, 2**40 + 3)):
            ids_in = i.clone()
            ids_in[0, 0] = big
            vals, ids = fd._unpack(fd._pack(v.to(dtype), ids_in, index_dtype), dtype, 3, index_dtype)
            assert torch.equal(vals, v.to(dtype)) and torch.equal(ids, ids_in)
    assert fd.index_dtype_for(2**31) == torch.int32 and fd.index_dtype_for(2**31 + 1) == torch.int64


@pytest.mark.parametrize("backend", fastsae.backends())
@pytest.mark.parametrize("arch", ["jumprelu", "topk", "batchtopk", "relu"])
def test_sharded_code_path_matches_the_module_on_every_backend(arch, backend):
    """The sharded forward (here as one shard, no collectives) runs each backend's kernels like the module does."""
    sae = _make(arch, 23, dtype=torch.float32, backend=backend)
    sharded = fd.ShardedSAE.from_full(_make(arch, 23, dtype=torch.float32, backend=backend), fd.Grid())
    x = torch.randn(9, D_IN)
    dead = torch.rand(23) < 0.4 if arch in ("topk", "batchtopk") else None
    a = sae.training_forward(x, dead_mask=dead)
    b = sharded.training_forward(x, dead_mask=dead)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(b.loss, a.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.x_hat, a.x_hat, atol=1e-5, rtol=1e-5)
    assert torch.equal(b.fired, a.fired)
    for (n, p), q in zip(sae.named_parameters(), sharded.shard.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_sharded_jumprelu_drops_its_auxk_and_rejects_terms_it_does_not_compute():
    """A default JumpReLU (AuxK on) shards with a warning and k_aux 0 in its config, and then matches the module
    without AuxK, also with the quadratic target-L0 loss; the tanh, pre-activation and straight-through terms,
    which the sharded forward does not compute, are refused instead of dropped."""
    x = torch.randn(9, D_IN, dtype=torch.float64)
    full = _make("jumprelu", 23, k_aux=None, target_l0=3.0)
    assert full.k_aux >= 1  # the default: d_in // 16, at least 1
    with pytest.warns(UserWarning, match="without its AuxK"):
        sharded = fd.ShardedSAE.from_full(full, fd.Grid())
    assert sharded.full_config["k_aux"] == 0 and sharded.shard.k_aux == 0
    plain = _make("jumprelu", 23, target_l0=3.0)
    a, b = plain.training_forward(x), sharded.training_forward(x)
    torch.testing.assert_close(b.loss, a.loss)
    assert float(a.sparsity) != float(a.l0)  # the quadratic penalty, not λ·L0
    for bad in (dict(sparsity_loss="tanh"), dict(pre_act_coefficient=1e-3), dict(ste_to_input=True)):
        with pytest.raises(ValueError, match="latent-sharded JumpReLU"):
            fd.ShardedSAE.from_full(_make("jumprelu", 23, **bad), fd.Grid())


def test_gated_cannot_be_sharded():
    with pytest.raises(ValueError, match="latent sharding supports"):
        fd.ShardedSAE.from_full(fastsae.GatedSAE(4, 6), fd.Grid(world_size=2, latent_size=2))


def test_sharded_relu_skips_the_shard_local_magnitude_refit():
    """A shard's refit would fit its slice's latents to the whole input; the sharded module's end hook runs only
    BatchTopK's whole-SAE calibration."""
    sharded = fd.ShardedSAE.from_full(_make("relu", 23, dtype=torch.float32), fd.Grid())
    before = {n: t.clone() for n, t in sharded.shard.state_dict().items()}
    sharded.on_train_end(torch.randn(50, D_IN))
    for n, t in sharded.shard.state_dict().items():
        assert torch.equal(t, before[n]), n
    btk = fd.ShardedSAE.from_full(_make("batchtopk", 23, dtype=torch.float32), fd.Grid())
    btk.on_train_end(torch.randn(50, D_IN))
    assert btk.shard.calibrated
