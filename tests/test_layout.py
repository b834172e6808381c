"""The package's shape: no import cycles, no stage importing another stage, modules a reader can hold.

Imports are read from the source (AST), module-level and function-level alike, so a cycle hidden in
a function body counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "slim_ray"
# Each pipeline stage (its modules); a stage may use shared modules, never another stage.
STAGES = {"prepare": {"prepare"}, "train": {"train"}, "teach": {"teach"}, "distill": {"distill"},
          "evaluate-rationales": {"rationale_quality"}, "backfill": {"backfill"}, "serve": {"serve", "serve_app"}}
ORCHESTRATORS = {"pipeline", "cli", "report"}  # they run the stages


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = {p.stem for p in package.glob("*.py")}
    graph = {}
    for path in package.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package.name:
                parts = node.module.split(".")
                deps |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith(package.name + ".")}
        graph[path.stem] = deps - {path.stem}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                found.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def stage_of(module: str) -> str | None:
    return next((stage for stage, members in STAGES.items() if module in members), None)


def test_no_import_cycles_and_no_stage_imports_another():
    graph = import_graph()
    assert all(m in graph for members in STAGES.values() for m in members) and ORCHESTRATORS <= set(graph)
    assert cycles(graph) == []
    crossings = sorted((m, d) for m, deps in graph.items() for d in deps
                       if m not in ORCHESTRATORS and stage_of(m) and stage_of(d) and stage_of(d) != stage_of(m))
    assert crossings == []
    shared_on_stage = sorted((m, d) for m, deps in graph.items() for d in deps
                             if not stage_of(m) and m not in ORCHESTRATORS and stage_of(d))
    assert shared_on_stage == []  # shared code never reaches up into a stage


def test_the_checks_catch_what_they_guard(tmp_path):
    package = tmp_path / "slim_ray"
    package.mkdir()
    (package / "a.py").write_text("def f():\n    from slim_ray.b import g\n")  # function-level
    (package / "b.py").write_text("from slim_ray import a\n")
    (package / "c.py").write_text("import slim_ray.a\n")
    graph = import_graph(package)
    assert graph == {"a": {"b"}, "b": {"a"}, "c": {"a"}} and cycles(graph) == [["a", "b", "a"]]


def test_modules_stay_readable():
    lengths = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert {name: n for name, n in lengths.items() if n > 400} == {}
