"""The structure of mmn_fast, read from the static import graph (see docs/architecture.md).

- no import cycle among mmn_fast modules (a package's __init__ counts as a module: importing
  `mmn_fast.find.engine` runs `mmn_fast.find`'s);
- imports point down the layers: errors/io -> kernels -> model -> find -> run -> edit -> explain -> serve -> cli;
- no function-level import, except of optional dependencies (triton and the `_*_triton` kernel
  modules that import it, spacy, webdataset, braceexpand, pyarrow, accelerate, torch.distributed);
- no module reaches into another module's `_private` names.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["errors", "io", "kernels", "model", "find", "run", "edit", "explain", "serve", "cli"]
# Below the layers (imported by any) and above them (import any): the package root, demo, testing.
UNLAYERED = {"mmn_fast", "mmn_fast.__main__", "mmn_fast.aggregate"}
OPTIONAL = ("triton", "spacy", "webdataset", "braceexpand", "pyarrow", "accelerate", "torch.distributed")


def _modules() -> dict[str, Path]:
    mods = {}
    for f in (ROOT / "mmn_fast").rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    for f in (ROOT / "kernels").glob("*.py"):  # installed as mmn_fast.kernels.<name>
        mods[f"mmn_fast.kernels.{f.stem}"] = f
    return mods


MODULES = _modules()
PACKAGES = {m for m, f in MODULES.items() if f.name == "__init__.py"} | {"mmn_fast.kernels"}


def _package_of(mod: str) -> str:
    return mod if mod in PACKAGES else mod.rpartition(".")[0]


def _targets(mod: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The mmn_fast modules an import statement loads (the named module, or submodules named in it)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "mmn_fast"]
    if node.level:
        base = _package_of(mod).split(".")
        base = base[: len(base) - node.level + 1]
        name = ".".join(base + ([node.module] if node.module else []))
    else:
        name = node.module or ""
    if name.split(".")[0] != "mmn_fast":
        return []
    out = [name]
    out += [f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in MODULES]
    return out


def _with_parents(target: str, importer: str) -> list[str]:
    """`target` and the packages Python runs to reach it, except the importer's own ancestors."""
    parts, out = target.split("."), []
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name in MODULES and not importer.startswith(name + ".") and name != importer:
            out.append(name)
    return out


def _parse(mod: str) -> ast.Module:
    return ast.parse(MODULES[mod].read_text(), str(MODULES[mod]))


def _top_level_imports(tree: ast.Module):
    """Imports run when the module is imported: at module level, also inside top-level if/try."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try)):
            stack += node.body + node.orelse + getattr(node, "finalbody", []) + [
                s for h in getattr(node, "handlers", []) for s in h.body]


def _graph() -> dict[str, set[str]]:
    graph = {}
    for mod in MODULES:
        edges = set()
        for node in _top_level_imports(_parse(mod)):
            for t in _targets(mod, node):
                edges.update(_with_parents(t, mod))
        graph[mod] = edges - {mod}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _layer(mod: str) -> int | None:
    if mod in UNLAYERED:
        return None
    parts = mod.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_the_graph_is_read():
    graph = _graph()
    assert "mmn_fast.model.adapters" in graph["mmn_fast.find.engine"]
    assert "mmn_fast.kernels.act_score" in graph["mmn_fast.kernels"]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_imports_point_down_the_layers():
    bad = []
    for mod, edges in _graph().items():
        lm = _layer(mod)
        for t in edges:
            lt = _layer(t)
            if lm is not None and lt is not None and lt > lm:
                bad.append(f"{mod} -> {t}")
            if lm is not None and lm < LAYERS.index("cli") and t.split(".")[1:2] and t.split(".")[1] in ("demo", "testing"):
                bad.append(f"{mod} -> {t} (library code importing demo/testing)")
    assert not bad, "\n".join(sorted(bad))


def _is_optional(mod: str, node) -> bool:
    if isinstance(node, ast.Import):
        return all(a.name.split(".")[0] in OPTIONAL or a.name in OPTIONAL for a in node.names)
    if node.level:
        return bool(node.module) and node.module.split(".")[-1].startswith("_") and node.module.endswith("_triton")
    name = node.module or ""
    return name in OPTIONAL or name.split(".")[0] in OPTIONAL


def test_no_function_level_imports_except_optional_dependencies():
    bad = []
    for mod in MODULES:
        tree = _parse(mod)
        top = set(map(id, _top_level_imports(tree)))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top and not _is_optional(mod, node):
                what = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                bad.append(f"{MODULES[mod].relative_to(ROOT)}:{node.lineno} imports {'.' * getattr(node, 'level', 0)}{what}")
    assert not bad, "\n".join(bad)


def _private_definitions(tree: ast.Module) -> set[str]:
    """`_names` a module defines: functions, classes, module and class attributes, `self._x`."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_reach_into_another_modules_private_names():
    trees = {m: _parse(m) for m in MODULES}
    defined = {m: _private_definitions(t) for m, t in trees.items()}
    ours = set().union(*defined.values())
    bad = []
    for mod, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _targets(mod, node):
                bad += [f"{mod}: from {node.module} import {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")
                        and f"{_targets(mod, node)[0]}.{a.name}" not in MODULES]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                receiver = node.value.id if isinstance(node.value, ast.Name) else None
                if receiver in ("self", "cls") or node.attr in defined[mod] or node.attr not in ours:
                    continue  # its own names, or a third-party library's (torch's _version, ...)
                bad.append(f"{MODULES[mod].relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert not bad, "\n".join(sorted(set(bad)))


@pytest.mark.parametrize("folder", ["bench"])
def test_benchmarks_use_public_names(folder):
    """bench/ drives the library through its public names (the `_*_triton` kernel modules excepted)."""
    trees = {m: _parse(m) for m in MODULES}
    ours = set().union(*(_private_definitions(t) for t in trees.values()))
    bad = []
    for f in sorted((ROOT / folder).glob("*.py")):
        tree = ast.parse(f.read_text())
        own = _private_definitions(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mmn_fast"):
                bad += [f"{f.name}: from {node.module} import {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")
                        and not node.module.endswith("_triton")]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if node.attr in ours and node.attr not in own and not node.attr.endswith("_kernel"):
                    bad.append(f"{f.name}:{node.lineno} .{node.attr}")
    assert not bad, "\n".join(bad)
