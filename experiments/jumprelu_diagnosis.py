"""Why JumpReLU trained badly, instrumented: one run per setting, every quantity the diagnosis needs.

For each setting it trains a JumpReLU SAE with ``fastsae.train`` on the built-in synthetic job (1,024 true
features in 128 dims, ~4 active per sample, d_sae 2,048, 3,000 steps of 1,024 — the token budget of the TopK
default job) and records every ``--every`` steps, on a fixed probe batch of 1,024 fresh samples (scaled as
training sees them), with the reference math:

- reconstruction MSE / FVU, L0, the fraction of latents dead (no firing on the probe) and dense (firing on
  more than 20% of the probe rows);
- the kernel window: the fraction of (row, latent) entries with ``|pre - θ| < ε/2`` and the median number of
  hits per latent per batch (the only entries that give θ a gradient);
- the two θ-gradient terms of DESIGN.md §1 summed over the probe batch, per latent: the reconstruction term
  ``-(θ/ε) Σ_b K(u) ∂MSE/∂f`` (pushes θ down where firing would help) and the sparsity term
  ``-(λ/B)(1/ε) Σ_b K(u)`` (pushes θ up); their medians over latents with any hit and the fraction of
  latents with no hit at all;
- the spread of pre-activations (median over latents of std) next to θ and ε, the decoder row norms;
- θ trajectories of 12 fixed latents;
- which true feature each decoder row tracks: recovery (features matched at cos > 0.9), the number of
  latents whose best match is above 0.9, and how many of those changed feature since the last record.

Settings (SETTINGS): ``old`` = the library before the fix (unit-norm decoder rows with W_enc = W_decᵀ,
θ₀ = ε = 0.001, λ = 0.02, no b_dec subtraction, one learning rate, E‖s·x‖² = 1, no resampling); ``fixed`` = the
defaults now (on the realistic data with ``target_l0`` = the true L0); ``fixed-no-resample`` and
``fixed-unit-init`` take one fix back out each. Writes ``experiments/results/jumprelu_diagnosis.json`` (all records) and
``experiments/results/jumprelu_diagnosis.png``; the prose is ``experiments/results/jumprelu_diagnosis.md``.

Run (2 CPU cores; each setting takes 2-5 minutes):
    python experiments/jumprelu_diagnosis.py                       # the four settings on the clean job
    python experiments/jumprelu_diagnosis.py --data realistic
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import fastsae  # noqa: E402
from fastsae import reference as ref  # noqa: E402
from fastsae.data import realistic, synthetic  # noqa: E402
from fastsae.training import train  # noqa: E402

#: constructor arguments and train() arguments per setting; "init" is applied to the fresh module
SETTINGS = {
    # the library before issue 18: unit-norm decoder rows, W_enc = W_decᵀ, θ₀ = ε = 0.001, no b_dec subtraction,
    # one lr for every parameter, E‖s·x‖² = 1, no resampling
    "old": dict(sae=dict(sparsity_coefficient=0.02, threshold_init=1e-3, bandwidth=1e-3, decoder_init_norm=1.0,
                         apply_b_dec_to_input=False, threshold_lr_scale=1.0, init_l0=None),
                train=dict(resample_every=0), uncentred=True),
    "fixed": dict(sae={}, train={}),  # the defaults now (with target_l0 = the true L0 on the realistic data)
    "fixed-no-resample": dict(sae={}, train=dict(resample_every=0)),
    "fixed-unit-init": dict(sae=dict(decoder_init_norm=1.0), train={}),
}


def build(setting: str, d_in: int, d_sae: int, target_l0):
    spec = SETTINGS[setting]
    kw = dict(spec["sae"])
    if setting.startswith("fixed") and target_l0 is not None:
        kw.setdefault("target_l0", target_l0)
    return fastsae.JumpReLUSAE(d_in, d_sae, **kw), dict(spec["train"])


@torch.no_grad()
def probe_stats(sae, xs: torch.Tensor, lam: float, data, last_match) -> dict:
    """Every diagnostic on the probe batch ``xs`` (already in training scale)."""
    with torch.enable_grad():
        pre = (ref.encoder_input(xs, sae.b_dec, sae.apply_b_dec_to_input) @ sae.W_enc + sae.b_enc).detach()
        f = (pre * (pre > sae.threshold)).requires_grad_(True)
        mse = ref.mse(f @ sae.W_dec + sae.b_dec, xs)
        (g_f,) = torch.autograd.grad(mse, f)  # ∂MSE/∂f, [B, d_sae]
    theta, eps = sae.threshold.to(pre.dtype), sae.bandwidth.to(pre.dtype)
    K = ref.rectangle((pre - theta) / eps)
    B = xs.shape[0]
    recon_term = -(theta / eps) * (K * g_f).sum(0)  # [d_sae]
    sparsity_term = -(lam / B) * (1.0 / eps) * K.sum(0)
    hits = K.sum(0)
    has_hit = hits > 0
    fires = (pre > theta).float().mean(0)
    cos = torch.nn.functional.normalize(data.features, dim=1) @ torch.nn.functional.normalize(sae.W_dec.float(),
                                                                                             dim=1).t()
    best_cos, best_feat = cos.max(0)  # per latent
    tracking = best_cos > 0.9
    switched = int(((best_feat != last_match) & tracking).sum()) if last_match is not None else 0
    med = lambda t: float(t.median()) if t.numel() else float("nan")  # noqa: E731
    return dict(
        l0=float((pre > theta).float().sum(1).mean()),
        dead=float((fires == 0).float().mean()), dense=float((fires > 0.2).float().mean()),
        window_fraction=float(K.mean()), hits_median=med(hits), no_hit_fraction=float((~has_hit).float().mean()),
        grad_recon_median=med(recon_term[has_hit]), grad_sparsity_median=med(sparsity_term[has_hit]),
        grad_ratio_median=med((recon_term[has_hit] / sparsity_term[has_hit]).abs()),
        pre_std_median=float(pre.std(0).median()), theta_median=float(theta.median()),
        theta_q90=float(theta.quantile(0.9)), eps_median=float(eps.median()),
        dec_norm_median=float(sae.W_dec.norm(dim=1).median()),
        recovery=float((cos.max(1).values > 0.9).float().mean()), latents_tracking=int(tracking.sum()),
        tracking_switched=switched,
    ), best_feat


def run(setting: str, args) -> dict:
    torch.manual_seed(args.seed)
    make = realistic if args.data == "realistic" else synthetic
    data = make(args.n_samples, args.d_in, args.n_features, active=args.active, seed=args.data_seed)
    # the clean job trains with λ (the CLI's default); the realistic data asks for its true L0
    sae, train_kw = build(setting, args.d_in, args.d_sae, data.true_l0 if args.data == "realistic" else None)
    probe_raw = data.sample(1024, seed=99)
    watch = torch.linspace(0, args.d_sae - 1, 12).long()
    records, state = [], dict(last=None, xs=None)

    def callback(rec):
        if rec["step"] % args.every and rec["step"] != args.steps:
            return
        if state["xs"] is None:  # the scale the loop settled on (E‖s·x‖² = 1), from its first record
            state["xs"] = probe_raw * (res_scale[0] if res_scale else 1.0)
        lam = float(rec["sparsity_coefficient"] or 0.0)
        stats, state["last"] = probe_stats(sae, state["xs"].to(sae.dtype), lam, data, state["last"])
        stats.update(step=rec["step"], train_fvu=rec["fvu"], train_l0=rec["l0"], lam=lam,
                     theta_watch=sae.threshold.detach()[watch].tolist())
        records.append(stats)
        print(f"[{setting}] step {rec['step']:5d}  fvu {rec['fvu']:.3f}  l0 {stats['l0']:7.1f}  "
              f"rec {stats['recovery']:.3f}  window {stats['window_fraction']:.2e}  hits {stats['hits_median']:.1f}  "
              f"no-hit {stats['no_hit_fraction']:.2f}  |recon/sparsity| {stats['grad_ratio_median']:.2f}  "
              f"θ {stats['theta_median']:.3f}  pre-std {stats['pre_std_median']:.3f}  λ {lam:.3g}", flush=True)

    from fastsae.training import estimate_input_scale

    sample = data.x[:16384].double()
    if SETTINGS[setting].get("uncentred"):  # the old convention, E‖s·x‖² = 1
        train_kw["input_scale"] = float(1 / sample.pow(2).sum(1).mean().sqrt())
    res_scale = [train_kw.get("input_scale", estimate_input_scale(sample))]
    t0 = time.time()
    train(sae, data, steps=args.steps, batch_size=args.batch_size, progress=False, callback=callback,
          log_every=args.every, **train_kw)
    metrics = data.evaluate(sae)
    print(f"[{setting}] final {json.dumps({k: round(v, 3) for k, v in metrics.items()})}  ({time.time() - t0:.0f} s)",
          flush=True)
    return dict(setting=setting, records=records, final=metrics, config=sae.config())


def plot(results: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("l0", "L0 (probe)", "log"), ("recovery", "features recovered (cos > 0.9)", "linear"),
            ("no_hit_fraction", "latents with no kernel hit in a batch of 1,024", "linear"),
            ("grad_ratio_median", "|reconstruction / sparsity| θ-gradient (median)", "log"),
            ("theta_median", "median θ", "linear"), ("dec_norm_median", "median decoder row norm", "linear")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax, (key, title, scale) in zip(axes.flat, keys):
        for r in results:
            steps = [x["step"] for x in r["records"]]
            vals = [max(x[key], 1e-3) if scale == "log" else x[key] for x in r["records"]]
            ax.plot(steps, vals, label=r["setting"])
        ax.set_title(title, fontsize=10)
        ax.set_yscale(scale)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=["old", "fixed", "fixed-no-resample", "fixed-unit-init"],
                   choices=sorted(SETTINGS))
    p.add_argument("--data", default="clean", choices=["clean", "realistic"])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--d-in", type=int, default=128)
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--n-features", type=int, default=1024)
    p.add_argument("--active", type=float, default=4.0)
    p.add_argument("--n-samples", type=int, default=500_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="jumprelu_diagnosis")
    p.add_argument("--from-json", default=None, help="only redraw the plot from a results JSON")
    args = p.parse_args(argv)
    if args.from_json:
        path = Path(args.from_json)
        plot(json.loads(path.read_text())["results"], path.with_suffix(".png"))
        return 0
    torch.set_num_threads(args.threads)
    results = [run(s, args) for s in args.settings]
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    suffix = "" if args.data == "clean" else f"_{args.data}"
    (out / f"{args.name}{suffix}.json").write_text(json.dumps(dict(args=vars(args), results=results), indent=1))
    plot(results, out / f"{args.name}{suffix}.png")
    print(f"wrote {out / (args.name + suffix)}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
