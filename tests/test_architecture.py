"""The package's layering (ARCHITECTURE.md), read from the source with ``ast``: every module has a layer, no
module imports a layer above it (module-level or inside a function), there is no import cycle, and no name on a
package shadows one of its submodules.

The known violations are listed below, each with what removes it; a listed violation that is gone fails too,
so these lists only shrink. The lead empties them after the last refactor lands.
"""
from __future__ import annotations

import ast
import fnmatch
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastsae"

#: Lowest first. A module may import its own layer and the layers below it (ARCHITECTURE.md says why).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("reference", ("fastsae._checks", "fastsae.reference", "fastsae.inference")),
    ("backends", ("fastsae.dispatch", "fastsae._C", "fastsae.ops", "fastsae.ops.*")),
    ("modules", ("fastsae.functional", "fastsae.adaptive", "fastsae.sparsity", "fastsae.sae", "fastsae.sae.*",
                 "fastsae._saver")),
    ("io", ("fastsae.io", "fastsae.io.*", "fastsae.torchfile")),
    ("data", ("fastsae.data", "fastsae.synthetic", "fastsae.metrics", "fastsae.activations",
              "fastsae.activations.*")),
    ("distributed", ("fastsae.distributed", "fastsae.distributed.*")),
    ("training", ("fastsae.training", "fastsae.training.*", "fastsae.resample", "fastsae.evaluate")),
    ("entry points", ("fastsae", "fastsae.__main__", "fastsae.cli", "fastsae.bench", "fastsae.bench.*")),
]

# -- known violations, to be removed (the lead empties these lists) --------------------------------------------
#: (importer, imported) -> what removes it. These are imports inside functions, so they hide cycles.
KNOWN_UPWARD_IMPORTS: dict[tuple[str, str], str] = {}
#: package attribute -> what removes it: a function bound on a package under the name of its submodule, so
#: ``import fastsae.X as m`` gives the function.
KNOWN_SHADOWED_MODULES: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()
#: modules without a .py file (the C++ extension may not be built here)
EXTENSIONS = {"fastsae._C"}
KNOWN = set(MODULES) | EXTENSIONS


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(module: str) -> list[tuple[str, int, bool]]:
    """``(imported fastsae module, line, at module level)`` for every import in ``module``; ``if TYPE_CHECKING:``
    blocks are skipped (they never run)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []

    def resolve(node, top_level: bool):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "fastsae":
                    out.append((a.name, node.lineno, top_level))
            return
        if node.level:
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            base = ".".join(base + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        if base.split(".")[0] != "fastsae":
            return
        for a in node.names:
            sub = f"{base}.{a.name}"
            out.append((sub if sub in KNOWN else base, node.lineno, top_level))

    def walk(node, top_level: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                resolve(child, top_level)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                walk(child, False)
            else:
                walk(child, top_level)

    walk(ast.parse(path.read_text(encoding="utf-8"), str(path)), True)
    return out


IMPORTS = {m: _imports(m) for m in MODULES}


def _layer(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    raise KeyError(module)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _edges(top_level_only: bool, skip=()) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for m, imps in IMPORTS.items():
        for target, _, top in imps:
            if target != m and (top or not top_level_only) and (m, target) not in skip:
                edges.setdefault(m, set()).add(target)
    return edges


def test_every_module_has_a_layer():
    missing = [m for m in sorted(KNOWN) if not any(fnmatch.fnmatchcase(m, p) for _, ps in LAYERS for p in ps)]
    assert not missing, f"add these modules to LAYERS here and to ARCHITECTURE.md: {missing}"


def test_every_import_resolves_to_a_module():
    unknown = [(m, t, line) for m, imps in IMPORTS.items() for t, line, _ in imps if t not in KNOWN]
    assert not unknown, f"imports of fastsae modules that do not exist: {unknown}"


def test_no_import_cycle_at_module_level():
    cycles = _cycles(_edges(top_level_only=True))
    assert not cycles, f"import cycles among module-level imports: {cycles}"


def test_no_import_cycle_even_through_imports_inside_functions():
    cycles = _cycles(_edges(top_level_only=False, skip=KNOWN_UPWARD_IMPORTS))
    assert not cycles, (f"import cycles (counting imports inside functions, which only hide them): {cycles}; "
                        "register into the lower module instead (e.g. fastsae.io.register_format)")


def test_no_module_imports_a_layer_above_it():
    upward = {}
    for m, imps in IMPORTS.items():
        for target, line, _ in imps:
            if _layer(target) > _layer(m):
                upward.setdefault((m, target), f"{MODULES[m].relative_to(ROOT)}:{line}")
    new = {k: v for k, v in upward.items() if k not in KNOWN_UPWARD_IMPORTS}
    assert not new, "imports of a higher layer: " + ", ".join(
        f"{a} ({LAYERS[_layer(a)][0]}) -> {b} ({LAYERS[_layer(b)][0]}) at {where}" for (a, b), where in new.items())
    gone = sorted(set(KNOWN_UPWARD_IMPORTS) - set(upward))
    assert not gone, f"fixed, remove from KNOWN_UPWARD_IMPORTS: {gone}"


def _shadowed() -> set[str]:
    """``package.name`` where a package's ``__init__`` binds ``name`` to something other than its submodule."""
    out = set()
    for pkg, path in MODULES.items():
        if path.name != "__init__.py":
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            bound = []
            if isinstance(node, ast.ImportFrom):
                own = node.level == 1 and node.module is None  # `from . import sub`: binds the submodule itself
                bound = [a.asname or a.name for a in node.names if not (own and (a.asname or a.name) == a.name)]
            elif isinstance(node, ast.Import):
                bound = [a.asname for a in node.names if a.asname]
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound = [node.name]
            elif isinstance(node, ast.Assign):
                bound = [t.id for t in node.targets if isinstance(t, ast.Name)]
            out |= {f"{pkg}.{n}" for n in bound if f"{pkg}.{n}" in KNOWN}
    return out


def test_no_package_attribute_shadows_a_submodule():
    shadowed = _shadowed()
    new = sorted(shadowed - set(KNOWN_SHADOWED_MODULES))
    assert not new, f"these names hide the submodule of the same name (`import {new[0] if new else ''} as m` " \
                    f"would not give the module): {new}"
    gone = sorted(set(KNOWN_SHADOWED_MODULES) - shadowed)
    assert not gone, f"fixed, remove from KNOWN_SHADOWED_MODULES: {gone}"


def test_the_rules_catch_what_they_are_for(tmp_path, monkeypatch):
    """The checks themselves: a two-module cycle, a hidden one, an upward import and a shadowing name."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    assert _layer("fastsae.io") > _layer("fastsae.sae") > _layer("fastsae.dispatch") > _layer("fastsae.reference")
    assert _layer("fastsae.distributed.sharded") > _layer("fastsae.io")
    pkg = tmp_path / "fastsae"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .train import train\nfrom . import io\n")
    (pkg / "train.py").write_text("def train():\n    from .io import load\n")
    (pkg / "io.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub import x\n"
                               "def load():\n    from .train import train\n")
    (pkg / "sub" / "__init__.py").write_text("from .. import io\nfrom ..io import load\n")
    ta = sys.modules[__name__]  # this module: point its readers at the toy package

    monkeypatch.setattr(ta, "ROOT", tmp_path)
    monkeypatch.setattr(ta, "PACKAGE", pkg)
    monkeypatch.setattr(ta, "MODULES", ta._modules())
    monkeypatch.setattr(ta, "KNOWN", set(ta.MODULES))
    imports = {m: ta._imports(m) for m in ta.MODULES}
    assert imports["fastsae.io"] == [("fastsae.train", 5, False)]  # the TYPE_CHECKING import never runs
    assert imports["fastsae.sub"] == [("fastsae.io", 1, True), ("fastsae.io", 2, True)]
    monkeypatch.setattr(ta, "IMPORTS", imports)
    assert ta._cycles(ta._edges(top_level_only=True)) == []
    assert ta._cycles(ta._edges(top_level_only=False)) == [["fastsae.io", "fastsae.train"]]
    assert ta._shadowed() == {"fastsae.train"}


def test_io_reads_the_sharded_format_through_its_registry_whatever_is_imported_first():
    """``fastsae.io`` imports nothing that imports it back: the sharded format registers itself, and importing
    any part of fastsae (here only ``fastsae.io``) registers it."""
    code = ("import sys, fastsae.io as io; from fastsae.distributed import load_sharded; "
            "assert io._FORMATS['sharded'][1] is load_sharded, io._FORMATS; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_sae_save_reaches_io_through_its_registry_whatever_is_imported_first():
    """``fastsae.sae`` imports no io: ``SAE.save`` calls the writer ``fastsae.io`` registered, and importing any
    part of fastsae (here only ``fastsae.sae``) registers it."""
    code = ("import fastsae.sae, fastsae._saver as s, fastsae.io as io; assert s.saver() is io.save, s.saver(); "
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_register_saver_checks_its_argument_and_save_without_one_says_what_to_import(tmp_path, monkeypatch):
    import fastsae
    from fastsae import _saver

    with pytest.raises(TypeError, match="save must be a callable"):
        _saver.register_saver(None)
    sae = fastsae.TopKSAE(6, 10, 3)
    seen = []
    monkeypatch.setattr(_saver, "_SAVE", lambda *a, **kw: seen.append((a, kw)))
    sae.save(tmp_path, format="sparsify")
    assert seen == [((sae, tmp_path), dict(format="sparsify", metadata=None))]
    monkeypatch.setattr(_saver, "_SAVE", None)
    with pytest.raises(RuntimeError, match="import fastsae"):
        sae.save(tmp_path)
    assert not any(tmp_path.iterdir())


def test_register_format_checks_its_arguments_and_load_dispatches_to_it(tmp_path, monkeypatch):
    import fastsae
    from fastsae import io

    monkeypatch.setattr(io, "_FORMATS", dict(io._FORMATS))  # leave the real registry as it was
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        io.register_format("", lambda p: True, lambda p, **kw: None)
    with pytest.raises(TypeError, match="detect and load must be callables"):
        io.register_format("x", None, lambda p, **kw: None)
    sae = fastsae.TopKSAE(6, 10, 3)
    seen = []

    def read(path, *, device, backend):
        seen.append((path, device, backend))
        return sae.train()

    io.register_format("toy", lambda p: (p / "toy.marker").is_file(), read)
    (tmp_path / "toy.marker").write_text("")
    assert fastsae.load(tmp_path, backend="eager") is sae and not sae.training  # eval mode, as every format
    assert seen == [(tmp_path, None, "eager")]
    with pytest.raises(FileNotFoundError):
        fastsae.load(tmp_path / "missing")
