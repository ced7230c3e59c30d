"""Beyond one device: data-parallel and latent-sharded SAE training on ``torch.distributed``.

Being split into one module per job; the names below are the package's public surface.
"""
from .sharded import (  # noqa: F401
    DEFAULT_TIMEOUT_S, MANIFEST, SHARDABLE, DataParallel, DistributedError, Grid, NonFiniteLossError,
    RankSlicedSource, ShardedSAE, TrainingContext, _pack, _slice, _unpack, all_gather, all_reduce_, assert_in_sync,
    barrier, broadcast_, comm_per_step, copy_in, count_bytes, env_world_size, global_mean, grid, index_dtype_for,
    init, launched, load_optimizer_shard, load_shard, load_sharded, merge_topk, read_manifest, reduce_out,
    save_sharded, shard_items, shard_range, shard_rows, shutdown, split_sizes, wire_bytes,
)
