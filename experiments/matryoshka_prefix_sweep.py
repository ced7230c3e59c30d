"""Matryoshka on the quality benchmark's realistic data at the true L0 (k=4): one point per variant (prefix-loss
scale, widths, topk_warmup). Usage: PYTHONPATH=$PWD python experiments/matryoshka_prefix_sweep.py "scale=0.5" "widths=[256,512]"
The prefix-loss scale is applied by wrapping reference.matryoshka_loss, on top of the class's prefix_weights (default
"width" since issue 18; the table in arch_defaults.md was measured before, with the unweighted sum).
experiments/matryoshka_weights_sweep.py sweeps prefix_weights itself."""
import sys, torch, time
torch.set_num_threads(1)
import fastsae, fastsae.reference as ref
import fastsae.sae.topk as T
from fastsae.bench import quality as Q
cfg = Q.QUALITY
data = Q.make_data("realistic", cfg)
l0 = 4
orig = ref.matryoshka_loss
def run(name, widths=None, scale=1.0, warm=None):
    T.ref.matryoshka_loss = lambda p, t, w=None: scale * orig(p, t, w)
    torch.manual_seed(0)
    kw = dict(widths=widths or fastsae.MatryoshkaBatchTopKSAE.nested_widths(cfg.d_sae))
    if warm is not None: kw["topk_warmup"] = warm
    sae = fastsae.MatryoshkaBatchTopKSAE(cfg.d_in, cfg.d_sae, l0, **kw)
    from fastsae.training import train
    t=time.time(); train(sae, data, steps=cfg.steps, batch_size=cfg.batch_size, seed=0, progress=False)
    r = data.evaluate(sae, n=cfg.n_eval)
    print(name, {k: round(float(r[k]),3) for k in ("recovery","fvu","l0","mcc","dead")}, round(time.time()-t), flush=True)
for spec in sys.argv[1:]:
    run(spec, **eval("dict(%s)" % spec))
