"""The three floors (numerics, Lightning glue, tools) and no import circles, read from the source of every module
(function-level imports included) and checked by importing the numerics in a fresh interpreter."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Repository folder -> installed package (pyproject's package-dir).
PACKAGES = {"lit_score": "lit_score", "callbacks": "lit_score.callbacks", "data_modules": "lit_score.data"}
NUMERICS, GLUE, TOOLS = 0, 1, 2
FLOORS = {  # the longest matching prefix decides
    "lit_score": NUMERICS, "lit_score.errors": NUMERICS, "lit_score.resources": NUMERICS,
    "lit_score.registry": NUMERICS, "lit_score.distributed": NUMERICS, "lit_score.data_space": NUMERICS,
    "lit_score.sdes": NUMERICS, "lit_score.losses": NUMERICS, "lit_score.score": NUMERICS,
    "lit_score.preconditioning": NUMERICS, "lit_score.densities": NUMERICS, "lit_score.threads": NUMERICS,
    "lit_score.progress": NUMERICS, "lit_score.posthoc_ema": NUMERICS, "lit_score.likelihood": NUMERICS, "lit_score.networks": NUMERICS,
    "lit_score.sampling": NUMERICS, "lit_score.metrics": NUMERICS,
    "lit_score.module": GLUE, "lit_score.data": GLUE, "lit_score.callbacks": GLUE, "lit_score.preemption": GLUE,
    "lit_score.resume": GLUE, "lit_score.checkpoint_io": GLUE, "lit_score.export": GLUE,
    "lit_score.allocation": GLUE,
}
NAMES = {NUMERICS: "numerics", GLUE: "glue", TOOLS: "tools"}


def floor(module: str) -> int:
    """A module's floor; anything not listed (cli, slurm, config, evaluate, convert, commands, ...) is a tool."""
    best = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len, default=None)
    return TOOLS if best is None or (best == "lit_score" and module != "lit_score") else FLOORS[best]


def _in_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_graph() -> dict[str, set[str]]:
    """Installed module name -> the lit_score modules it imports."""
    graph: dict[str, set[str]] = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            is_init = parts[-1] == "__init__"
            name = ".".join([package, *parts[:-1]] if is_init else [package, *parts])
            tree = ast.parse(path.read_text())
            parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
            deps: set[str] = set()
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Import, ast.ImportFrom)) or _in_type_checking(node, parents):
                    continue
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif node.level:
                    base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_init else 0)]
                    targets = [".".join(base + ([node.module] if node.module else []))]
                else:
                    targets = [node.module]
                for target in targets:
                    deps.add(target)
                    if isinstance(node, ast.ImportFrom):  # `from pkg import submodule`
                        deps.update(f"{target}.{a.name}" for a in node.names)
            graph[name] = deps
    known = set(graph)
    for name, deps in graph.items():
        resolved = {d for d in deps if d in known or d.split(".")[0] == "lightning"}
        # Importing pkg.sub from outside pkg runs pkg/__init__ first.
        resolved |= {".".join(d.split(".")[:i]) for d in list(resolved) if d in known
                     for i in range(1, d.count(".") + 1)
                     if not name.startswith(".".join(d.split(".")[:i]) + ".")
                     and ".".join(d.split(".")[:i]) != name and ".".join(d.split(".")[:i]) in known}
        graph[name] = resolved - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node], _ = 2, stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_no_import_from_a_higher_floor():
    """Numerics import no Lightning and no glue; glue imports no tools."""
    wrong = []
    for name, deps in import_graph().items():
        for dep in deps:
            if dep.split(".")[0] == "lightning":
                if floor(name) == NUMERICS:
                    wrong.append(f"{name} (numerics) imports {dep}")
            elif floor(dep) > floor(name):
                wrong.append(f"{name} ({NAMES[floor(name)]}) imports {dep} ({NAMES[floor(dep)]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_checks_see_a_planted_circle_and_a_planted_upward_import():
    graph = import_graph()
    assert "lit_score.sdes" in graph and "lit_score.cli" in graph and "lit_score.callbacks.ema" in graph
    planted = {**graph, "lit_score.sdes": graph["lit_score.sdes"] | {"lit_score.likelihood"}}
    assert find_cycle(planted) is not None
    assert floor("lit_score.sampling.pc") == NUMERICS and floor("lit_score.callbacks.fid") == GLUE
    assert floor("lit_score.cli") == TOOLS and floor("lit_score.evaluate.evaluator") == TOOLS


@pytest.mark.timeout(120)
def test_numerics_load_without_lightning():
    """Importing every numerics module in a fresh interpreter loads neither Lightning nor any glue."""
    numerics = sorted(n for n in import_graph() if floor(n) == NUMERICS)
    code = ("import sys\n" + "".join(f"import {n}\n" for n in numerics) +
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'lightning' or m.startswith("
            "('lit_score.module', 'lit_score.callbacks', 'lit_score.data.', 'lit_score.cli')))\n"
            "print(len(sys.modules)); assert not bad, bad\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, env=env,
                          timeout=110)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(numerics) > 20
