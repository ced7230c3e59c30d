"""The ``fastsae`` command (also ``python -m fastsae``)."""
from __future__ import annotations

import argparse
import sys


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastsae", description="Fast sparse autoencoders.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="which backends are usable here, and why not for the others").set_defaults(
        func=cmd_info
    )
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
