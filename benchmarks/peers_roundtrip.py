"""Check fastsae's exported folders with the peers' own loaders (a script for the peers venv, not a test).

    /work/venv-peers/bin/python benchmarks/peers_roundtrip.py        (from the repository root)

The venv (``python -m venv --system-site-packages``; ``pip install --no-deps sae-lens eai-sparsify
dictionary-learning`` and their small pure-Python dependencies, never torch) holds what fastsae's own
environment must not. For every architecture: fastsae -> ``sae.save(format="saelens")`` ->
``sae_lens.SAE.load_from_disk`` (outputs compared), -> SAELens ``save_model`` -> ``fastsae.load`` (round trip),
``to_saelens``/``from_saelens`` in memory, and TopK -> ``format="sparsify"`` -> ``SparseCoder.load_from_disk``;
then fresh dictionary_learning checkpoints of every dictionary class -> ``fastsae.load``. Prints the largest
absolute difference of each check and exits non-zero if any exceeds 1e-5 (float32).
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's Triton decoder needs a GPU

import torch  # noqa: E402

import fastsae  # noqa: E402
import peers  # noqa: E402  (tests/peers.py: the dictionary_learning helpers)

TOL = 1e-5


def modules() -> dict:
    d, n, k = 16, 48, 5
    out = {
        "relu": fastsae.ReLUSAE(d, n), "topk": fastsae.TopKSAE(d, n, k),
        "topk (no b_dec on input)": fastsae.TopKSAE(d, n, k, apply_b_dec_to_input=False),
        "batchtopk": fastsae.BatchTopKSAE(d, n, k), "jumprelu": fastsae.JumpReLUSAE(d, n),
        "jumprelu (no b_dec on input)": fastsae.JumpReLUSAE(d, n, apply_b_dec_to_input=False),
        "gated": fastsae.GatedSAE(d, n),
    }
    if hasattr(fastsae, "MatryoshkaBatchTopKSAE"):
        out["matryoshka_batchtopk"] = fastsae.MatryoshkaBatchTopKSAE(d, n, k, widths=[8, 24, n])
    if hasattr(fastsae, "Transcoder"):
        out["relu transcoder"] = fastsae.Transcoder("relu", d, n, d_out=12)
        out["jumprelu skip transcoder"] = fastsae.Transcoder("jumprelu", d, n, d_out=12, skip_connection=True)
        out["topk skip transcoder"] = fastsae.Transcoder("topk", d, n, d_out=d, k=k, skip_connection=True)
    return {name: peers.randomized(m) for name, m in out.items()}


def main() -> int:
    import sae_lens

    rows, bad_loads = [], []
    x = torch.randn(257, 16) * 2
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        tmp = Path(tmp)
        for name, sae in modules().items():
            ours = sae(x)
            folder = tmp / name.replace(" ", "_")
            try:
                sae.save(folder / "saelens", format="saelens")
            except ValueError as e:
                rows.append((name, "saelens export", f"refused: {e}"))
            else:
                theirs = sae_lens.SAE.load_from_disk(folder / "saelens")
                rows.append((name, f"SAELens load_from_disk ({theirs.cfg.architecture()})", float((theirs(x) - ours).abs().max())))
                theirs.save_model(folder / "again")
                rows.append((name, "SAELens save_model -> fastsae.load",
                             float((fastsae.load(folder / "again")(x) - ours).abs().max())))
                back = fastsae.from_saelens(fastsae.to_saelens(sae))
                rows.append((name, "to_saelens -> from_saelens", float((back(x) - ours).abs().max())))
            if getattr(sae, "base_architecture", sae.architecture) == "topk":
                import sparsify

                sae.save(folder / "sparsify", format="sparsify")
                coder = sparsify.SparseCoder.load_from_disk(folder / "sparsify")
                rows.append((name, "sparsify SparseCoder.load_from_disk", float((coder(x).sae_out - ours).abs().max())))
        if peers.dictionary_learning() is not None:
            for name in peers.DL_CASES:
                ae = peers.make_checkpoint(name, tmp / "dl" / name, seed=7)
                try:
                    sae = fastsae.load(tmp / "dl" / name)
                except ValueError as e:
                    rows.append((f"dictionary_learning {name}", "fastsae.load", f"FAIL: {e}"))
                    bad_loads.append(name)
                    continue
                xd = torch.randn(129, peers.D_IN) * 2
                rows.append((f"dictionary_learning {name}", f"fastsae.load -> {sae.architecture}",
                             float((sae(xd) - ae(xd)).abs().max())))
        else:
            rows.append(("dictionary_learning", "not importable", "skipped"))
    bad = 0
    w = max(len(r[0]) for r in rows)
    for what, check, err in rows:
        ok = isinstance(err, float) and err <= TOL
        bad += isinstance(err, float) and not ok
        print(f"{what:<{w}}  {check:<45}  {err if not isinstance(err, float) else f'{err:.2e}'}"
              f"{'' if ok or not isinstance(err, float) else '  FAIL'}")
    print(f"\n{len(rows)} checks, {bad} over {TOL:g}, {len(bad_loads)} dictionary_learning files refused")
    return 1 if bad or bad_loads else 0


if __name__ == "__main__":
    sys.exit(main())
