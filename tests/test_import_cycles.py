"""The package's import graph, read with `ast` from every module of parallel_backend/ and nodes/ (imports inside
functions included): every module sits on a floor, no import points up a floor and none closes a circle. A failure
names the pair.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("parallel_backend", "nodes")

# The floors, lowest first (docs/ARCHITECTURE.md, section 1): a module may import its own floor and those below.
FLOORS = (
    ("runtime", ("parallel_backend.runtime",)),
    ("models and strategies", ("parallel_backend.models", "parallel_backend.strategies", "parallel_backend.tiny")),
    ("engine", ("parallel_backend.engine",)),
    ("plan", ("parallel_backend.plan",)),
    ("surfaces", ("parallel_backend.hosts", "parallel_backend.demo", "parallel_backend.commands", "parallel_backend",
                  "parallel_backend.__main__", "nodes")),
)


def floor_of(module: str) -> int:
    """The floor (0 = runtime) of a module: the longest folder prefix in FLOORS that holds it."""
    best, found = -1, None
    for number, (_, folders) in enumerate(FLOORS):
        for folder in folders:
            if (module == folder or module.startswith(folder + ".")) and len(folder) > best:
                best, found = len(folder), number
    return found


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
    assert "parallel_backend.runtime.speeds" in graph["parallel_backend.strategies.base"]  # inside split_rows
    assert "parallel_backend.models.stages" in graph["parallel_backend.models.comfy_unet"]  # `from .stages import`
    assert "nodes.settings" in graph["nodes.samplers"] and "nodes" not in graph["nodes.samplers"]  # ComfyUI's nodes
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_every_module_sits_on_a_floor_and_the_package_root_holds_only_its_entry_points():
    known = modules()
    assert all(floor_of(name) is not None for name in known), sorted(n for n in known if floor_of(n) is None)
    assert floor_of("parallel_backend.engine.worker") == 2 and floor_of("parallel_backend.plan.calibrate") == 3
    root = sorted(name for name, path in known.items()
                  if path.parent == ROOT / "parallel_backend" and path.name != "__init__.py")
    assert root == ["parallel_backend.__main__"], f"modules at the package root: {root}: give each its floor"


def test_no_import_points_up_a_floor():
    graph = import_graph()
    upward = sorted((a, b) for a, targets in graph.items() for b in targets if floor_of(b) > floor_of(a))
    assert not upward, "imports that point up a floor: " + "; ".join(
        f"{a} ({FLOORS[floor_of(a)][0]}) -> {b} ({FLOORS[floor_of(b)][0]})" for a, b in upward)


def test_no_import_circle():
    graph = import_graph()
    for group in circles(graph):
        pairs = sorted((a, b) for a in group for b in graph[a] & group)
        assert not group, f"an import circle through {', '.join(sorted(group))}; its imports: {pairs[:8]}"


def test_the_worker_program_the_runtime_names_by_string_is_where_workers_find_it():
    """runtime/pool.py starts `python -m parallel_backend.engine.worker` with PACKAGE_PARENT on the worker's path (a
    host such as ComfyUI does not install the package): both must follow the folders when modules move."""
    from parallel_backend.runtime import pool

    source = (ROOT / "parallel_backend" / "runtime" / "pool.py").read_text(encoding="utf-8")
    assert '"-m", "parallel_backend.engine.worker"' in source
    assert Path(pool.PACKAGE_PARENT) == ROOT
    assert (ROOT / "parallel_backend" / "engine" / "worker.py").exists()
