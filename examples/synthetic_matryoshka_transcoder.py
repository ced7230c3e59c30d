"""Matryoshka BatchTopK and (skip) transcoders on the realistic synthetic data, scored against the ground truth.

    PYTHONPATH=. python examples/synthetic_matryoshka_transcoder.py --threads 1 --out runs/synthetic_mt.json

The data is ``fastsae.data.realistic`` (a mean offset 3x the signal, Zipf-like frequencies, log-normal
magnitudes, correlated and hierarchical features, 5% noise): ``x = mu + sum_j c_j d_j + noise`` with a known
dictionary ``d_j`` and codes ``c``.

1. **Matryoshka vs BatchTopK** (same width, k and steps). Both are scored with ``SyntheticData.evaluate``
   (features recovered at cosine > 0.9, MCC, firing F1, held-out FVU, L0). What Matryoshka adds is that every
   prefix of its latents is a dictionary on its own: the script reports the held-out FVU of the reconstruction
   from the first ``w`` latents only, for each Matryoshka width, and the mean firing probability of the true
   features that each group's latents match (early groups should hold the frequent, general features).
2. **Transcoders**. Targets are built from the same codes: ``y = sum_j c_j v_j + x A + noise_y``, with a second
   random unit dictionary ``v_j`` in ``d_out`` dimensions (the sparse computation) and a fixed random linear map
   ``A`` (the linear part of the computation; ``x A`` includes the mean offset's and the input noise's image),
   ``noise_y`` 5% of y's per-dimension RMS. So the ground truth is known on both sides:
   - a plain transcoder must write ``u_j = v_j + d_j A`` for feature j (the sparse code's whole effect on y);
     its decoder is scored against ``u`` and its firing against the true codes;
   - a skip transcoder can put ``A`` into ``W_skip`` and write only ``v_j``: its decoder is scored against ``v``
     and ``W_skip`` by its cosine to ``A``.
   FVU is on held-out ``y`` (centred).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fastsae
from fastsae.data import realistic
from fastsae.synthetic import match_metrics
from fastsae.training import train

HELD_OUT_SEED = 12345


def fvu(y_hat, y) -> float:
    y, y_hat = y.double(), y_hat.double()
    return float((y_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


@torch.no_grad()
def prefix_fvu(sae, x, width: int) -> float:
    """Held-out FVU of the reconstruction from latents ``< width`` only."""
    f = sae.encode(x)
    f[:, width:] = 0
    return fvu(sae.decode(f), x)


@torch.no_grad()
def group_frequencies(sae, data, widths) -> list:
    """Mean firing probability of the true features matched (cosine > 0.9) by latents in each width group."""
    W = F.normalize(sae.W_dec.float(), dim=1)
    cos = F.normalize(data.features.float(), dim=1) @ W.t()  # [features, latents]
    best_cos, best_feature = cos.max(0)
    out, lo = [], 0
    for w in widths:
        good = best_cos[lo:w] > 0.9
        feats = best_feature[lo:w][good]
        out.append(dict(latents=f"{lo}..{w - 1}", matched=int(good.sum()),
                        mean_probability=float(data.probabilities[feats].mean()) if feats.numel() else None))
        lo = w
    return out


def matryoshka_vs_batchtopk(args) -> dict:
    data = realistic(args.n_samples, args.d_in, args.n_features, active=args.active, seed=args.seed)
    k = max(1, round(data.true_l0))
    held = data.sample(args.held_out, HELD_OUT_SEED)
    widths = [args.width // 16, args.width // 4, args.width]
    out = dict(true_l0=data.true_l0, k=k, widths=widths)
    for name, make in (("batchtopk", lambda: fastsae.BatchTopKSAE(args.d_in, args.width, k)),
                       ("matryoshka_batchtopk",
                        lambda: fastsae.MatryoshkaBatchTopKSAE(args.d_in, args.width, k, widths=widths))):
        torch.manual_seed(args.seed)
        sae = make()
        t = time.perf_counter()
        train(sae, data, steps=args.steps, batch_size=args.batch_size, seed=args.seed, progress=False)
        m = data.evaluate(sae, n=args.held_out, seed=HELD_OUT_SEED)
        m["seconds"] = time.perf_counter() - t
        m["prefix_fvu"] = {w: prefix_fvu(sae, held, w) for w in widths}
        m["groups"] = group_frequencies(sae, data, widths)
        out[name] = m
        print(f"{name}: " + ", ".join(f"{key}={m[key]:.3f}" for key in ("recovery", "mcc", "f1", "fvu", "l0", "dead"))
              + "; prefix FVU " + ", ".join(f"{w}: {v:.3f}" for w, v in m["prefix_fvu"].items()), flush=True)
    return out


def transcoder_pairs(data, n: int, seed: int, V, A, noise_y: float, chunk: int = 50_000):
    """``(x, y, codes>0)`` for ``n`` fresh samples: ``y = c V + x A + noise``."""
    xs, ys, act = [], [], []
    for i, a in enumerate(range(0, n, chunk)):
        x, c = data.sample(min(chunk, n - a), seed * 1000 + i, return_codes=True)
        g = torch.Generator().manual_seed(seed * 1000 + i + 7)
        y = c @ V + x @ A
        y = y + noise_y * torch.randn(y.shape, generator=g)
        xs.append(x), ys.append(y), act.append(c > 0)
    return torch.cat(xs), torch.cat(ys), torch.cat(act)


def transcoders(args) -> dict:
    data = realistic(16, args.d_in, args.n_features, active=args.active, seed=args.seed)  # the model, few rows
    k = max(1, round(data.true_l0))
    g = torch.Generator().manual_seed(args.seed + 1)
    V = F.normalize(torch.randn(args.n_features, args.d_out, generator=g), dim=1)
    A = torch.randn(args.d_in, args.d_out, generator=g) * (args.linear_gain / args.d_in ** 0.5)
    # noise_y: 5% of the noiseless target's per-dimension RMS (centred)
    x0, c0 = data.sample(8192, 999, return_codes=True)
    y0 = c0 @ V + x0 @ A
    noise_y = 0.05 * float((y0 - y0.mean(0)).pow(2).mean().sqrt())
    x, y, _ = transcoder_pairs(data, args.n_samples, 1, V, A, noise_y)
    hx, hy, h_active = transcoder_pairs(data, args.held_out, 2, V, A, noise_y)
    U = data.features @ A + V  # what a plain transcoder must write for each feature
    out = dict(true_l0=data.true_l0, k=k, d_out=args.d_out, linear_gain=args.linear_gain, noise_y=noise_y,
               linear_fvu=None)
    # the best linear map x -> y on the training rows (least squares): what the sparse part adds beyond it
    X1 = torch.cat([x, torch.ones(x.shape[0], 1)], 1).double()
    sol = torch.linalg.lstsq(X1, y.double()).solution
    out["linear_fvu"] = fvu(torch.cat([hx, torch.ones(hx.shape[0], 1)], 1).double() @ sol, hy)
    print(f"transcoder data: true L0 {data.true_l0:.2f}, best linear map's held-out FVU {out['linear_fvu']:.3f}")
    for skip in (False, True):
        name = "topk_skip_transcoder" if skip else "topk_transcoder"
        torch.manual_seed(args.seed)
        sae = fastsae.Transcoder("topk", args.d_in, args.width, d_out=args.d_out, k=k, skip_connection=skip)
        t = time.perf_counter()
        train(sae, (x, y), steps=args.steps, batch_size=args.batch_size, seed=args.seed, progress=False)
        with torch.no_grad():
            f = sae.encode(hx)
            m = dict(seconds=time.perf_counter() - t, fvu=fvu(sae(hx), hy), l0=float((f != 0).sum(1).float().mean()),
                     dead=float((f == 0).all(0).float().mean()))
            fired = f != 0
            m["vs_u"] = match_metrics(sae.W_dec, U, fired, h_active)  # v_j + d_j A
            m["vs_v"] = match_metrics(sae.W_dec, V, fired, h_active)  # v_j alone
            if skip:
                m["skip_cos_to_A"] = float(F.cosine_similarity(sae.W_skip.flatten(), A.flatten(), dim=0))
        out[name] = m
        truth = "v" if skip else "u"
        mm = m[f"vs_{truth}"]
        print(f"{name}: FVU {m['fvu']:.3f}, L0 {m['l0']:.2f}, dead {m['dead']:.3f}; vs {truth}: recovery "
              f"{mm['recovery']:.3f}, MCC {mm['mcc']:.3f}, F1 {mm['f1']:.3f}"
              + (f"; cos(W_skip, A) {m['skip_cos_to_A']:.3f}" if skip else ""), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-in", type=int, default=32)
    p.add_argument("--d-out", type=int, default=24)
    p.add_argument("--n-features", type=int, default=128)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--active", type=float, default=3.0)
    p.add_argument("--n-samples", type=int, default=400_000)
    p.add_argument("--held-out", type=int, default=16384)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--linear-gain", type=float, default=0.5, help="scale of A (its entries ~ N(0, gain²/d_in))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", choices=["matryoshka", "transcoder"], default=None)
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = dict(settings=vars(args))
    if args.only in (None, "matryoshka"):
        results["matryoshka"] = matryoshka_vs_batchtopk(args)
    if args.only in (None, "transcoder"):
        results["transcoder"] = transcoders(args)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
