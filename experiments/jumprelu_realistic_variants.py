"""Training variants on the CLI realistic job (the data, SAE size and fastsae.train call of `fastsae train --data
realistic`), JumpReLU's first (the name), every `fastsae train --arch` by now, and on the clean job with "data".

Usage: python experiments/jumprelu_realistic_variants.py NAME '{"bandwidth": "adaptive"}'
  JSON keys: the SAE class's kwargs, and
  - "arch": any `fastsae train --arch` name; the TopK family takes "k" (default 4), the others "target_l0" (default 4.4);
    "steps" (3000); "width" (2048);
  - "seed": the SAE's and the run's seed (the data stay seed 0); "batch" (1024); "train": extra fastsae.train kwargs;
  - "data": "realistic" (default) or "synthetic" (the clean job of `fastsae train` without --data);
  - "patch": a training change tried without a module option (experiments/results/arch_defaults.md, session 8):
    "row_quadratic" (the target-L0 penalty per row, mean_b (L0_b/T - 1)²), "recon_ste" (with "ste_to_input": true
    and "backend": "eager": the jump's pseudo-derivative reaches the encoder, the L0 term's does not),
    "dup_all" (the resampler also frees the less frequent latent of every live pair whose decoder rows have cosine
    > "dupcos" (0.9), co-firing or not).
Prints one JSON line and appends it to experiments/results/jumprelu_realistic_variants.jsonl."""
import json, sys, time
from pathlib import Path
import torch
import fastsae
from fastsae import reference as ref
from fastsae.data import realistic, synthetic
from fastsae.metrics import evaluate
from fastsae.sae import ARCHITECTURES
from fastsae.training.cli import K_ARCHITECTURES
from fastsae.training import train

torch.set_num_threads(1)
name = sys.argv[1]
kw = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
args = dict(kw)
arch = kw.pop("arch", "jumprelu")
train_kw = kw.pop("train", {})
steps = kw.pop("steps", 3000)
batch = kw.pop("batch", 1024)
seed = kw.pop("seed", 0)
width = kw.pop("width", 2048)
patch = kw.pop("patch", None)
dupcos = kw.pop("dupcos", 0.9)
data = kw.pop("data", "realistic")

if patch == "row_quadratic":
    ref.quadratic_l0 = lambda l0, target: (l0 / target - 1.0).pow(2).mean()
elif patch == "recon_ste":  # the eager forward's L0 without straight-through; f keeps its ste_to_input
    ref.step = lambda pre, th, bw=1e-3, ste=False: ref.StepFunction.apply(pre, th, ref._as_tensor(bw, th), False)
elif patch == "dup_all":
    import fastsae.resample as resample
    co_firing = resample._duplicates

    def duplicates(W_dec, values, indices, fires, min_cos):
        out = co_firing(W_dec, values, indices, fires, min_cos)
        W = torch.nn.functional.normalize(W_dec.float(), dim=1)
        live = fires > 0
        cos = (W @ W.t()).triu(1)
        cos[~live] = 0
        cos[:, ~live] = 0
        i, j = (cos > dupcos).nonzero(as_tuple=True)
        out[torch.where(fires[i] < fires[j], i, j)] = True
        return out

    resample._duplicates = duplicates
elif patch is not None:
    raise SystemExit(f"unknown patch {patch!r}")

torch.manual_seed(seed)
synth = (realistic if data == "realistic" else synthetic)(500_000, 128, 1024, active=4.0, seed=0)
held = synth.sample(20_000, seed=1)
cls = ARCHITECTURES[arch]
if arch == "matryoshka_batchtopk":
    kw.setdefault("widths", cls.nested_widths(width))
if arch in K_ARCHITECTURES:
    sae = cls(128, width, kw.pop("k", 4), **kw)
else:
    sae = cls(128, width, target_l0=kw.pop("target_l0", 4.4), **kw)
t = time.time()
res = train(sae, synth, steps=steps, batch_size=batch, seed=seed, progress=False, **train_kw)
ev = evaluate(sae, held.float())
tr = synth.evaluate(sae)
out = dict(name=name, arch=arch, data=data, seed=seed, batch=batch, steps=steps, s=round(time.time() - t, 1), fvu=round(ev["fvu"], 4), l0=round(ev["l0"], 2),
           dead=round(ev["dead"], 3), rec=round(tr["recovery"], 4), mcc=round(tr["mcc"], 3),
           uniq=round(tr["uniqueness"], 3), prec=round(tr["precision"], 2), recall=round(tr["recall"], 2), args=args)
print(json.dumps(out))
with open(Path(__file__).parent / "results" / "jumprelu_realistic_variants.jsonl", "a") as f:
    f.write(json.dumps(out) + "\n")
