"""The model side of harvesting: loading a ``transformers`` model (imported only here, inside the functions),
finding the hooked submodule, and :class:`Capture`, which runs the model on a :class:`Batch` and returns the
hooked module's output (stopping the forward pass there)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .text import Batch

# ---------------------------------------------------------------------------------------------
# Models and hooks
# ---------------------------------------------------------------------------------------------
def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise ImportError("fastsae.activations needs transformers: pip install 'fastsae[hf]'") from e


def load_model(model: Union[str, os.PathLike], *, device=None, dtype: Optional[torch.dtype] = None,
               allow_download: bool = False):
    """``(model, tokenizer)`` from a local folder or a Hugging Face model name, in eval mode.

    A causal LM is loaded with its LM head (so evaluation can measure the loss); anything else with
    ``AutoModel``. Nothing is downloaded unless ``allow_download`` (a name must already be in the cache).
    """
    _require_transformers()
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a path or a model name, got {type(model).__name__}")
    s = os.fspath(model)
    path = Path(s).expanduser()
    looks_like_path = s.startswith((".", "/", "~")) or os.sep in s and s.count("/") != 1 or path.exists()
    if looks_like_path and not path.exists():
        raise FileNotFoundError(f"model: {s} does not exist")
    if path.exists() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"model: {s} has no config.json (not a transformers model folder)")
    kw = dict(local_files_only=not allow_download)
    try:
        config = AutoConfig.from_pretrained(str(path) if path.exists() else s, **kw)
    except OSError as e:
        hint = "" if allow_download else " (nothing is downloaded unless allow_download / --allow-download)"
        raise FileNotFoundError(f"model: cannot load {s!r}{hint}: {e}") from e
    src = str(path) if path.exists() else s
    archs = config.architectures or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    cls = AutoModelForCausalLM if causal else AutoModel
    m = cls.from_pretrained(src, dtype=dtype, **kw) if dtype is not None else cls.from_pretrained(src, **kw)
    tok = AutoTokenizer.from_pretrained(src, **kw)
    m.eval()
    if device is not None:
        m.to(device)
    return m, tok


def resolve_hook(model: nn.Module, hook: str) -> nn.Module:
    """The submodule named ``hook``; the base model's names also work (``h.3`` for ``transformer.h.3``)."""
    if not isinstance(hook, str) or not hook:
        raise ValueError(f"hook must be a non-empty submodule name, got {hook!r}")
    try:
        return model.get_submodule(hook)
    except AttributeError:
        pass
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if isinstance(base, nn.Module):
        try:
            return base.get_submodule(hook)
        except AttributeError:
            pass
    # Suggest the layer containers (names ending in a number), which are what people hook.
    names = [n for n, _ in model.named_modules() if n and n.split(".")[-1].isdigit() and n.count(".") <= 3]
    sample = ", ".join(names[:4] + (["...", names[-1]] if len(names) > 4 else []))
    raise ValueError(f"hook {hook!r} is not a submodule of {type(model).__name__}; layers include: {sample}")


def hooked_tensor(out, hook: str) -> Tensor:
    """The tensor a hooked module returns: the output itself or the first element of a tuple / ModelOutput."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    if hasattr(out, "to_tuple"):
        return out.to_tuple()[0]
    raise TypeError(f"hook {hook!r}: the module returns {type(out).__name__}, not a tensor or a tuple of tensors")


def replace_output(out, new: Tensor):
    """``out`` with its hooked tensor replaced by ``new`` (same container type)."""
    if isinstance(out, Tensor):
        return new
    if isinstance(out, tuple):
        return (new,) + tuple(out[1:])
    if isinstance(out, list):
        return [new] + list(out[1:])
    if hasattr(out, "to_tuple"):
        first = next(iter(out.keys()))
        out[first] = new
        return out
    raise TypeError(f"cannot replace a module output of type {type(out).__name__}")


class _StopForward(Exception):
    """Raised from the forward hook once the activation is captured: the layers after it never run."""


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class Capture:
    """Runs ``model`` on batches and returns the hooked module's output ``[B, L, d]``.

    With ``input_hook`` (transcoder pairs): the *input* of the module ``input_hook`` and the output of ``hook``
    (often the same module, e.g. an MLP), side by side as ``[B, L, d_in + d_out]``; ``pair_dims`` is then
    ``(d_in, d_out)``. ``stop_early`` aborts the forward pass once what is needed was captured, so the layers
    above it (and the LM head) cost nothing.
    """

    def __init__(self, model: nn.Module, hook: str, *, stop_early: bool = True, input_hook: Optional[str] = None):
        self.model, self.hook, self.stop_early, self.input_hook = model, hook, stop_early, input_hook
        self.module = resolve_hook(model, hook)
        self.input_module = resolve_hook(model, input_hook) if input_hook is not None else None
        self.device = model_device(model)
        self.pair_dims: Optional[tuple[int, int]] = None

    def __call__(self, batch: Batch) -> Tensor:
        captured, inputs = [], []

        def fn(module, args, out):
            captured.append(hooked_tensor(out, self.hook))
            if self.stop_early and (self.input_module is None or inputs):
                raise _StopForward

        def fn_in(module, args):
            if not args or not isinstance(args[0], Tensor):
                raise TypeError(f"input hook {self.input_hook!r}: the module's first argument is not a tensor")
            inputs.append(args[0])

        handles = [self.module.register_forward_hook(fn)]
        if self.input_module is not None:
            handles.append(self.input_module.register_forward_pre_hook(fn_in))
        try:
            with torch.inference_mode():
                self.model(input_ids=batch.input_ids.to(self.device),
                           attention_mask=batch.attention_mask.to(self.device))
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        if not captured or (self.input_module is not None and not inputs):
            raise RuntimeError(f"hook {self.hook!r}: the module never ran in the forward pass")
        B, L = batch.input_ids.shape
        parts = [(self.hook, captured[0])] if self.input_module is None else [(self.input_hook, inputs[0]),
                                                                            (self.hook, captured[0])]
        for name, x in parts:
            if x.dim() != 3 or x.shape[:2] != (B, L):
                raise ValueError(f"hook {name!r} has shape {tuple(x.shape)}; expected [batch={B}, "
                                 f"length={L}, d] (hook a layer, e.g. encoder.layer.3 or model.layers.12)")
        if self.input_module is None:
            return captured[0]
        self.pair_dims = (inputs[0].shape[-1], captured[0].shape[-1])
        return torch.cat([inputs[0], captured[0].to(inputs[0].dtype)], dim=-1)

    def data(self, batch: Batch) -> Tensor:
        """The kept positions only: ``[n_kept, d]`` (row-major over batch then position)."""
        x = self(batch)
        return x[batch.keep.to(x.device)]



def _prepare(model, tokenizer, device):
    if isinstance(model, (str, os.PathLike)):
        m, tok = load_model(model, device=device)
        return m, (tokenizer or tok)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a path, a model name or an nn.Module, got {type(model).__name__}")
    if tokenizer is None:
        raise ValueError("tokenizer is required when model is an nn.Module")
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer


def _check_positive(name, v, allow_none=False):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return v

