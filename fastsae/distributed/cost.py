"""The communication model: the collectives one training step issues per rank and their bytes on the wire (what
``benchmarks/bench_comm.py`` reports; tests/test_distributed.py checks it against :func:`count_bytes`)."""
from __future__ import annotations

import torch

from .sharded import index_dtype_for


def comm_per_step(
    architecture: str,
    *,
    batch: int,
    d_in: int,
    d_sae: int,
    k: int = 0,
    k_aux: int = 0,
    latent_size: int = 1,
    data_size: int = 1,
    value_bytes: int = 4,
    aux: bool = False,
    apply_b_dec_to_input: bool = False,
    naive: bool = False,
    per_row_selection: bool = False,
) -> list[tuple[str, str, int, int]]:
    """The collectives one training step issues on one rank: ``(what, op, group_size, payload_bytes)``.

    ``batch`` is the per-rank batch. ``naive=True`` models the baseline that all-gathers the dense
    ``[B, d_sae / latent_size]`` activations instead of the ``(value, index)`` top-k candidates.
    Data-parallel collectives (gradients, buffers, fired) are listed when ``data_size > 1``.
    ``per_row_selection``: BatchTopK in its TopK warm-up, whose selection (and its collectives) are TopK's.
    """
    P, D, vb = latent_size, data_size, value_bytes
    n_local = -(-d_sae // P)  # the largest shard (what the padded collectives carry)
    out = []
    selection = "topk" if architecture == "batchtopk" and per_row_selection else architecture
    if P > 1:
        if selection in ("topk", "batchtopk"):
            if naive:
                out.append(("dense activations", "all_gather", P, batch * n_local * vb))
            elif selection == "topk":
                out.append(("top-k candidates", "all_gather", P, batch * k * (vb + 4)))
            else:
                ib = torch.empty((), dtype=index_dtype_for(batch * d_sae)).element_size()
                out.append(("batch top-k candidates", "all_gather", P, batch * k * (vb + ib)))
            out.append(("partial x_hat", "all_reduce", P, batch * d_in * vb))
            if selection == "batchtopk":
                out.append(("l0", "all_reduce", P, batch * 4))
        else:  # jumprelu / relu: no selection to merge
            if naive:
                out.append(("dense activations", "all_gather", P, batch * n_local * vb))
            out.append(("partial x_hat", "all_reduce", P, batch * d_in * vb))
            if architecture == "relu":
                out.append(("sparsity", "all_reduce", P, batch * vb))
            out.append(("l0", "all_reduce", P, batch * 4))
        out.append(("fired", "all_gather", P, n_local))
        if aux and architecture in ("topk", "batchtopk"):
            out.append(("AuxK candidates", "all_gather", P, batch * k_aux * (vb + 4)))
            out.append(("partial AuxK e_hat", "all_reduce", P, batch * d_in * vb))
        if apply_b_dec_to_input:
            out.append(("b_dec grad (backward)", "all_reduce", P, d_in * vb))
        out.append(("non-finite verdict", "all_reduce", P, 4))
    if D > 1:
        n_params = 4 + (architecture == "jumprelu")
        shard = d_sae // P
        # One flat buffer per dtype: the parameters' dtype, float32 for θ (float64 in a float64 SAE), and
        # float64 for the per-rank losses and "has a gradient" flags.
        buckets = {vb: (2 * d_in * shard + shard + d_in) * vb}
        if architecture == "jumprelu":
            wide = 8 if vb == 8 else 4
            buckets[wide] = buckets.get(wide, 0) + shard * wide
        buckets[8] = buckets.get(8, 0) + (D + n_params) * 8
        for b, nbytes in buckets.items():
            out.append((f"gradients ({b}-byte)" + (" + losses + flags" if b == 8 else ""), "all_reduce", D, nbytes))
        buffers = {"jumprelu": shard, "batchtopk": 1}.get(architecture, 0)
        if buffers:
            out.append(("running-statistic buffers", "all_reduce", D, buffers * 8))
        out.append(("fired (dead latents)", "all_reduce", D, d_sae))
    return out


def wire_bytes(op: str, group_size: int, payload: int) -> float:
    """Bytes a rank receives for one collective with the bandwidth-optimal (ring) algorithms."""
    p = group_size
    if op == "all_reduce":
        return 2 * (p - 1) / p * payload
    if op == "all_gather":
        return (p - 1) * payload
    return float(payload)  # broadcast
