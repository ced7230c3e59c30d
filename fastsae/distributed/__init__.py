"""Beyond one device: data-parallel and latent-sharded SAE training on ``torch.distributed``.

Everything here runs on PyTorch's own distributed engine (process groups launched by ``torchrun`` or any
launcher that sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``): NCCL when the ranks own GPUs,
gloo on CPU, chosen automatically by :func:`init`.

The process grid
----------------
``world_size = data_size × latent_size``. Rank ``r`` sits at ``(data_rank, latent_rank) = divmod(r, latent_size)``,
so the ranks that split one SAE's latents are neighbours (same node, fastest links) and the ranks that hold
the same latent slice on different data form the data groups.

Data parallel (``latent_size == 1``)
------------------------------------
Every rank reads a disjoint slice of the data (:func:`shard_range`, :func:`shard_items`) and computes the
loss of its local batch. :class:`DataParallel` then reduces, once per step:
- the gradients, summed and divided by ``data_size`` in one flat all-reduce per dtype (with the per-rank
  losses riding in the same buffer, so a NaN on one rank is seen by every rank in the same collective and
  all of them raise :class:`NonFiniteLossError` together);
- the running-statistic buffers (adaptive bandwidth, BatchTopK threshold, ...): each rank's *change*
  in this step is averaged, so constant buffers stay bit-exact and every rank ends the step identical;
- the ``fired`` mask (dead-latent statistics, OR over ranks) and the dataset normalisation factor.
Decoder normalisation and the threshold clamp are elementwise functions of identical parameters, so
they stay identical without communication.
Because the loss of every architecture except the AuxK term is a mean over rows, the mean of the per-rank
gradients equals the gradient of one process on the global batch (``per-rank batch × data_size``). AuxK's
normaliser ``‖e - mean e‖²`` and BatchTopK's ``B·k`` selection are per rank (as in other libraries).

Latent sharding (``latent_size > 1``)
-------------------------------------
:class:`ShardedSAE` keeps ``W_enc[:, s]``, ``b_enc[s]``, ``threshold[s]``, ``W_dec[s]`` (and every other
per-latent tensor) for one contiguous slice ``s`` of the latents; ``b_dec`` is replicated. Each rank
encodes its slice with the backend's kernels. TopK/BatchTopK take a local top-k, and the candidates are
merged with one all-gather of ``(value, global index)`` pairs per row (``[B, k]`` per rank, never the dense
``[B, d_sae]``); each rank decodes the winners it owns and the partial reconstructions are all-reduced.
JumpReLU/ReLU need no merge: partial ``x̂`` and ``l0`` are all-reduced. Backward mirrors it (Megatron's
"copy in / reduce out" pair): the all-reduce of partial sums has an identity backward, and the replicated
``b_dec`` entering the encoder all-reduces its gradient. AuxK runs the same merge over the dead latents.
BatchTopK keeps the module's TopK warm-up and running threshold, and its end-of-training ``calibrate`` merges
the shards' largest activations, so every rank sets the whole SAE's threshold.
Data and latent parallelism combine on the 2-D grid.

Checkpoints
-----------
:func:`save_sharded` writes one safetensors file per latent shard plus a ``shards.json`` manifest written
last (temp file + rename), so a directory with a manifest is always complete. :func:`load_sharded` rebuilds
a single-process SAE from it (``fastsae.load`` recognises the manifest); :func:`load_shard` resumes a
:class:`ShardedSAE` on any latent size.

Failures
--------
Every collective runs under the process group's time-out (:func:`init`, default 600 s, env
``FASTSAE_DIST_TIMEOUT``); a failing collective (peer died, time-out) is re-raised as
:class:`DistributedError` naming this rank and the operation, instead of hanging.

Modules
-------
One job per module, each importing only modules before it here (tests/test_architecture.py fails on a cycle):
``group`` (the grid, :func:`init` with its time-out) → ``collectives`` (error wrapping, byte accounting, the
copy-in / reduce-out pair) → ``slicing`` (who owns which rows and latents, per-rank data sources) →
``data_parallel`` (:class:`DataParallel`) and ``checkpoint`` (the sharded format, registered with
``fastsae.io.register_format``) → ``sharded`` (:class:`ShardedSAE` and its top-k merge) → ``cost`` (the
communication model) → ``context`` (:class:`TrainingContext`, what ``fastsae.train`` calls).
"""
from .checkpoint import MANIFEST, load_optimizer_shard, load_sharded, read_manifest, save_sharded
from .collectives import all_gather, all_reduce_, barrier, broadcast_, copy_in, count_bytes, reduce_out
from .context import TrainingContext
from .cost import comm_per_step, wire_bytes
from .data_parallel import DataParallel, NonFiniteLossError, assert_in_sync, global_mean
from .group import DEFAULT_TIMEOUT_S, DistributedError, Grid, env_world_size, grid, init, launched, shutdown
from .sharded import SHARDABLE, ShardedSAE, index_dtype_for, load_shard, merge_topk
from .sharded import _pack, _slice, _unpack  # noqa: F401  (tests check the packing and slicing directly)
from .slicing import RankSlicedSource, shard_items, shard_range, shard_rows, split_sizes

__all__ = [
    "DEFAULT_TIMEOUT_S", "MANIFEST", "SHARDABLE",
    "DistributedError", "NonFiniteLossError",
    "Grid", "init", "grid", "shutdown", "env_world_size", "launched",
    "all_reduce_", "all_gather", "broadcast_", "barrier", "reduce_out", "copy_in", "count_bytes",
    "split_sizes", "shard_range", "shard_items", "shard_rows", "RankSlicedSource",
    "DataParallel", "global_mean", "assert_in_sync",
    "ShardedSAE", "merge_topk", "index_dtype_for",
    "save_sharded", "read_manifest", "load_sharded", "load_shard", "load_optimizer_shard",
    "comm_per_step", "wire_bytes",
    "TrainingContext",
]
