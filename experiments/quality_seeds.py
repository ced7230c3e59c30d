"""The quality benchmark's realistic sweep (0.5 / 1 / 2x the true L0) over several seeds, fastsae only (issue 18).

Usage: python experiments/quality_seeds.py jumprelu,topk 1,2,3,4 experiments/results/quality_seeds.jsonl
Each seed is the quality benchmark's job (fastsae.bench.quality.QUALITY: 64 dims, 256 features, d_sae 512, 1,000 x
1,024 tokens) with ``seed`` for both the data and the training run (seed 0 is `python -m benchmarks quality`'s).
Appends one JSON line per point: seed, arch, multiple of the true L0, the knob's value, recovery, L0, FVU."""
import inspect, json, sys, torch
torch.set_num_threads(1)
from fastsae.bench import quality as Q
import fastsae
archs = sys.argv[1].split(",")
seeds = [int(s) for s in sys.argv[2].split(",")]
out = open(sys.argv[3], "a")
for seed in seeds:
    cfg = Q.QUALITY.with_(seed=seed)
    data = Q.make_data("realistic", cfg)
    true_l0 = float(data.true_l0)
    for arch in archs:
        cls = getattr(fastsae, Q.ARCH_CLASSES[arch])  # the benchmark's names: "matryoshka", not the CLI's
        knob = Q._knob(cls)
        for m in (0.5, 1.0, 2.0):
            value = Q._target(knob, true_l0 * m, 0.0, m)  # every architecture here has a k or target_l0 knob
            r = Q.fastsae_point(cls, knob, value, data, cfg, arch)
            row = dict(seed=seed, arch=arch, mult=m, value=value, rec=round(float(r["recovery"]), 4),
                       l0=round(float(r["l0"]), 2), fvu=round(float(r["fvu"]), 4))
            if issubclass(cls, fastsae.BatchTopKSAE):  # the TopK warm-up default in force (changed in session 9)
                warm = inspect.signature(fastsae.BatchTopKSAE.__init__).parameters["topk_warmup"].default
                row["topk_warmup"] = round(warm, 4)
            if issubclass(cls, fastsae.JumpReLUSAE):  # its AuxK default in force (added in session 10)
                row["k_aux"] = fastsae.JumpReLUSAE(cfg.d_in, cfg.d_sae).k_aux
            print(json.dumps(row), flush=True); out.write(json.dumps(row) + "\n"); out.flush()
