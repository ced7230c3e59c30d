"""How ``SAE.save`` reaches the file formats without importing a layer above it (ARCHITECTURE.md, registries).

``fastsae.io`` registers its ``save`` here when it is imported, and ``fastsae/__init__`` imports ``fastsae.io``
before the modules, so importing any part of fastsae registers it; ``fastsae.sae`` imports only this module.
"""
from __future__ import annotations

from typing import Callable, Optional

#: ``save(sae, path, format=..., metadata=...)``, registered by fastsae.io
_SAVE: Optional[Callable[..., object]] = None


def register_saver(save: Callable[..., object]) -> None:
    """Make ``save(sae, path, *, format, metadata)`` what ``SAE.save`` calls. Registering again replaces it."""
    global _SAVE
    if not callable(save):
        raise TypeError(f"save must be a callable, got {save!r}")
    _SAVE = save


def saver() -> Callable[..., object]:
    """The registered writer; none registered (fastsae.io never imported) raises RuntimeError saying so."""
    if _SAVE is None:
        raise RuntimeError("no SAE writer is registered: import fastsae (fastsae.io registers its save)")
    return _SAVE
