"""Matryoshka BatchTopK prefix weights and widths at the true L0 (k=4), one line per point (issue 18).

Usage: PYTHONPATH=$PWD python experiments/matryoshka_weights_sweep.py "job='bench', pw='width', seed=0" ...
  job:    'bench' = the quality benchmark's size (fastsae.bench.quality.QUALITY: 64 dims, 256 features, d_sae 512,
          1,000 x 1,024 tokens, its held-out rows); 'cli' = `fastsae train --data realistic --k 4` (128 dims,
          1,024 features, d_sae 2,048, 3,000 x 1,024 tokens, 20,000 held-out rows)
  data:   'realistic' (default) or 'clean' (the clean synthetic job)
  pw:     MatryoshkaBatchTopKSAE's prefix_weights ('width', 'uniform' or a list); None = the class default
  widths: a list, or 'div:a,b' for [d_sae//a, d_sae//b, d_sae]; None = nested_widths(d_sae)
  warm:   topk_warmup; seed: the torch seed of the SAE and of the training run (the data stay seed 0)
Prints one JSON line per point and appends it to experiments/results/matryoshka_weights_sweep.jsonl."""
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
import fastsae
from fastsae.bench import quality as Q
from fastsae.data import realistic, synthetic
from fastsae.metrics import evaluate
from fastsae.training import train

_cache = {}


def job_data(job, data):
    if (job, data) not in _cache:
        if job == "bench":
            cfg = Q.QUALITY
            _cache[job, data] = (cfg.d_in, cfg.d_sae, cfg.steps, cfg.batch_size,
                                 Q.make_data(data, cfg), None, cfg.n_eval)
        else:
            make = realistic if data == "realistic" else synthetic
            synth = make(500_000, 128, 1024, active=4.0, seed=0)
            _cache[job, data] = (128, 2048, 3000, 1024, synth, synth.sample(20_000, seed=1), None)
    return _cache[job, data]


def run(job="bench", data="realistic", pw=None, widths=None, warm=None, seed=0, k=4):
    d_in, d_sae, steps, batch, synth, held, n_eval = job_data(job, data)
    if widths is None:
        widths = fastsae.MatryoshkaBatchTopKSAE.nested_widths(d_sae)
    elif isinstance(widths, str) and widths.startswith("div:"):
        widths = sorted({d_sae // int(a) for a in widths[4:].split(",")} | {d_sae})
    kw = dict(widths=widths)
    if pw is not None:
        kw["prefix_weights"] = pw
    if warm is not None:
        kw["topk_warmup"] = warm
    torch.manual_seed(seed)
    sae = fastsae.MatryoshkaBatchTopKSAE(d_in, d_sae, k, **kw)
    t = time.time()
    train(sae, synth, steps=steps, batch_size=batch, seed=seed, progress=False)
    r = synth.evaluate(sae, n=n_eval) if n_eval else synth.evaluate(sae)
    out = dict(job=job, data=data, pw=pw if pw is not None else "default", widths=sae.widths,
               weights=[round(w, 4) for w in sae.inner_prefix_weights], warm=sae.topk_warmup, seed=seed, k=k,
               rec=round(float(r["recovery"]), 4), fvu=round(float(r["fvu"]), 4), l0=round(float(r["l0"]), 2),
               mcc=round(float(r["mcc"]), 3), dead=round(float(r["dead"]), 3), s=round(time.time() - t))
    rows = held if held is not None else synth.sample(8192, seed=12345)
    with torch.no_grad():  # how well the first prefix alone reconstructs (what the prefix losses are for)
        f = sae.encode(rows.float())
        f[:, sae.widths[0]:] = 0
        out["prefix0_fvu"] = round(float((sae.decode(f) - rows).pow(2).sum() / (rows - rows.mean(0)).pow(2).sum()), 3)
        f = sae.encode(rows.float())
        f[:, d_sae // 16:] = 0
        out["first16th_fvu"] = round(float((sae.decode(f) - rows).pow(2).sum() / (rows - rows.mean(0)).pow(2).sum()), 3)
    if held is not None:  # the CLI's held-out FVU / L0 / dead, as its table prints them
        ev = evaluate(sae, held.float())
        out.update(cli_fvu=round(ev["fvu"], 4), cli_l0=round(ev["l0"], 2), cli_dead=round(ev["dead"], 3))
    print(json.dumps(out), flush=True)
    open(Path(__file__).parent / "results" / "matryoshka_weights_sweep.jsonl", "a").write(json.dumps(out) + "\n")


for spec in sys.argv[1:]:
    run(**eval("dict(%s)" % spec))
