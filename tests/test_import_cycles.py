"""No import cycle among the project's modules: the library (kdcache/), the stages (pipelines/, installed as
kdcache.pipelines), the commands (cli/, as kdcache.cli), the benchmarks and the studies. Every import counts, those
inside functions too (a lazy import is still a dependency), so that each layer can be read, and changed, on its own."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder -> the package its files are imported as ("" for scripts imported by their own name)
TREES = {"kdcache": "kdcache", "pipelines": "kdcache.pipelines", "cli": "kdcache.cli", "benchmarks": "",
         "studies": ""}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in TREES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([p for p in [package, *parts] if p])] = path
    return found


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project's modules ``name`` imports, anywhere in its file."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from pkg import name`: the module pkg.name, else pkg
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):  # a submodule reaches its package's
                out.add(target)                                                   # __init__ first: not an edge
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_projects_modules_import_each_other_without_a_cycle() -> None:
    known = _modules()
    assert {"kdcache.pipelines.precompute_engine", "kdcache.cli.main", "fashion_mnist", "readers"} <= set(known)
    graph = {name: _imports(name, path, known) for name, path in known.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_stages_are_part_of_the_library_api_and_importing_kdcache_stays_light() -> None:
    import subprocess
    import sys

    code = ("import sys, kdcache; light = 'torch' not in sys.modules; "
            "from kdcache.pipelines import distill, precompute; "
            "assert kdcache.precompute is precompute.precompute and kdcache.distill is distill.distill; "
            "assert kdcache.PrecomputeRequest is precompute.PrecomputeRequest; "
            "assert kdcache.DistillRequest is distill.DistillRequest; "
            "assert {'precompute', 'distill', 'PrecomputeRequest', 'DistillRequest'} <= set(dir(kdcache)); "
            "print(light)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"
