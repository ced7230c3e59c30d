"""The training loop: ``fastsae.train(sae, data, steps=...)``.

One step is: next batch -> ``sae.training_forward`` -> ``loss.backward()`` -> Adam step ->
``sae.apply_constraints()`` -> ``sae.observe``. Around it: a dataset-wide input scale (folded into the
weights at the end), ``b_dec`` initialised from the data, learning-rate warm-up and decay, a linear
sparsity-coefficient warm-up, dead-latent tracking for AuxK, metrics as JSON lines, a progress bar,
atomic checkpoints (safetensors + JSON, no pickle) that a resumed run continues from exactly, and a sync-free
per-step check that stops training on non-finite state (:class:`FiniteCheck`).

The pieces are small functions on purpose (data iteration, the gradient step, metric reduction,
checkpoint I/O), so a distributed trainer can wrap them: all-reduce the gradients after
``backward``, reduce the metric sums in :func:`reduce_metrics`, write checkpoints from one rank.

One job a module, each importing only those before it: :mod:`fastsae.training.hyperparameters` (the papers'
defaults, the input scale, the schedules) -> :mod:`fastsae.training.step` (one step, :class:`FiniteCheck`, the
batches) -> :mod:`fastsae.training.checkpoint` (the run's state, checkpoints, restoring) ->
:mod:`fastsae.training.loop` (:func:`train`) -> :mod:`fastsae.training.cli` (``fastsae train``). Every name is
importable from ``fastsae.training``.
"""
from __future__ import annotations

# The package's submodules, one job each; every name stays importable from fastsae.training, where it always was.
from .hyperparameters import (default_hyperparameters, estimate_input_scale, fold_input_scale,  # noqa: F401
                              geometric_median, lr_factor, sparsity_factor)
from .step import (FiniteCheck, _agree, _norms, _project_decoder_grad, _row_width, _scaled_batch,  # noqa: F401
                   _split, paired_rows, train_step)
from .checkpoint import (CHECKPOINT, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, METRICS, OLD_CHECKPOINT,  # noqa: F401
                         TrainResult, _META_KEY, _State, _SUMS, _accumulate, _dead_mask, _fresh_state,
                         _module_counters, _module_tensors, _payload, _restore, _rng_state, _set_rng_state,
                         _truncate_metrics, _update_dead, load_checkpoint, reduce_metrics, save_checkpoint)
from .loop import (CALIBRATION_ROWS, DEAD_AFTER_RUN_FRACTION, DEAD_AFTER_TOKENS, RESAMPLE_PROBE_ROWS,  # noqa: F401
                   TrainingInterrupted, _Interrupt, _progress, _resampler, default_dead_after, train)
from .cli import (CLI_ARCHITECTURES, DEFAULT_JOB, K_ARCHITECTURES, _RUN_FILES, _check_train_args,  # noqa: F401
                  _prepare_out, _resume_hint, add_cli, build_sae, cmd_train)


__all__ = ["train", "TrainResult", "default_hyperparameters", "fold_input_scale", "estimate_input_scale",
           "geometric_median", "CHECKPOINT", "FiniteCheck", "TrainingInterrupted", "paired_rows", "default_dead_after"]
