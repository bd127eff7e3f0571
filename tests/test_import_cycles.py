"""The package's import graph, read with `ast` from every module of parallel_backend/ and nodes/ (imports inside
functions included): no import circle may appear beyond the one still being taken apart (docs/ARCHITECTURE.md,
section 1), and that one may only shrink. When it shrinks, KNOWN_CIRCLE is cut to match, so the list stays true.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("parallel_backend", "nodes")

# The one circle left (26 modules): config -> speeds -> plan -> engine / oracle / pool, pool -> worker -> the
# strategies' registry. The plan that removes it moves what is shared down, floor by floor.
KNOWN_CIRCLE = frozenset({
    "parallel_backend.config", "parallel_backend.engine", "parallel_backend.mesh", "parallel_backend.oracle",
    "parallel_backend.plan.calibrate", "parallel_backend.plan.choose", "parallel_backend.plan.model",
    "parallel_backend.plan.probe",
    "parallel_backend.pool", "parallel_backend.speeds",
    "parallel_backend.strategies", "parallel_backend.strategies.asyncdiff", "parallel_backend.strategies.base",
    "parallel_backend.strategies.batch", "parallel_backend.strategies.cfg", "parallel_backend.strategies.ring",
    "parallel_backend.strategies.sequence.group", "parallel_backend.strategies.sequence.parallel",
    "parallel_backend.strategies.sequence.ring", "parallel_backend.strategies.sequence.shards",
    "parallel_backend.strategies.sequence.stub", "parallel_backend.strategies.sequence.ulysses",
    "parallel_backend.strategies.sequence.usp", "parallel_backend.strategies.ulysses",
    "parallel_backend.strategies.usp", "parallel_backend.worker",
})


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the two packages."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported(name: str, path: Path, node: ast.Import | ast.ImportFrom, known: dict) -> list[str]:
    """The package modules `node` (in module `name`) imports. An absolute `nodes` is ComfyUI's own nodes.py: this
    pack's nodes/ is only ever imported under the pack's folder name, so only its relative imports count."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
        elif base.split(".")[0] == "nodes":
            return []
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    found = []
    for target in targets:
        if target.split(".")[0] == "nodes" and isinstance(node, ast.Import):
            continue
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.append(target)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {}
    for name, path in known.items():
        graph[name] = {target for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                       if isinstance(node, (ast.Import, ast.ImportFrom))
                       for target in imported(name, path, node, known)}
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm, without recursion)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        found.append(group)
    return found


def test_the_walk_reads_imports_inside_functions_and_relative_ones():
    graph = import_graph()
    assert "parallel_backend.plan.calibrate" in graph["parallel_backend.speeds"]  # inside _plan_cost
    assert "parallel_backend.models.stages" in graph["parallel_backend.models.comfy_unet"]  # `from .stages import`
    assert "nodes.settings" in graph["nodes.samplers"] and "nodes" not in graph["nodes.samplers"]  # ComfyUI's nodes
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_import_circle_beyond_the_known_one_and_that_one_only_shrinks():
    graph = import_graph()
    for group in circles(graph):
        new = sorted(group - KNOWN_CIRCLE)
        pairs = sorted((a, b) for a in group for b in graph[a] & group if a in new or b in new)
        assert not new, f"a new import circle through {', '.join(new)}; its imports: {pairs[:6]}"
        assert group == KNOWN_CIRCLE, (f"the known circle shrank to {len(group)} modules: cut KNOWN_CIRCLE to match "
                                       f"(left it: {sorted(KNOWN_CIRCLE - group)})")
