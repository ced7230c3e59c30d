"""JumpReLU variants on the CLI realistic job (the data, SAE size and fastsae.train call of `fastsae train --data realistic`).

Usage: python experiments/jumprelu_realistic_variants.py NAME '{"bandwidth": "adaptive"}'  (JumpReLUSAE kwargs; "arch": "topk" with "k" for
the TopK yardstick). Prints one JSON line and appends it to ./jumprelu_realistic_variants.jsonl."""
import json, sys, time
import torch
import fastsae
from fastsae.data import realistic
from fastsae.metrics import evaluate
from fastsae.training import train

torch.set_num_threads(1)
name = sys.argv[1]
kw = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
arch = kw.pop("arch", "jumprelu")
train_kw = kw.pop("train", {})
steps = kw.pop("steps", 3000)
torch.manual_seed(0)
synth = realistic(500_000, 128, 1024, active=4.0, seed=0)
held = synth.sample(20_000, seed=1)
if arch == "jumprelu":
    sae = fastsae.JumpReLUSAE(128, 2048, target_l0=kw.pop("target_l0", 4.4), **kw)
else:
    sae = fastsae.TopKSAE(128, 2048, k=kw.pop("k", 4), **kw)
t = time.time()
res = train(sae, synth, steps=steps, batch_size=1024, seed=0, progress=False, **train_kw)
ev = evaluate(sae, held.float())
tr = synth.evaluate(sae)
out = dict(name=name, s=round(time.time() - t, 1), fvu=round(ev["fvu"], 4), l0=round(ev["l0"], 2), dead=round(ev["dead"], 3),
           rec=round(tr["recovery"], 4), mcc=round(tr["mcc"], 3), uniq=round(tr["uniqueness"], 3),
           prec=round(tr["precision"], 2), recall=round(tr["recall"], 2))
print(json.dumps(out))
open("jumprelu_realistic_variants.jsonl", "a").write(json.dumps(out) + "\n")
