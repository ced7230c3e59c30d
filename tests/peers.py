"""Helpers for the tests and scripts that check fastsae against the real peer libraries (sae-lens, sparsify,
dictionary_learning), which live only in a side virtual environment (never in fastsae's own dependencies):

    python -m venv --system-site-packages /work/venv-peers
    /work/venv-peers/bin/pip install --no-deps sae-lens eai-sparsify dictionary-learning  (+ their small deps)

``python tests/peers.py --write-fixtures`` (in that venv) rewrites the committed dictionary_learning fixtures:
one trainer folder per dictionary class, made by the real trainer classes, with random weights, an ``ae.pt``
written exactly as ``dictionary_learning.training.trainSAE`` writes it, its ``config.json``, and
``expected.safetensors`` (inputs, the class's own ``encode`` and ``forward``).
"""
from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "dictionary_learning"
D_IN, D_SAE, K = 6, 16, 3
#: fixture name -> (trainer module, trainer class, extra trainer kwargs)
DL_CASES = {
    "standard": ("standard", "StandardTrainer", {}),
    "april_update": ("standard", "StandardTrainerAprilUpdate", {}),
    "gated": ("gdm", "GatedSAETrainer", {}),
    "jumprelu": ("jumprelu", "JumpReluTrainer", {}),
    "topk": ("top_k", "TopKTrainer", {"k": K}),
    "batchtopk": ("batch_top_k", "BatchTopKTrainer", {"k": K}),
    "matryoshka": ("matryoshka_batch_top_k", "MatryoshkaBatchTopKTrainer",
                   {"k": K, "group_fractions": [0.25, 0.25, 0.5]}),
}
#: the fastsae architecture each fixture must load as
DL_ARCHITECTURES = {"standard": "relu", "april_update": "relu", "gated": "gated", "jumprelu": "jumprelu",
                    "topk": "topk", "batchtopk": "batchtopk", "matryoshka": "matryoshka_batchtopk"}


def dictionary_learning():
    """The dictionary_learning package without running its ``__init__`` (which imports nnsight, a language-model
    wrapper the dictionaries do not need); ``None`` when it is not installed."""
    if "dictionary_learning" in sys.modules:
        return sys.modules["dictionary_learning"]
    spec = importlib.util.find_spec("dictionary_learning")
    if spec is None or not spec.submodule_search_locations:
        return None
    pkg = types.ModuleType("dictionary_learning")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["dictionary_learning"] = pkg
    try:
        importlib.import_module("dictionary_learning.dictionary")
    except ImportError:
        del sys.modules["dictionary_learning"]
        return None
    return pkg


def make_checkpoint(name: str, folder: Path, seed: int = 0):
    """A trainer folder for ``DL_CASES[name]`` (random weights) and the dictionary itself."""
    dl = dictionary_learning()
    module, cls, extra = DL_CASES[name]
    trainer_cls = getattr(importlib.import_module(f"dictionary_learning.trainers.{module}"), cls)
    torch.manual_seed(seed)
    trainer = trainer_cls(steps=10_000, activation_dim=D_IN, dict_size=D_SAE, layer=0, lm_name="synthetic",
                          device="cpu", **extra)
    ae = trainer.ae
    with torch.no_grad():
        for pname, p in ae.named_parameters():
            scale = 0.1 if pname in ("r_mag", "threshold") else 0.5
            p.copy_(torch.randn_like(p) * scale)
            if pname == "threshold":
                p.abs_()
        if hasattr(ae, "threshold") and ae.threshold.dim() == 0:
            ae.threshold.fill_(0.3)  # a calibrated BatchTopK threshold
    folder.mkdir(parents=True, exist_ok=True)
    # exactly what dictionary_learning.training.trainSAE writes
    torch.save({k: v.cpu() for k, v in ae.state_dict().items()}, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": trainer.config, "buffer": {"d_submodule": D_IN}},
                                                   indent=4))
    assert dl is not None
    return ae


def randomized(sae):
    """``sae`` with random weights (thresholds small and positive), a BatchTopK threshold calibrated, in eval mode."""
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn_like(p) * (0.05 if name in ("threshold", "r_mag") else 0.4))
            if name == "threshold":
                p.abs_()
    if hasattr(sae, "calibrated"):
        sae.train()
        sae.training_forward(torch.randn(64, sae.d_in), torch.randn(64, getattr(sae, "d_out", sae.d_in)))
    return sae.eval()


def write_fixtures() -> None:
    from safetensors.torch import save_file

    for i, name in enumerate(DL_CASES):
        folder = FIXTURES / f"trainer_{name}"
        ae = make_checkpoint(name, folder, seed=i)
        x = torch.randn(9, D_IN, generator=torch.Generator().manual_seed(100 + i)) * 1.5
        with torch.no_grad():
            save_file({"x": x, "f": ae.encode(x).contiguous(), "x_hat": ae(x).contiguous()},
                      str(folder / "expected.safetensors"))
        print(f"wrote {folder}")


if __name__ == "__main__":
    if "--write-fixtures" not in sys.argv:
        raise SystemExit(__doc__)
    if dictionary_learning() is None:
        raise SystemExit("dictionary_learning is not importable here (run this in the peers venv)")
    write_fixtures()
