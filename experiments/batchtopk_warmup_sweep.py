"""BatchTopK / Matryoshka TopK warm-up lengths on the quality benchmark's realistic job (issue 18, session 9).

Usage: python experiments/batchtopk_warmup_sweep.py batchtopk 0.3333333,0.8 0,1,2,3,4 1,2
  arch (the benchmark's name: batchtopk | matryoshka), topk_warmup values, seeds (data and training, as
  experiments/quality_seeds.py), multiples of the true L0 (default 1). One JSON line per point on stdout."""
import json, sys, time, torch
torch.set_num_threads(1)
import fastsae
from fastsae.bench import quality as Q
from fastsae.training import train
arch = sys.argv[1]; warms = [float(w) for w in sys.argv[2].split(",")]; seeds = [int(s) for s in sys.argv[3].split(",")]
mults = [float(m) for m in (sys.argv[4].split(",") if len(sys.argv) > 4 else ["1"])]
cls = getattr(fastsae, Q.ARCH_CLASSES[arch])
for seed in seeds:
    cfg = Q.QUALITY.with_(seed=seed)
    data = Q.make_data("realistic", cfg)
    for m in mults:
        k = max(1, round(float(data.true_l0) * m))
        for w in warms:
            torch.manual_seed(seed)
            kw = Q.ARCH_EXTRA_ARGS.get(arch, lambda c: {})(cfg)
            sae = cls(cfg.d_in, cfg.d_sae, k, topk_warmup=w, **kw)
            train(sae, data, steps=cfg.steps, batch_size=cfg.batch_size, seed=seed, progress=False)
            r = data.evaluate(sae, n=cfg.n_eval)
            print(json.dumps(dict(arch=arch, seed=seed, k=k, warm=w, rec=round(float(r["recovery"]), 4), fvu=round(float(r["fvu"]), 4), l0=round(float(r["l0"]), 2))), flush=True)
