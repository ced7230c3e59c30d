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
    "train": "fastsae.training:add_cli",
    "harvest": "fastsae.activations:add_cli",
    "eval": "fastsae.evaluate:add_cli",
    "export": "fastsae.io:add_cli",
    "bench": "fastsae.bench:add_cli",
}


def cmd_info(args) -> int:
    import platform

    import torch

    import fastsae
    from fastsae.dispatch import status

    print(f"fastsae {fastsae.__version__}  torch {torch.__version__}  python {platform.python_version()}")
    print(f"CUDA available: {torch.cuda.is_available()}  threads: {torch.get_num_threads()}")
    for name, (ok, why) in status().items():
        print(f"  {name:7s} {'yes' if ok else 'no '}  {why}")
    return 0


def add_info(sub) -> None:
    p = sub.add_parser("info", help="which backends are usable here, and why not for the others")
    p.set_defaults(func=cmd_info)


class _Parser(argparse.ArgumentParser):
    """Every usage error is one line, ``fastsae: error: ...``, exit status 2 (argparse prints the usage too)."""

    def error(self, message):
        sub = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        where = f"{sub}: " if sub else ""
        self.exit(2, f"fastsae: error: {where}{message} (see {self.prog} --help)\n")


class _Help(argparse.HelpFormatter):
    """``--help`` shows every option's default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower() or action.default in (None, argparse.SUPPRESS) \
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                       argparse._HelpAction)) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def _finish(parser: argparse.ArgumentParser) -> None:
    """Help with defaults on every parser; ``--debug`` accepted after the subcommand too."""
    parser.formatter_class = _Help
    for action in parser._actions:
        if action.help is None and action.option_strings and action.default not in (None, argparse.SUPPRESS) \
                and not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            action.help = "(default: %(default)s)"
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _finish(sub)
                if not any("--debug" in a.option_strings for a in sub._actions):
                    sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                     help="show the full traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastsae", description="Fast sparse autoencoders.")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    for target in SUBCOMMANDS.values():
        module, fn = target.split(":")
        getattr(importlib.import_module(module), fn)(sub)
    _finish(p)
    return p


def main(argv=None) -> int:
    """Run one subcommand. An error is one line on stderr, ``fastsae: error: ...``, exit status 2 (``--debug``:
    the traceback instead); Ctrl-C exits with status 130 after the subcommand said what it saved."""
    import warnings

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # e.g. for "resume with: ..." hints
    debug = getattr(args, "debug", False)
    plain = warnings.formatwarning
    if not debug:  # a warning is one line too
        warnings.formatwarning = lambda message, *rest, **kw: f"fastsae: warning: {message}\n"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        if debug:
            raise
        print(f"fastsae: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (every error, one line)
        if debug:
            raise
        known = isinstance(e, (ValueError, TypeError, OSError, FloatingPointError, LookupError))
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"fastsae: error: {message if known else f'{type(e).__name__}: {message}'}"
              + ("" if known else " (rerun with --debug for the traceback)"), file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = plain


if __name__ == "__main__":
    sys.exit(main())
