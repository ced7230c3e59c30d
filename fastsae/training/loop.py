"""The training loop :func:`train`, and around it: interrupts (Ctrl-C saves a checkpoint), the progress bar, the
resampler's set-up."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ..data import ActivationSource, as_source, batches
from ..sae import SAE
from .checkpoint import (CHECKPOINT, METRICS, OLD_CHECKPOINT, TrainResult, _accumulate, _dead_mask, _fresh_state,
                         _payload, _restore, _truncate_metrics, _update_dead, reduce_metrics, save_checkpoint)
from .hyperparameters import default_hyperparameters, fold_input_scale, lr_factor, sparsity_factor
from .step import FiniteCheck, _row_width, _scaled_batch, paired_rows, train_step


#: rows of the data that set BatchTopK's inference threshold at the end of training
CALIBRATION_ROWS = 16384


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


#: tokens without firing after which a latent is dead in a long run (sparsify's and Gao et al.'s 10M) ...
DEAD_AFTER_TOKENS = 10_000_000
#: ... and the fraction of a shorter run that counts instead
DEAD_AFTER_RUN_FRACTION = 1 / 6


def default_dead_after(run_tokens: int) -> int:
    """The trainer's dead-latent window for a run of ``run_tokens`` tokens: 10M, or a sixth of a shorter run.

    With 10M alone, AuxK never switched on in a run shorter than 10M tokens (every ``fastsae train`` default job:
    3M tokens) and the logged dead fraction stayed 0. A sixth of the run, on the CLI realistic job (``k`` 4,
    3,000 × 1,024 tokens, ``experiments/jumprelu_realistic_variants.py``, experiments/results/arch_defaults.md,
    session 9): BatchTopK 86.4 / 97.3 / 86.1% → 88.1 / 97.4 / 87.0% of the true features recovered (seeds 0-2),
    Matryoshka 84.2 / 83.7% → 85.7 / 83.8% (seeds 2-3), TopK unchanged (93.9-94.0 / 96.9%); a third of the run
    (1M tokens) changed nothing: resampling revives the dead latents during the first 60% of the run, and AuxK
    matters after that."""
    return max(1, min(DEAD_AFTER_TOKENS, int(run_tokens * DEAD_AFTER_RUN_FRACTION)))


def train(
    sae: SAE,
    data,
    *,
    steps: int,
    batch_size: int = 4096,
    lr: Optional[float] = None,
    betas: Optional[tuple[float, float]] = None,
    lr_warmup_steps: Optional[int] = None,
    lr_decay_steps: Optional[int] = None,
    sparsity_coefficient: Optional[float] = None,
    sparsity_warmup_steps: Optional[int] = None,
    dead_after: Optional[int] = None,
    scale_inputs: bool = True,
    input_scale: Optional[float] = None,
    init_b_dec: bool = True,
    seed: int = 0,
    device: Union[str, torch.device, None] = None,
    progress: bool = True,
    log_every: Optional[int] = None,
    metrics_path: Union[str, Path, None] = None,
    checkpoint_dir: Union[str, Path, None] = None,
    checkpoint_every: Optional[int] = None,
    resume: bool = False,
    callback: Optional[Callable[[dict], None]] = None,
    latent_parallel: Optional[int] = None,
    resample_every: Optional[int] = None,
) -> TrainResult:
    """Train ``sae`` on ``data`` for ``steps`` Adam steps of ``batch_size`` rows.

    Args:
        sae: a freshly built SAE (its weights are taken as living in the scaled input space).
        data: ``[N, d_in]`` tensor/array (shuffled each epoch), a folder (or file) of ``.npy`` /
            ``.safetensors`` shards, any iterable of ``[..., d_in]`` batches, or ``fastsae.data.synthetic(...)``.
        lr, betas: Adam; ``None`` takes :func:`default_hyperparameters` (per architecture, from the papers).
        lr_warmup_steps: linear warm-up (default ``min(1000, steps // 20)``).
        lr_decay_steps: linear decay to 0 at the end (default: the last 20% of the steps).
        sparsity_coefficient: λ for JumpReLU / ReLU / Gated (default: the module's).
        sparsity_warmup_steps: λ rises linearly from 0 over these steps (default ``steps // 10``; ignored by TopK).
        dead_after: tokens without firing after which a latent is dead (default ``sae.dead_after`` when set, else
            :func:`default_dead_after` of the run's tokens: 10M, or a sixth of a shorter run); dead latents feed
            AuxK (the TopK family), JumpReLU's pre-activation loss and the ``dead`` metric.
        scale_inputs: train on ``s·x`` with ``mean ‖s·(x - mean x)‖² = 1`` (estimated from the data, or ``input_scale``),
            then fold ``s`` into the weights so the returned SAE works on raw activations.
        init_b_dec: set ``b_dec`` to the geometric median of a data sample before the first step.
        seed: data order (and nothing else: the SAE's initial weights are whatever was passed in).
        log_every: steps between metric records (default ``min(100, max(1, steps // 50))``); each record has
            step, tokens, loss, mse, fvu, l0, sparsity, aux, dead (fraction), lr, sparsity_coefficient, tokens_per_s.
        metrics_path: JSON-lines file for the records (default ``checkpoint_dir/metrics.jsonl``).
        checkpoint_dir: write ``checkpoint.safetensors`` there every ``checkpoint_every`` steps (default
            ``steps // 10``), at the end and on Ctrl-C, atomically: every parameter and buffer (persistent or
            not), optimizer, step, RNG and data position (tensors as safetensors, the rest as JSON; no pickle).
        resume: continue exactly from ``checkpoint_dir/checkpoint.safetensors`` when it exists (else start
            fresh); a checkpoint of another architecture, shape or dtype is refused, an old ``checkpoint.pt``
            too (never unpickled).
        callback: called with each metrics record (after that step's checkpoint, if any).
        latent_parallel: under torchrun, ranks that split the SAE's latents (default: env
            ``FASTSAE_LATENT_PARALLEL`` or 1); the rest is data parallel (``fastsae/distributed/``).
        resample_every: every this many steps, during the first 60% of the run, latents that fire on none of
            8,192 probe rows and the weaker of co-firing duplicate pairs are re-initialised towards badly
            reconstructed inputs (``fastsae/resample.py``; default ``steps // 10``; 0 turns it off; latent-sharded
            runs do not resample). The records' ``resampled`` counts them.
    Raises:
        FloatingPointError: the input, the loss, a gradient (or its square), a parameter or a buffer became
            non-finite; names the first bad step and the tensor (:class:`FiniteCheck`). It is raised at the next
            logging interval or checkpoint at the latest, and no checkpoint ever holds state from that step on
            (the module passed in does: it was trained in place).
        TrainingInterrupted: Ctrl-C (with ``checkpoint_dir``, in one process): after the step in flight and a
            checkpoint.
        ValueError: no data (not one batch), or a checkpoint that does not fit.
    Returns:
        :class:`TrainResult` with the trained ``sae`` (modified in place), the metric records and the scale.
    """
    if not isinstance(sae, SAE):
        raise TypeError(f"sae must be a fastsae SAE module, got {type(sae).__name__}")
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    t_start = time.perf_counter()
    from ..distributed import TrainingContext

    # Under torchrun: process group, data-parallel reductions, latent shards; a no-op in one process.
    dist_ctx = TrainingContext(sae, device, latent_parallel)
    device, sae = dist_ctx.device, dist_ctx.module
    source = as_source(paired_rows(*data) if isinstance(data, tuple) else data)
    width = _row_width(sae)
    if source.d_in is not None and source.d_in != width:
        raise ValueError(f"data has d_in={source.d_in} but the SAE has d_in={sae.d_in}" if width == sae.d_in else
                         f"data rows have {source.d_in} columns but the transcoder needs d_in + d_out = {sae.d_in} + "
                         f"{sae.d_out} = {width} (input and target side by side; see fastsae.training.paired_rows)")

    hp = default_hyperparameters(sae)
    lr = hp["lr"] if lr is None else float(lr)
    betas = hp["betas"] if betas is None else tuple(betas)
    warmup = min(1000, steps // 20) if lr_warmup_steps is None else int(lr_warmup_steps)
    decay = steps // 5 if lr_decay_steps is None else int(lr_decay_steps)
    controlled = getattr(sae, "controls_sparsity", False)  # target_l0: the module's controller sets λ
    if controlled and sparsity_coefficient is not None:
        raise ValueError("sparsity_coefficient cannot be given when the SAE has target_l0: its controller sets λ "
                         "(set the starting λ on the module instead)")
    lam = None if controlled else (getattr(sae, "sparsity_coefficient", None) if sparsity_coefficient is None
                                   else float(sparsity_coefficient))
    lam_warmup = steps // 10 if sparsity_warmup_steps is None else int(sparsity_warmup_steps)
    if dead_after is None:
        dead_after = getattr(sae, "dead_after", None) or default_dead_after(steps * dist_ctx.tokens(batch_size))
    dead_after = int(dead_after)
    log_every = min(100, max(1, steps // 50)) if log_every is None else max(1, int(log_every))
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    ckpt_every = max(1, steps // 10) if checkpoint_every is None else max(1, int(checkpoint_every))
    if metrics_path is None and ckpt_dir is not None:
        metrics_path = ckpt_dir / METRICS
    metrics_path = Path(metrics_path) if metrics_path is not None else None

    sae.train()
    optimizer = torch.optim.Adam([dict(params=ps, lr=lr * scale, lr_scale=scale) for ps, scale in sae.parameter_groups()],
                                 lr=lr, betas=betas)
    config = dict(sae=sae.config(), steps=steps, batch_size=batch_size, lr=lr, betas=list(betas),
                  lr_warmup_steps=warmup, lr_decay_steps=decay, sparsity_coefficient=lam,
                  sparsity_warmup_steps=lam_warmup, dead_after=dead_after, seed=seed, scale_inputs=scale_inputs)

    ckpt_path = dist_ctx.checkpoint_path(ckpt_dir / CHECKPOINT if ckpt_dir is not None else None)
    old_format = ckpt_dir / OLD_CHECKPOINT if ckpt_dir is not None else None
    resume_from = next((p for p in (ckpt_path, old_format) if resume and p.is_file()), None)
    last_saved = None
    if resume_from is not None:  # an old pickle checkpoint is refused there, never unpickled
        state = _restore(resume_from, sae, optimizer, config, device)
        _truncate_metrics(metrics_path, state.step)
        last_saved = state.step
    else:
        state = dist_ctx.reduce_init(_fresh_state(sae, source, seed, scale_inputs, input_scale, init_b_dec, device),
                                     sae)
        if metrics_path is not None:
            metrics_path.parent.mkdir(parents=True, exist_ok=True)
            metrics_path.write_text("")
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    resampler = _resampler(sae, source, steps, batch_size, resample_every, seed, state.scale, state.target_scale,
                           device, dist_ctx)
    on_step = getattr(sae, "on_train_step", None) or (lambda step, steps: None)  # a latent-sharded module: its shard's
    check = FiniteCheck(sae, state.step)
    interrupt = _Interrupt(ckpt_path is not None and dist_ctx.dp is None)
    bar = _progress(progress and dist_ctx.is_main, steps, state.step)
    it = batches(dist_ctx.shard_source(source, batch_size), batch_size, seed=seed, start_batch=state.step)
    t_log, tokens_log, tokens_start = time.perf_counter(), state.tokens, state.tokens
    try:
        while state.step < steps:
            x_raw = next(it, None)
            if x_raw is None:
                if state.step == 0:
                    raise ValueError(f"data yielded no batch of batch_size={batch_size} rows: it holds fewer rows "
                                     "than one batch (or only empty batches)")
                import warnings

                warnings.warn(f"data ran out after {state.step} of {steps} steps", stacklevel=2)
                break
            x, target = _scaled_batch(x_raw, sae, device, state.scale, state.target_scale)
            step = state.step
            for g in optimizer.param_groups:
                g["lr"] = lr * g["lr_scale"] * lr_factor(step, steps, warmup, decay)
            coef = None if lam is None else lam * sparsity_factor(step, lam_warmup)
            on_step(step, steps)
            try:
                out = train_step(sae, optimizer, x, step=step, dead_mask=_dead_mask(state, dead_after),
                                 sparsity_coefficient=coef, reduce_gradients=dist_ctx.gradient_hook, check=check,
                                 target=target)
            except Exception as e:  # a kernel that choked on NaN state from an earlier step: report that step
                check.raise_if_bad(last_saved, cause=e)
                raise
            dist_ctx.after_step(out)
            _update_dead(state, out, dist_ctx.tokens(x.shape[0]))
            _accumulate(state, out)
            state.step += 1
            state.tokens += dist_ctx.tokens(x.shape[0])
            if resampler is not None and resampler.due(state.step):
                state.resampled += resampler(sae, optimizer, state.step)
            bar.update(1)
            record = None
            if state.step % log_every == 0 or state.step == steps:
                check.raise_if_bad(last_saved)
                now = time.perf_counter()
                dist_ctx.mean_(state.sums)
                record = dict(step=state.step, tokens=state.tokens, **reduce_metrics(state),
                              dead=float(_dead_mask(state, dead_after).float().mean()),
                              lr=lr * lr_factor(step, steps, warmup, decay),
                              sparsity_coefficient=float(sae.sparsity_coefficient) if controlled else coef,
                              tokens_per_s=(state.tokens - tokens_log) / max(now - t_log, 1e-9),
                              resampled=state.resampled)
                t_log, tokens_log = now, state.tokens
                state.metrics.append(record)
                if metrics_path is not None and dist_ctx.is_main:
                    with open(metrics_path, "a") as fh:
                        fh.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record['loss']:.4g}", l0=f"{record['l0']:.1f}", fvu=f"{record['fvu']:.3f}")
            if ckpt_path is not None and (state.step % ckpt_every == 0 or state.step == steps
                                          or interrupt.requested):
                check.raise_if_bad(last_saved)
                dist_ctx.save_checkpoint(save_checkpoint, ckpt_path,
                                         lambda: _payload(state, sae, optimizer, config, seed))
                last_saved = state.step
            if interrupt.requested:
                raise TrainingInterrupted(state.step, ckpt_path)
            if record is not None and callback is not None:
                callback(record)
    finally:
        interrupt.close()
        bar.close()
    check.raise_if_bad(last_saved)

    if state.step > 0:  # BatchTopK's inference threshold (exactly k per row), ReLU's magnitudes
        sae.on_train_end(*_scaled_batch(source.sample(CALIBRATION_ROWS, seed + 1), sae, device, state.scale,
                                        state.target_scale))
    sae.eval()
    if state.scale != 1.0 or state.target_scale is not None:
        fold_input_scale(sae, state.scale, state.target_scale)
    sae = dist_ctx.finish(sae)  # latent shards gathered back into the caller's SAE
    return TrainResult(sae=sae, metrics=state.metrics, input_scale=state.scale, steps=state.step,
                       tokens=state.tokens, seconds=time.perf_counter() - t_start,
                       run_tokens=state.tokens - tokens_start)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`: the step in flight finished and ``checkpoint`` (if any) holds ``step``."""

    def __init__(self, step: int, checkpoint: Optional[Path]):
        super().__init__(f"interrupted after step {step}" + (f"; checkpoint written to {checkpoint}" if checkpoint
                                                              else ""))
        self.step, self.checkpoint = step, checkpoint


class _Interrupt:
    """While training with a checkpoint in one process, the first SIGINT asks the loop to finish its step, write a
    checkpoint and stop (:class:`TrainingInterrupted`); a second one interrupts at once."""

    def __init__(self, enabled: bool):
        import signal
        import threading

        self.requested, self._installed, self._previous = False, False, None
        if enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def close(self) -> None:
        import signal

        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False


def _progress(enabled: bool, steps: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=steps, initial=initial, disable=not enabled, desc="fastsae train", unit="step",
                dynamic_ncols=True)


#: rows of the data the resampler looks at (residuals to resample towards, co-firing duplicates)
RESAMPLE_PROBE_ROWS = 8192


def _resampler(sae: SAE, source: ActivationSource, steps: int, batch_size: int, every: Optional[int], seed: int,
               scale: float, target_scale: Optional[float], device, dist_ctx):
    from .. import resample

    every = resample.default_every(steps) if every is None else int(every)
    if every < 0:
        raise ValueError(f"resample_every must be >= 0, got {every}")
    if every == 0 or not hasattr(sae, "reinit_latents"):  # a latent-sharded module resamples nothing
        return None
    probe, target = _scaled_batch(source.sample(RESAMPLE_PROBE_ROWS, seed + 2), sae, device, scale, target_scale)
    return resample.Resampler(every=every, until=resample.default_until(steps), probe=probe, seed=seed,
                              target=target)
