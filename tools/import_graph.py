"""Print the import cycles of the ``nnharmony`` package, between packages and between modules.

    python tools/import_graph.py [ROOT] [--layers]   # ROOT: the ``nnharmony`` folder next to this file

Reads the source with :mod:`ast` (nothing is imported), counts every ``import nnharmony...`` and
``from nnharmony... import`` / relative import anywhere in a module (function-level imports included), and
prints the strongly connected components of two graphs: packages (``nnharmony.trainers`` ->
``nnharmony.inference``) and modules; with ``--layers`` (and no package cycle) also each package's layer (0: it
imports no other nnharmony package; n: it imports from layers below n only). The exit status is 0 either way;
the last two lines give the counts.
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path


def module_name(root: Path, file: Path) -> str:
    parts = list(file.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(root: Path, file: Path, modules: set[str]) -> set[str]:
    name = module_name(root, file)
    is_pkg = file.name == "__init__.py"
    tree = ast.parse(file.read_text(), str(file))
    out: set[str] = set()

    def resolve(target: str) -> str | None:
        while target and target not in modules:  # an attribute or a name inside a module
            target = target.rpartition(".")[0]
        return target or None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names]
            # ``from pkg import submodule`` imports the submodule (pkg's __init__ runs anyway, but it is no edge
            # of its own); ``from pkg import name`` imports pkg
            targets = subs if all(t in modules for t in subs) else subs + [mod]
        else:
            continue
        for t in targets:
            if t.split(".")[0] == root.name:
                r = resolve(t)
                if r and r != name:
                    out.add(r)
    return out


def package_of(mod: str, packages: set[str]) -> str:
    while mod not in packages:
        mod = mod.rpartition(".")[0]
    return mod


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one node."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
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
    return sorted(out, key=lambda c: (-len(c), c))


def main(argv: list[str]) -> int:
    args = [a for a in argv[1:] if not a.startswith("--")]
    root = Path(args[0]) if args else Path(__file__).resolve().parent.parent / "nnharmony"
    files = sorted(root.rglob("*.py"))
    modules = {module_name(root, f) for f in files}
    packages = {module_name(root, f) for f in files if f.name == "__init__.py"}
    mod_graph = {module_name(root, f): imports_of(root, f, modules) for f in files}
    pkg_graph: dict[str, set[str]] = defaultdict(set)
    for m, deps in mod_graph.items():
        pm = package_of(m, packages) if m not in packages else m
        for d in deps:
            pd = package_of(d, packages) if d not in packages else d
            # a package's __init__ importing its own children, or a child importing its parent, is no cycle
            if pd != pm and not pd.startswith(pm + ".") and not pm.startswith(pd + "."):
                pkg_graph[pm].add(pd)
    pkg_cycles = cycles(dict(pkg_graph))
    mod_cycles = cycles(mod_graph)
    print("package cycles:")
    for c in pkg_cycles:
        print(f"  ({len(c)}) " + " <-> ".join(c))
    print("module cycles:")
    for c in mod_cycles:
        print(f"  ({len(c)}) " + " <-> ".join(c))
    if "--layers" in argv and not pkg_cycles:
        print("package layers (a package imports only from lower layers):")
        level: dict[str, int] = {}

        def depth(p: str) -> int:
            if p not in level:
                level[p] = 1 + max((depth(d) for d in pkg_graph.get(p, ())), default=-1)
            return level[p]

        for p in packages | set(pkg_graph):
            if p.count(".") == 1:
                depth(p)
        for n in range(max(level.values(), default=-1) + 1):
            names = sorted(p.split(".", 1)[1] for p, v in level.items() if v == n and p.count(".") == 1)
            if names:
                print(f"  {n}: {', '.join(names)}")
    print(f"package cycles: {len(pkg_cycles)} ({sum(map(len, pkg_cycles))} packages)")
    print(f"module cycles: {len(mod_cycles)} ({sum(map(len, mod_cycles))} modules)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
