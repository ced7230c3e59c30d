"""Train one SAE with SAELens's own trainer (``SAETrainer.fit``) on given activations; the quality benchmark's
peer column. Run as a script by :mod:`fastsae.bench.quality`, usually under another interpreter (a side venv with
sae-lens), so SAELens and its dependencies never load into the fastsae process. Imports torch, safetensors and
sae_lens only — not fastsae.

    python saelens_worker.py IN.safetensors JOBS.json

IN holds ``x_train [N, d_in]`` and ``x_eval [M, d_in]`` (float32); JOBS.json is a list of jobs
``{"arch": "jumprelu"|"topk"|"batchtopk"|"relu"|"gated", "d_sae", "steps", "batch_size", "seed", "k" | "target_l0",
"out": OUT.safetensors}``
(one process for all of them: importing sae_lens takes longer than a small training run). Everything else is
SAELens's default: its ``SAETrainerConfig`` (Adam lr 3e-4, β = (0.9, 0.999), constant schedule, no warm-up, no
activation normalisation) and its training-SAE config. JumpReLU with ``target_l0`` uses its quadratic target-L0 mode
(Gemma Scope 2) so that it is asked for the same L0 as fastsae's ``target_l0``, without it SAELens's default (the
step loss); TopK / BatchTopK get ``k``; ReLU (SAELens's "standard") and Gated their defaults.
The training rows are served in a fresh random order each epoch (seeded), ``steps × batch_size`` rows in all.
Each OUT receives ``W_dec [d_sae, d_in]``, ``fired [M, d_sae]`` (uint8) and ``x_hat [M, d_in]`` on ``x_eval`` in
inference mode; each finished job prints one stdout line ``RESULT {json}`` (version, settings, seconds).
"""
from __future__ import annotations

import json
import sys
import time


def _batches(x, batch_size: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(x.shape[0], generator=gen)
        for a in range(0, x.shape[0] - batch_size + 1, batch_size):
            yield x[order[a:a + batch_size]]


def _build(spec: dict, d_in: int):
    arch, d_sae = spec["arch"], spec["d_sae"]
    if arch == "jumprelu":
        from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

        if spec.get("target_l0") is None:  # SAELens's own default: the paper's step loss at its l0_coefficient
            cfg = JumpReLUTrainingSAEConfig(d_in=d_in, d_sae=d_sae)
        else:
            cfg = JumpReLUTrainingSAEConfig(d_in=d_in, d_sae=d_sae, jumprelu_sparsity_loss_mode="quadratic",
                                            target_l0=float(spec["target_l0"]))
        return JumpReLUTrainingSAE(cfg), dict(sparsity_loss=cfg.jumprelu_sparsity_loss_mode,
                                               target_l0=getattr(cfg, "target_l0", None),
                                               l0_coefficient=cfg.l0_coefficient, bandwidth=cfg.jumprelu_bandwidth,
                                               init_threshold=cfg.jumprelu_init_threshold)
    if arch in ("topk", "batchtopk"):
        from sae_lens.saes import batchtopk_sae, topk_sae

        cls, cfg_cls = ((topk_sae.TopKTrainingSAE, topk_sae.TopKTrainingSAEConfig) if arch == "topk" else
                        (batchtopk_sae.BatchTopKTrainingSAE, batchtopk_sae.BatchTopKTrainingSAEConfig))
        cfg = cfg_cls(d_in=d_in, d_sae=d_sae, k=int(spec["k"]))
        return cls(cfg), dict(k=cfg.k, aux_loss_coefficient=cfg.aux_loss_coefficient)
    if arch in ("relu", "gated"):
        from sae_lens.saes import gated_sae, standard_sae

        cls, cfg_cls = ((standard_sae.StandardTrainingSAE, standard_sae.StandardTrainingSAEConfig) if arch == "relu"
                        else (gated_sae.GatedTrainingSAE, gated_sae.GatedTrainingSAEConfig))
        cfg = cfg_cls(d_in=d_in, d_sae=d_sae)
        return cls(cfg), dict(l1_coefficient=cfg.l1_coefficient)
    raise ValueError(f"arch must be one of jumprelu, topk, batchtopk, relu, gated; got {arch!r}")


def _run(spec: dict, x_train, x_eval) -> dict:
    import torch
    from importlib.metadata import version
    from safetensors.torch import save_file
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(spec["seed"])
    sae, settings = _build(spec, x_train.shape[1])
    steps, batch = int(spec["steps"]), int(spec["batch_size"])
    lr = SAETrainerConfig.lr  # the class default; lr_end must be given explicitly (train_toy_sae does the same)
    trainer_cfg = SAETrainerConfig(total_training_samples=steps * batch, train_batch_size_samples=batch, lr=lr,
                                   lr_end=lr, logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=_batches(x_train, batch, spec["seed"]))
    t0 = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t0
    sae.eval()
    fired, x_hat = [], []
    with torch.no_grad():
        for a in range(0, x_eval.shape[0], 4096):
            f = sae.encode(x_eval[a:a + 4096])
            f = f.to_dense() if f.is_sparse else f
            fired.append(f != 0)
            x_hat.append(sae.decode(f).float())
    save_file({"W_dec": sae.W_dec.detach().float().contiguous(), "fired": torch.cat(fired).to(torch.uint8),
               "x_hat": torch.cat(x_hat).contiguous()}, spec["out"])
    return dict(library=f"sae-lens {version('sae-lens')}", trainer="SAETrainer.fit", lr=trainer_cfg.lr,
                betas=[trainer_cfg.adam_beta1, trainer_cfg.adam_beta2], lr_scheduler=trainer_cfg.lr_scheduler_name,
                seconds=seconds, **settings)


def main(argv) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    import torch
    from safetensors.torch import load_file

    with open(argv[1]) as fh:
        jobs = json.load(fh)
    torch.set_num_threads(int(jobs[0].get("threads", 1)) if jobs else 1)
    tensors = load_file(argv[0])
    x_train, x_eval = tensors["x_train"].float(), tensors["x_eval"].float()
    for spec in jobs:
        print("RESULT " + json.dumps(dict(_run(spec, x_train, x_eval), out=spec["out"])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
