"""The shape of the code: modules per folder, function lengths, import cycles, imports inside
functions, duplicate blocks. Prints a table and writes JSON (benchmarks/results/code_shape.json).

    .venv/bin/python benchmarks/code_shape.py [--root DIR]

Function length counts a def's lines (decorators to last line, docstring included). Cycles are
strongly connected groups of two or more modules in the import graph (grimp, import-linter's graph
library), counting imports inside functions too. Duplicate blocks come from the `duplicates` command
where this machine has it.
"""
from __future__ import annotations

import argparse
import ast
import json
import shutil
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

PACKAGES = ("app", "worker", "kernels")


def python_files(root: Path) -> list[Path]:
    return sorted(p for package in PACKAGES for p in (root / package).rglob("*.py"))


def function_lengths(tree: ast.AST) -> list[int]:
    return [node.end_lineno - min([node.lineno, *(d.lineno for d in node.decorator_list)]) + 1
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def project_imports(tree: ast.AST, module: str, is_package: bool) -> tuple[set[str], int]:
    """(modules of this project it imports, how many of those import statements sit in a function)."""
    imported, nested = set(), 0
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(child) for child in ast.walk(node) if child is not node)
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                parent = parts if is_package else parts[:-1]
                parent = parent[:len(parent) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names]   # a submodule, or a name in `base`
        names = [n for n in names if n.split(".")[0] in PACKAGES]
        if names:
            imported.update(names)
            if id(node) in in_function:
                nested += 1
    return imported, nested


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of two or more modules (Tarjan)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                group.append(item)
                if item == node:
                    break
            if len(group) > 1:
                result.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def measure(root: Path) -> dict:
    files = python_files(root)
    modules = {}
    for path in files:
        rel = path.relative_to(root).with_suffix("")
        is_package = rel.name == "__init__"
        name = ".".join(rel.parent.parts if is_package else rel.parts)
        modules[name] = (path, is_package)
    lengths, nested, graph = [], 0, {}
    per_folder: Counter[str] = Counter()
    for name, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text())
        lengths.extend(function_lengths(tree))
        imported, in_functions = project_imports(tree, name, is_package)
        nested += in_functions
        # `from app import jobs` names a module; `from app.jobs import create_job` names its module
        graph[name] = {target if target in modules else target.rsplit(".", 1)[0] for target in imported} - {name}
        graph[name] = {t for t in graph[name] if t in modules}
        if path.name != "__init__.py":
            per_folder[str(path.parent.relative_to(root))] += 1
    lengths.sort()
    found = cycles(graph)
    return {
        "modules_per_folder": dict(sorted(per_folder.items())),
        "functions": len(lengths),
        "function_lines": {"median": statistics.median(lengths), "p90": lengths[int(0.9 * (len(lengths) - 1))],
                           "max": lengths[-1]},
        "import_cycles": len(found),
        "modules_in_cycles": sorted({m for group in found for m in group}),
        "imports_inside_functions": nested,
        "duplicate_blocks": duplicate_blocks(root),
    }


def duplicate_blocks(root: Path) -> int | None:
    if shutil.which("duplicates") is None:
        return None
    out = subprocess.run(["duplicates", "--repo", str(root), "--most", "200"], capture_output=True, text=True).stdout
    first = out.split(maxsplit=1)
    return int(first[0]) if first and first[0].isdigit() else 0   # "N pairs of places ..."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--json", type=Path, help="where to write the JSON (default: benchmarks/results/)")
    args = parser.parse_args()
    result = measure(args.root)
    print(f"{'folder':<28} modules")
    for folder, count in result["modules_per_folder"].items():
        print(f"{folder:<28} {count}")
    fl = result["function_lines"]
    print(f"\nfunctions: {result['functions']}, lines median {fl['median']} / p90 {fl['p90']} / max {fl['max']}")
    print(f"import cycles: {result['import_cycles']} ({len(result['modules_in_cycles'])} modules)")
    print(f"project imports inside functions: {result['imports_inside_functions']}")
    print(f"duplicate block pairs (duplicates): {result['duplicate_blocks']}")
    out = args.json or Path(__file__).resolve().parent / "results" / "code_shape.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
