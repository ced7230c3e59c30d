"""Latent sharding: :class:`ShardedSAE`, one rank's slice of an SAE's latents, with the top-k merge across the
latent group (one all-gather of ``(value, global index)`` candidates per row) and resuming from a checkpoint."""
from __future__ import annotations

import warnings

from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import reference as ref
from ..io import read_safetensors
from ..sae import ARCHITECTURES
from .checkpoint import MANIFEST, _build, _full_state, read_manifest, save_sharded
from .collectives import _group_size, all_gather, all_reduce_, broadcast_, copy_in, reduce_out
from .group import Grid, grid
from .slicing import shard_range, split_sizes


def _pack(values: Tensor, indices: Tensor, index_dtype: torch.dtype = torch.int32) -> Tensor:
    """``(values [..., w], indices [..., w]) -> uint8 [..., w * (value bytes + index bytes)]``: one all-gather
    carries both."""
    v = values.contiguous().view(torch.uint8).reshape(*values.shape, -1)
    i = indices.to(index_dtype).contiguous().view(torch.uint8).reshape(*indices.shape, -1)
    return torch.cat([v, i], -1).reshape(*values.shape[:-1], -1)


def _unpack(packed: Tensor, dtype: torch.dtype, w: int, index_dtype: torch.dtype = torch.int32):
    vb = torch.empty((), dtype=dtype).element_size()
    ib = torch.empty((), dtype=index_dtype).element_size()
    p = packed.reshape(*packed.shape[:-1], w, vb + ib)
    values = p[..., :vb].contiguous().view(dtype).squeeze(-1)
    indices = p[..., vb:].contiguous().view(index_dtype).squeeze(-1).long()
    return values, indices


def index_dtype_for(n: int) -> torch.dtype:
    """The narrowest index dtype for global ids in ``[0, n)`` (int32 halves the merge's index bytes)."""
    return torch.int32 if n <= 2**31 else torch.int64


def merge_topk(values: Tensor, indices: Tensor, k: int, group, latent_rank: int,
               index_dtype: torch.dtype = torch.int32) -> tuple[Tensor, Tensor, Tensor]:
    """Global top-``k`` per row from each rank's local candidates.

    ``values [R, w]`` (this rank's candidates, padded with ``-inf``), ``indices [R, w]`` their *global* ids
    (they must fit ``index_dtype``; see :func:`index_dtype_for`). Returns ``(top_values [R, k], top_indices
    [R, k], mine [R, w] bool)``: the merged winners (sorted descending, identical on every rank) and which of
    this rank's candidates won. Communication: one all-gather of ``R·w`` (value, index) pairs per rank.
    """
    w = values.shape[-1]
    if group is None or _group_size(group) == 1:
        top, pos = torch.topk(values, k, dim=-1)
        mine = torch.zeros_like(values, dtype=torch.bool).scatter_(-1, pos, True)
        return top, indices.gather(-1, pos), mine
    gathered = all_gather(_pack(values, indices, index_dtype), group)  # [P, R, w*(vb+ib)]
    vals, idx = _unpack(gathered, values.dtype, w, index_dtype)  # [P, R, w]
    P, R = vals.shape[0], vals.shape[1]
    vals = vals.permute(1, 0, 2).reshape(R, P * w)
    idx = idx.permute(1, 0, 2).reshape(R, P * w)
    top, pos = torch.topk(vals, k, dim=-1)
    won = torch.zeros(R, P * w, dtype=torch.bool, device=values.device).scatter_(-1, pos, True)
    return top, idx.gather(-1, pos), won[:, latent_rank * w : (latent_rank + 1) * w]


def _pad(t: Tensor, width: int, value) -> Tensor:
    if t.shape[-1] == width:
        return t
    return F.pad(t, (0, width - t.shape[-1]), value=value)


def _split_dims(full_shapes: dict[str, torch.Size], local_shapes: dict[str, torch.Size]) -> dict[str, Optional[int]]:
    """For each state entry: the dimension split across latent shards, or ``None`` when replicated."""
    dims = {}
    for name, fs in full_shapes.items():
        ls = local_shapes[name]
        diff = [i for i, (a, b) in enumerate(zip(fs, ls)) if a != b]
        dims[name] = diff[0] if diff else None
    return dims


SHARDABLE = ("jumprelu", "topk", "batchtopk", "relu")


class ShardedSAE(nn.Module):
    """One latent shard of an SAE too wide for one device (see the module docstring).

    ``self.shard`` is an ordinary SAE module of the same architecture with ``d_sae = d_sae_local`` holding
    this rank's slice ``[start, stop)``; its kernels, ``apply_constraints`` and ``observe`` (per-latent
    statistics) are used as they are. ``training_forward`` returns the global loss/``x_hat``/``l0`` (identical
    on the latent group) and ``fired [d_sae]`` for the whole SAE, so a training loop sees the interface of a
    single-process SAE; ``dead_mask`` may be the whole ``[d_sae]`` mask or this shard's ``[d_sae_local]``.
    """

    def __init__(self, shard: nn.Module, full_config: dict, g: Grid, split: dict[str, Optional[int]]):
        super().__init__()
        arch = full_config["architecture"]
        if arch not in SHARDABLE:
            raise ValueError(f"latent sharding supports architectures {list(SHARDABLE)}, got {arch!r}")
        self.shard = shard
        self.grid = g
        self.full_config = dict(full_config)
        self.split = dict(split)
        sizes = split_sizes(full_config["d_sae"], g.latent_size)
        self.start = sum(sizes[: g.latent_rank])
        self.stop = self.start + sizes[g.latent_rank]
        if shard.d_sae != self.stop - self.start:
            raise ValueError(f"shard has d_sae={shard.d_sae}, expected {self.stop - self.start}")

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_full(cls, sae: nn.Module, g: Optional[Grid] = None) -> "ShardedSAE":
        """Slice a full SAE (identical on every rank) into this rank's shard."""
        g = g or grid()
        cfg = _shardable_config(sae.config(), g)
        start, stop = shard_range(cfg["d_sae"], g.latent_rank, g.latent_size)
        with torch.random.fork_rng(devices=[]):  # building the shard must not move the caller's RNG
            local = _build(cfg, stop - start, backend=sae.backend, device=sae.device)
        full_state = sae.state_dict()
        split = _split_dims({k: v.shape for k, v in full_state.items()},
                            {k: v.shape for k, v in local.state_dict().items()})
        local.load_state_dict({k: _slice(v, split[k], start, stop) for k, v in full_state.items()})
        local.train(sae.training)
        return cls(local, cfg, g, split)

    @classmethod
    def create(cls, architecture: str, d_in: int, d_sae: int, g: Optional[Grid] = None, *, seed: int = 0,
               **kwargs) -> "ShardedSAE":
        """Build the shard directly (never materialising the full SAE): the same initialisation distribution
        as the full module, from the RNG seeded with ``seed`` and the latent rank (data replicas agree)."""
        g = g or grid()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {architecture!r}")
        k = kwargs.pop("k", None)
        args = (d_in, d_sae) if k is None else (d_in, d_sae, k)
        with torch.device("meta"):
            cfg = ARCHITECTURES[architecture](*args, **{k_: v for k_, v in kwargs.items() if k_ != "device"}).config()
        cfg = _shardable_config(cfg, g)
        start, stop = shard_range(d_sae, g.latent_rank, g.latent_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + g.latent_rank)
            local = _build(cfg, stop - start, backend=kwargs.get("backend", "auto"), device=kwargs.get("device"))
        meta_full = {k_: v.shape for k_, v in _meta_state(cfg).items()}
        return cls(local, cfg, g, _split_dims(meta_full, {k_: v.shape for k_, v in local.state_dict().items()}))

    # -- the SAE surface the training loop uses -----------------------------------------
    @property
    def d_sae(self) -> int:
        return self.full_config["d_sae"]

    @property
    def d_sae_local(self) -> int:
        return self.stop - self.start

    @property
    def d_in(self) -> int:
        return self.shard.d_in

    @property
    def architecture(self) -> str:
        return self.full_config["architecture"]

    @property
    def dtype(self):
        return self.shard.dtype

    @property
    def device(self):
        return self.shard.device

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            cfg = self.__dict__.get("full_config", {})
            if name in cfg:
                return cfg[name]
            return getattr(self._modules["shard"], name)

    def config(self) -> dict:
        return dict(self.full_config)

    def ops(self, device=None):
        return self.shard.ops(device)

    def apply_constraints(self) -> None:
        self.shard.apply_constraints()

    def observe(self, x: Tensor, out) -> None:
        self.shard.observe(x, out)

    @torch.no_grad()
    def broadcast_replicated(self) -> None:
        """Make the replicated tensors (``b_dec``, scalar buffers) those of latent rank 0 on the whole latent
        group — shards cut from SAEs that were initialised without a common seed still form one SAE."""
        g = self.grid
        if g.latent_size == 1:
            return
        src = g.global_rank(g.data_rank, 0)
        state = self.shard.state_dict()
        for name, dim in self.split.items():
            if dim is None and name in state:
                broadcast_(state[name], src, g.latent_group)

    @property
    def calibrate(self):
        """BatchTopK's end-of-training calibration over the whole SAE's latents: the shard's own method would
        keep the ``N·k`` largest activations of its slice only, so every rank would set a different, too low
        threshold. Absent (``AttributeError``) for the architectures without one, as on the module."""
        if not hasattr(self.shard, "calibrate"):
            raise AttributeError(f"a {self.architecture} SAE has no calibrate")
        return self._calibrate_whole

    def on_train_end(self, x: Tensor, target: Optional[Tensor] = None) -> None:
        """BatchTopK: the calibration over all shards' latents. The shard's own hook is not called: ReLU's
        magnitude refit on one shard would fit its slice's latents to the whole input (not sharded yet)."""
        calibrate = getattr(self, "calibrate", None)
        if calibrate is not None:
            calibrate(x)

    @torch.no_grad()
    def _calibrate_whole(self, x: Tensor, batch_size: Optional[int] = None) -> float:
        """Collective over the latent group, which must pass the same rows ``x``."""
        s = self.shard
        x2, _ = s._flatten(x)
        n_keep = x2.shape[0] * self.full_config["k"]
        local = s._largest_activations(x2, n_keep, batch_size)
        group = self.grid.latent_group if self.grid.latent_size > 1 else None
        cand = _pad(local.unsqueeze(0), n_keep, float("-inf"))
        top, _, _ = merge_topk(cand, torch.zeros_like(cand, dtype=torch.int32), n_keep, group, self.grid.latent_rank)
        return s._set_calibrated_threshold(top[0])

    def save(self, path) -> Path:
        """Collective: every rank calls it (see :func:`save_sharded`)."""
        return save_sharded(self, path)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.training_forward(x).x_hat.to(x.dtype).reshape(x.shape)

    # -- the sharded training forward -----------------------------------------------------
    def training_forward(self, x: Tensor, target: Optional[Tensor] = None, *, dead_mask: Optional[Tensor] = None,
                         sparsity_coefficient: Optional[float] = None):
        if target is not None:
            raise ValueError("latent sharding trains SAEs only: a transcoder's target is not supported here")
        s = self.shard
        x2, _ = s._flatten(x)
        if dead_mask is not None:
            if not isinstance(dead_mask, Tensor) or dead_mask.shape not in ((self.d_sae,), (self.d_sae_local,)):
                raise ValueError(f"dead_mask must be a [d_sae]=[{self.d_sae}] (or this shard's "
                                 f"[d_sae_local]=[{self.d_sae_local}]) bool tensor")
            if dead_mask.shape[0] == self.d_sae:
                dead_mask = dead_mask[self.start : self.stop]
            dead_mask = dead_mask.to(device=x2.device, dtype=torch.bool)
        group = self.grid.latent_group if self.grid.latent_size > 1 else None
        ops = s.ops(x2.device)
        # b_dec is replicated: its use in the encoder input gathers every shard's gradient in backward.
        b_in = copy_in(s.b_dec, group)
        x_in = x2 - b_in if s.apply_b_dec_to_input else x2
        zero_b = torch.zeros_like(s.b_dec).detach()
        arch = self.architecture
        aux = x2.new_zeros(())
        if arch == "jumprelu":
            out = ops.jumprelu_sae(x_in, s.W_enc, s.b_enc, s.W_dec, zero_b, s.threshold, s.bandwidth, False)
            x_hat = reduce_out(out.x_hat, group) + s.b_dec
            l0 = reduce_out(out.l0, group)
            lam = s.sparsity_coefficient if sparsity_coefficient is None else sparsity_coefficient
            fwd = ref.SAEForward(x_hat=x_hat, l0=l0, fired=self._gather_fired(out.fired, group))
            sparsity = ref.quadratic_l0(l0, s.target_l0) if s.sparsity_loss == "quadratic" else l0.mean()
            return s._output(x2, fwd, sparsity, aux, lam, 0.0)
        if arch == "relu":
            out = ops.relu_sae(x_in, s.W_enc, s.b_enc, s.W_dec, zero_b, False)
            x_hat = reduce_out(out.x_hat, group) + s.b_dec
            sparsity = reduce_out(out.sparsity, group)
            l0 = all_reduce_(out.l0.detach().clone(), group)
            lam = s.sparsity_coefficient if sparsity_coefficient is None else sparsity_coefficient
            fwd = ref.SAEForward(x_hat=x_hat, l0=l0, fired=self._gather_fired(out.fired, group))
            return s._output(x2, fwd, sparsity.mean(), aux, lam, 0.0)
        # TopK / BatchTopK: local selection, merged across the latent group.
        pre = F.relu(x_in @ s.W_enc + s.b_enc)  # [B, n_local]
        B, n = pre.shape
        k = self.full_config["k"]
        # BatchTopK's warm-up (set by its on_train_step) selects each row's k largest, exactly as the module does
        per_row = arch == "topk" or (s.training and getattr(s, "per_row_selection", False))
        if per_row:
            vals, idx = ops.topk(pre, min(k, n))
            cand_v = _pad(vals.detach(), k, float("-inf"))
            cand_i = _pad(idx + self.start, k, 0)
            top, _, mine = merge_topk(cand_v, cand_i, k, group, self.grid.latent_rank, index_dtype_for(self.d_sae))
            mine = mine[:, : vals.shape[1]]
            partial = ops.sparse_decode(vals * mine, idx, s.W_dec, None)
            kept_local = mine & (vals > 0)
            min_kept = None
        else:  # batchtopk: the B·k largest entries of the whole [B, d_sae] batch
            n_keep = min(B * k, B * self.d_sae)
            flat = pre.reshape(-1)
            vals, fidx = torch.topk(flat, min(n_keep, flat.numel()), sorted=False)
            rows, cols = fidx // n, fidx % n
            cand_v = _pad(vals.detach().unsqueeze(0), n_keep, float("-inf"))
            cand_i = _pad((rows * self.d_sae + cols + self.start).unsqueeze(0), n_keep, 0)
            top, _, mine = merge_topk(cand_v, cand_i, n_keep, group, self.grid.latent_rank,
                                      index_dtype_for(B * self.d_sae))
            mine = mine[0, : vals.shape[0]]
            f = torch.zeros_like(flat).scatter(0, fidx, vals * mine).reshape(B, n)
            partial = f @ s.W_dec
            kept_local = torch.zeros(B, n, dtype=torch.bool, device=pre.device).reshape(-1)
            kept_local[fidx[mine & (vals > 0)]] = True
            kept_local = kept_local.reshape(B, n)
            idx = None
            # +inf when nothing was kept: the shard's running mean skips it (no host sync)
            min_kept = torch.where(top > 0, top, torch.full_like(top, float("inf"))).min().detach()
        x_hat = reduce_out(partial, group) + s.b_dec
        with torch.no_grad():
            if per_row:
                l0 = (top > 0).sum(-1).float()
                fired = torch.zeros(n, dtype=torch.bool, device=pre.device)
                fired[idx[kept_local]] = True
            else:
                l0 = all_reduce_(kept_local.sum(-1).float(), group)
                fired = kept_local.any(0)
        if min_kept is not None:
            s._update_threshold(SimpleNamespace(min_kept=min_kept))  # the module's bias-corrected running mean
        if dead_mask is not None and B:
            e_hat = self._auxk(x_in, dead_mask, group, ops, B)
            if e_hat is not None:
                aux = ref.auxk_loss((x2 - x_hat).detach(), e_hat)
        fwd = ref.SAEForward(x_hat=x_hat, l0=l0, fired=self._gather_fired(fired, group))
        return s._output(x2, fwd, x2.new_zeros(()), aux, 0.0, s.aux_coefficient)

    def _gather_fired(self, fired: Tensor, group) -> Tensor:
        """This shard's ``fired [d_sae_local]`` -> the whole SAE's ``[d_sae]`` (d_sae bytes per rank per step),
        so the training loop's dead-latent statistics look exactly like a single-process SAE's."""
        if group is None:
            return fired
        width = split_sizes(self.d_sae, self.grid.latent_size)
        parts = all_gather(_pad(fired.to(torch.uint8), width[0], 0), group)
        return torch.cat([parts[i, :w] for i, w in enumerate(width)]).bool()

    def _auxk(self, x_in: Tensor, dead_mask: Tensor, group, ops, B: int) -> Optional[Tensor]:
        """AuxK's ``ê`` with the top ``k_aux`` dead latents of the whole SAE, merged like the main top-k."""
        s = self.shard
        k_aux = self.full_config["k_aux"]
        dead = dead_mask.nonzero().squeeze(1)
        if dead.numel():
            pre_dead = F.relu(x_in @ s.W_enc[:, dead] + s.b_enc[dead])
            vals, idx = ops.topk(pre_dead, min(k_aux, dead.numel()))
        else:
            vals = x_in.new_zeros(B, 0)
            idx = torch.zeros(B, 0, dtype=torch.long, device=x_in.device)
        cand_v = _pad(vals.detach(), k_aux, float("-inf"))
        cand_i = _pad(dead[idx] + self.start if dead.numel() else idx, k_aux, 0)
        top, _, mine = merge_topk(cand_v, cand_i, k_aux, group, self.grid.latent_rank, index_dtype_for(self.d_sae))
        if not bool(torch.isfinite(top).any()):
            return None  # no dead latent on any shard (the same verdict everywhere: `top` is identical)
        mine = mine[:, : vals.shape[1]]
        if dead.numel():
            partial = ops.sparse_decode(vals * mine, idx, s.W_dec[dead], None)
        else:
            partial = x_in.new_zeros(B, s.d_in)
        return reduce_out(partial, group)


def _shardable_config(cfg: dict, g: Grid) -> dict:
    """``cfg`` checked for latent sharding, with what the sharded forward does not compute switched off."""
    if cfg["architecture"] not in SHARDABLE:
        raise ValueError(f"latent sharding supports architectures {list(SHARDABLE)}, got {cfg['architecture']!r}")
    if cfg["architecture"] == "jumprelu":
        # the sharded forward computes the step / quadratic L0 only; these terms would be dropped silently
        unsupported = [f"{name}={cfg[name]!r}" for name, off in
                       (("sparsity_loss", ("step", "quadratic")), ("pre_act_coefficient", (0, 0.0)),
                        ("ste_to_input", (False,))) if cfg.get(name, off[0]) not in off]
        if unsupported:
            raise ValueError(f"latent-sharded JumpReLU trains the 'step' or 'quadratic' L0 only, without "
                             f"pre-activation loss or straight-through gradient; got {', '.join(unsupported)}")
    if cfg["d_sae"] < g.latent_size:
        raise ValueError(f"d_sae={cfg['d_sae']} must be >= the latent-parallel size {g.latent_size}")
    if cfg.get("k_aux") and cfg["architecture"] == "jumprelu":
        # JumpReLU's AuxK selects among each row's quiet latents across every shard and projects off the row's
        # firing decoder rows: not implemented across shards, so the shards train without it
        warnings.warn(f"latent-sharded JumpReLU trains without its AuxK (k_aux={cfg['k_aux']} -> 0)", stacklevel=3)
        cfg = dict(cfg, k_aux=0)
    return cfg


def _slice(t: Tensor, dim: Optional[int], start: int, stop: int) -> Tensor:
    return t if dim is None else t.narrow(dim, start, stop - start).clone()


def _meta_state(cfg: dict) -> dict[str, Tensor]:
    with torch.device("meta"):
        return _build(cfg, cfg["d_sae"], device="meta").state_dict()


def load_shard(path, g: Optional[Grid] = None, *, backend: str = "auto", device=None) -> ShardedSAE:
    """Resume: this rank's :class:`ShardedSAE` from a sharded checkpoint, on any latent size (the same size
    reads only this rank's file; another size reassembles the SAE on the host and re-slices it)."""
    g = g or grid()
    path = Path(path)
    manifest = read_manifest(path)
    cfg = manifest["config"]
    _build(cfg, cfg.get("d_sae"), device="meta", where=path / MANIFEST)  # every field checked, nothing allocated
    n = len(manifest["shards"])
    if n == g.latent_size:
        state = read_safetensors(path / manifest["shards"][g.latent_rank]["file"])[0]
        start, stop = shard_range(cfg["d_sae"], g.latent_rank, g.latent_size)
        local = _build(cfg, stop - start, backend=backend, device=device, where=path / MANIFEST,
                       weights={k: v.shape for k, v in state.items()})
        try:
            local.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{path}: shard {g.latent_rank} does not match the manifest's config: {e}") from e
        return ShardedSAE(local, cfg, g, manifest["split"])
    state = _full_state(path, manifest)
    full = _build(cfg, cfg["d_sae"], backend=backend, device=device, where=path / MANIFEST,
                  weights={k: v.shape for k, v in state.items()})
    full.load_state_dict(state)
    return ShardedSAE.from_full(full, g)
