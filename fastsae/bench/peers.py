"""The libraries people train SAEs with today, run on the same weights and batch as fastsae.

- ``saelens``: SAELens's training SAEs (``JumpReLUTrainingSAE``, ``TopKTrainingSAE``,
  ``BatchTopKTrainingSAE``, ``StandardTrainingSAE`` for ReLU, ``GatedTrainingSAE``), one
  ``training_forward_pass`` + ``backward``. Their parameter names are fastsae's, so weights copy by name.
- ``sparsify``: EleutherAI sparsify's ``SparseCoder`` (TopK only): ``forward`` + ``fvu.backward()``.
  Its Triton decoder needs CUDA; on CPU it falls back to its eager ``embedding_bag`` decoder
  (``SPARSIFY_DISABLE_TRITON=1``, set here before it is imported).

Both are optional (``pip install sae-lens eai-sparsify``); when one cannot be imported the case
reports ``skipped: <reason>``. TopK runs without AuxK in every provider (no dead latents in one step).
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from .harness import Skip

_IMPORT_ERRORS: dict[str, str] = {}


def _import_saelens():
    try:
        from sae_lens.saes import batchtopk_sae, gated_sae, jumprelu_sae, standard_sae, topk_sae
        from sae_lens.saes.sae import TrainStepInput
    except Exception as e:  # ImportError, or a broken dependency of theirs
        raise Skip(f"SAELens not importable ({type(e).__name__}: {str(e)[:120]}); pip install sae-lens") from None
    return dict(
        jumprelu=(jumprelu_sae.JumpReLUTrainingSAE, jumprelu_sae.JumpReLUTrainingSAEConfig),
        topk=(topk_sae.TopKTrainingSAE, topk_sae.TopKTrainingSAEConfig),
        batchtopk=(batchtopk_sae.BatchTopKTrainingSAE, batchtopk_sae.BatchTopKTrainingSAEConfig),
        relu=(standard_sae.StandardTrainingSAE, standard_sae.StandardTrainingSAEConfig),
        gated=(gated_sae.GatedTrainingSAE, gated_sae.GatedTrainingSAEConfig),
    ), TrainStepInput


def _import_sparsify(device: torch.device):
    if device.type != "cuda":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except Exception as e:
        raise Skip(f"sparsify not importable ({type(e).__name__}: {str(e)[:120]}); pip install eai-sparsify") from None
    return SparseCoder, SparseCoderConfig


def available() -> dict[str, str]:
    """``{peer: "yes (version)" | "skipped: reason"}`` for the machine description."""
    out = {}
    for name, dist, probe in (("saelens", "sae-lens", lambda: _import_saelens()),
                              ("sparsify", "eai-sparsify", lambda: _import_sparsify(torch.device("cpu")))):
        try:
            probe()
            from importlib.metadata import version

            out[name] = f"{dist} {version(dist)}"
        except Skip as e:
            out[name] = f"skipped: {e}"
        except Exception as e:
            out[name] = f"skipped: {type(e).__name__}: {e}"
    return out


def _copy_by_name(dst: torch.nn.Module, params: dict) -> None:
    with torch.no_grad():
        for name, p in dst.named_parameters():
            if name not in params or params[name].shape != p.shape:
                raise RuntimeError(f"cannot copy the benchmark weights into {type(dst).__name__}.{name}")
            p.copy_(params[name].to(p.dtype))


def build_step(provider: str, case, data, device: torch.device) -> Callable[[], object]:
    arch = case.name
    x = data.x
    if provider == "saelens":
        classes, TrainStepInput = _import_saelens()
        cls, cfg_cls = classes[arch]
        cfg = dict(d_in=case.d_in, d_sae=case.d_sae, dtype="float32", device=str(device))
        # Same architecture choices as fastsae's module of that name.
        if arch == "jumprelu":
            cfg.update(jumprelu_bandwidth=1e-3, jumprelu_init_threshold=1e-3, l0_coefficient=1e-3,
                       apply_b_dec_to_input=False)
        elif arch in ("topk", "batchtopk"):
            cfg.update(k=case.k, apply_b_dec_to_input=True)
        elif arch == "relu":
            cfg.update(apply_b_dec_to_input=False)
        elif arch == "gated":
            cfg.update(apply_b_dec_to_input=True)
        sae = cls(cfg_cls(**cfg))
        _copy_by_name(sae, data.params)
        coefficients = {}
        for k, v in sae.get_coefficients().items():
            coefficients[k] = float(v.value if hasattr(v, "value") else v)
        params = list(sae.parameters())

        def step():
            for p in params:
                p.grad = None
            out = sae.training_forward_pass(TrainStepInput(
                sae_in=x, coefficients=coefficients, dead_neuron_mask=None, n_training_steps=0,
                is_logging_step=False))
            out.loss.backward()
            return out.sae_out.detach()

        return step
    if provider == "sparsify":
        if arch != "topk":
            raise Skip("sparsify trains TopK SAEs only")
        SparseCoder, SparseCoderConfig = _import_sparsify(device)
        sae = SparseCoder(case.d_in, SparseCoderConfig(num_latents=case.d_sae, k=case.k), device=device,
                          dtype=torch.float32)
        # nn.Linear keeps the encoder as [d_sae, d_in]: W_enc transposed.
        _copy_by_name(sae, {"encoder.weight": data.params["W_enc"].t(), "encoder.bias": data.params["b_enc"],
                            "W_dec": data.params["W_dec"], "b_dec": data.params["b_dec"]})
        params = list(sae.parameters())

        def step():
            for p in params:
                p.grad = None
            out = sae(x)
            out.fvu.backward()
            return out.sae_out.detach()

        return step
    raise ValueError(f"unknown provider {provider!r}")
