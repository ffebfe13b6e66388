"""The import graph of the library, from the source (ast; nothing is imported or run).

    python -m experiments.import_graph            # markdown: the floors and a Mermaid drawing
    python -m experiments.import_graph --check    # exit 1 if a rule below is broken

Rules (tests/test_layers.py checks them too): no module of lard_jax/ or pallas_kernels/ imports
experiments/ or tests/; no import cycle among lard_jax modules (imports inside functions count);
a test imports no other test module (only tests/tiny.py, tests/kernel_cases.py and tests/fused_setup.py
are shared).
"""

from __future__ import annotations

import argparse
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_TEST_HELPERS = {"tests.tiny", "tests.kernel_cases", "tests.fused_setup", "tests.conftest", "tests"}


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def python_files(package: str) -> list[str]:
    out = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
        out += [os.path.join(dirpath, f) for f in files if f.endswith(".py")]
    return sorted(out)


def imports_of(path: str, known: set[str] = frozenset()) -> set[str]:
    """Every module named by an import statement anywhere in the file (function bodies included).
    `from pkg import name` names `pkg.name` when that is a module in `known`, else `pkg`."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    me = module_name(path)
    package = me if path.endswith("__init__.py") else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return out


def graph(packages=("lard_jax", "pallas_kernels")) -> dict[str, set[str]]:
    """module -> the project modules it imports (within `packages`, plus experiments/tests named)."""
    files = [f for p in packages for f in python_files(p)]
    known = {module_name(f) for f in files}
    out = {}
    for f in files:
        names = imports_of(f, known)
        deps = {n for n in names if n in known}
        deps |= {n.split(".")[0] for n in names if n.split(".")[0] in ("experiments", "tests")}
        out[module_name(f)] = deps - {module_name(f)}
    return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def floors(g: dict[str, set[str]]) -> dict[str, int]:
    """Floor 0 imports no project module; every other module sits one above its highest import
    (package __init__ files that only re-export are treated like any module)."""
    memo: dict[str, int] = {}

    def floor(v, seen=()):
        if v in memo:
            return memo[v]
        deps = [w for w in g.get(v, ()) if w in g and w not in seen]
        memo[v] = 1 + max((floor(w, seen + (v,)) for w in deps), default=-1)
        return memo[v]

    for v in g:
        floor(v)
    return memo


def test_imports(tests_dir: str = "tests") -> dict[str, set[str]]:
    """test module -> other test modules it imports (shared helpers excluded)."""
    out = {}
    for f in python_files(tests_dir):
        me = module_name(f)
        known = {module_name(x) for x in python_files(tests_dir)}
        others = {n for n in imports_of(f, known) if n.startswith("tests.") or n == "tests"}
        others = {n for n in others if n not in SHARED_TEST_HELPERS and not n.startswith("tests.tiny")}
        others = {n for n in others if not n.startswith("tests.kernel_cases")}
        if others - {me}:
            out[me] = others - {me}
    return out


def problems() -> list[str]:
    g = graph()
    upward = {"experiments", "tests"}
    out = [f"{m} imports {', '.join(sorted(d & upward))}" for m, d in g.items() if d & upward]
    out += [f"import cycle: {' <-> '.join(c)}" for c in cycles(g)]
    out += [f"test {m} imports test module(s) {sorted(o)}" for m, o in test_imports().items()]
    return out


def markdown() -> str:
    g = graph()
    fl = floors(g)
    lines = ["| floor | modules |", "|---|---|"]
    for level in sorted(set(fl.values()), reverse=True):
        mods = sorted(m for m in fl if fl[m] == level)
        lines.append(f"| {level} | {', '.join(f'`{m}`' for m in mods)} |")
    lines += ["", "```mermaid", "graph TD"]
    for m in sorted(g):
        for d in sorted(g[m]):
            if d in g and not (m.startswith(d + ".") or d == m.rpartition(".")[0]):
                lines.append(f"  {m.replace('.', '_')}[{m}] --> {d.replace('.', '_')}[{d}]")
    lines.append("```")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    if args.check:
        bad = problems()
        print("\n".join(bad) if bad else "imports: ok (no upward import, no cycle, no test imports another)")
        return 1 if bad else 0
    print(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
