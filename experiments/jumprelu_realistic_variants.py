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
    > "dupcos" (0.9), co-firing or not);
    session 10, JumpReLU's AuxK before it was a module option ("k_aux", "aux_coef", "aux_rows", "aux_until" (the
    fraction of the run it is on), "aux_perp" as JSON keys; the module's own `k_aux`/`aux_coefficient`/`aux_rows`
    replace the last one): "auxk_dead" (TopK's AuxK: the top "k_aux" pre-activations of the dead latents fit the
    residual), "auxk_quiet" (each row's top "k_aux" non-firing latents, dense autograd), "auxk_quiet2" (the same,
    selected without autograd on the first "aux_rows" of the batch; with "aux_perp" the residual is projected off
    the span of the row's (up to 16 largest) firing decoder rows, as `fastsae.reference.quiet_auxk_loss` does; it
    normalises by the whole residual's variance, not the projected one's).
  With SAVE_DIR set, the trained SAE's state dict is saved there as NAME.pt.
Also reports recovery by the latents that fire on the held-out rows ("rec_live", "uniq_live"): a decoder row that
never fires reconstructs nothing.
Prints one JSON line and appends it to experiments/results/jumprelu_realistic_variants.jsonl."""
import json, os, sys, time
from pathlib import Path
import torch
import fastsae
from fastsae import reference as ref
from fastsae.data import realistic, synthetic
from fastsae.synthetic import match_metrics
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
elif patch in ("auxk_dead", "auxk_quiet", "auxk_quiet2"):
    # AuxK for JumpReLU: the residual reconstructed by the top "k_aux" (64) pre-activations of the dead latents
    # ("auxk_dead", TopK's AuxK) or of each row's latents that do not fire on it ("auxk_quiet"), weight "aux_coef"
    from fastsae.sae.jumprelu import JumpReLUSAE
    forward = JumpReLUSAE._training_forward
    k_aux, aux_coef = kw.pop("k_aux", 64), kw.pop("aux_coef", 1 / 32)
    aux_rows = kw.pop("aux_rows", 1.0)
    kw["k_aux"] = 0  # the module's own AuxK (session 10's result) off: the patch is the term
    aux_until = kw.pop("aux_until", 1.0)  # the aux term only during this fraction of the run's steps
    aux_perp = kw.pop("aux_perp", False)  # the aux target: the residual off the span of the row's firing rows
    calls = [0]

    def training_forward(self, x, dead_mask, coefficient):
        res = forward(self, x, dead_mask, coefficient)
        calls[0] += 1
        if calls[0] > aux_until * steps:
            return res
        x_in = self._encoder_input(x)
        e = (self._target_of(x) - res.x_hat).detach()
        if patch == "auxk_dead":
            if dead_mask is None or not dead_mask.any():
                return res
            e_hat = ref.auxk_reconstruction(x_in, self.W_enc, self.b_enc, self.W_dec, dead_mask, k_aux)
        elif patch == "auxk_quiet2":  # select without autograd on a row subsample, recompute the kept values
            n = max(1, int(round(x.shape[0] * aux_rows)))
            x_in = x_in[:n].detach()
            with torch.no_grad():
                pre = x_in @ self.W_enc + self.b_enc
                quiet = pre.clamp_min(0).masked_fill_(pre > self.threshold.to(pre.dtype), 0)
                idx = torch.topk(quiet, k_aux, dim=1).indices
                e = e[:n]
                if aux_perp:
                    firing = pre.masked_fill(pre <= self.threshold.to(pre.dtype), float("-inf"))
                    fv, fi = torch.topk(firing, 16, dim=1)
                    D = self.W_dec[fi].detach() * (fv > float("-inf")).unsqueeze(-1).to(pre.dtype)  # [n, 16, d]
                    G = D @ D.transpose(1, 2) + 1e-6 * torch.eye(16, dtype=D.dtype)
                    c = torch.linalg.solve(G, (D @ e.unsqueeze(-1)))
                    e = e - (D.transpose(1, 2) @ c).squeeze(-1)
            values = torch.einsum("bd,dbk->bk", x_in, self.W_enc[:, idx]) + self.b_enc[idx]
            values = values * (values > 0)
            e_hat = ref.sparse_decode(values, idx, self.W_dec, None)
        else:
            pre = x_in @ self.W_enc + self.b_enc
            quiet = torch.nn.functional.relu(pre).masked_fill(pre > self.threshold.detach().to(pre.dtype), 0)
            values, idx = torch.topk(quiet, k_aux, dim=1)
            e_hat = ref.sparse_decode(values, idx, self.W_dec, None)
        aux = ref.auxk_loss(e, e_hat)
        res.loss = res.loss + aux_coef * aux
        res.aux = aux.detach()
        return res

    JumpReLUSAE._training_forward = training_forward
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
with torch.no_grad():  # recovery by the latents that fire: a decoder row that never fires reconstructs nothing
    sae.eval()
    live = torch.zeros(sae.d_sae, dtype=torch.bool)
    for a in range(0, held.shape[0], 4096):
        live |= (sae.encode(held[a:a + 4096].float()) != 0).any(0)
    W_live = sae.W_dec.detach().float()[live]
    live_tr = match_metrics(W_live, synth.features)
out = dict(name=name, arch=arch, data=data, seed=seed, batch=batch, steps=steps, s=round(time.time() - t, 1), fvu=round(ev["fvu"], 4), l0=round(ev["l0"], 2),
           dead=round(ev["dead"], 3), rec=round(tr["recovery"], 4), mcc=round(tr["mcc"], 3),
           uniq=round(tr["uniqueness"], 3), rec_live=round(live_tr["recovery"], 4),
           uniq_live=round(live_tr["uniqueness"], 3), prec=round(tr["precision"], 2), recall=round(tr["recall"], 2), args=args)
print(json.dumps(out))
if os.environ.get("SAVE_DIR"):  # the trained SAE, for diagnostics beyond these metrics
    torch.save(sae.state_dict(), Path(os.environ["SAVE_DIR"]) / f"{name}.pt")
with open(Path(__file__).parent / "results" / "jumprelu_realistic_variants.jsonl", "a") as f:
    f.write(json.dumps(out) + "\n")
