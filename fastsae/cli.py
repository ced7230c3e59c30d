"""The ``fastsae`` command (also ``python -m fastsae``).

Each subcommand lives next to the code it drives and is plugged in with one line in ``SUBCOMMANDS``:
``"name": "module:function"``, where ``function(subparsers)`` adds its parser and sets ``func``
(``func(args) -> int`` is the exit status). Modules are imported only when the parser is built, so
keep heavy imports (transformers, matplotlib) inside the ``func``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "info": "fastsae.cli:add_info",
    "train": "fastsae.train:add_cli",
    "harvest": "fastsae.activations:add_cli",
    "eval": "fastsae.evaluate:add_cli",
    "bench": "fastsae.bench:add_cli",
}


def cmd_info(args) -> int:
    import platform

    import torch

    import fastsae
    from fastsae.backends import status

    print(f"fastsae {fastsae.__version__}  torch {torch.__version__}  python {platform.python_version()}")
    print(f"CUDA available: {torch.cuda.is_available()}  threads: {torch.get_num_threads()}")
    for name, (ok, why) in status().items():
        print(f"  {name:7s} {'yes' if ok else 'no '}  {why}")
    return 0


def add_info(sub) -> None:
    p = sub.add_parser("info", help="which backends are usable here, and why not for the others")
    p.set_defaults(func=cmd_info)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastsae", description="Fast sparse autoencoders.")
    sub = p.add_subparsers(dest="command", required=True)
    for target in SUBCOMMANDS.values():
        module, fn = target.split(":")
        getattr(importlib.import_module(module), fn)(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
