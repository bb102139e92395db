"""The four floors, decided by folder: ground (the modules directly in lit_score/), numerics, Lightning glue and
tools; imports only go down, with no circles. Read from the source of every module (function-level imports
included) and checked by importing the ground and the numerics in a fresh interpreter."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Repository folder -> installed package (pyproject's package-dir).
PACKAGES = {"lit_score": "lit_score", "callbacks": "lit_score.callbacks", "data_modules": "lit_score.data"}
GROUND, NUMERICS, GLUE, TOOLS = 0, 1, 2, 3
NAMES = {GROUND: "ground", NUMERICS: "numerics", GLUE: "glue", TOOLS: "tools"}
FOLDERS = {  # every subpackage of lit_score; ground is the modules directly in lit_score/
    "lit_score.diffusion": NUMERICS, "lit_score.networks": NUMERICS, "lit_score.sampling": NUMERICS,
    "lit_score.metrics": NUMERICS,
    "lit_score.runtime": GLUE, "lit_score.callbacks": GLUE, "lit_score.data": GLUE,
    "lit_score.cli": TOOLS, "lit_score.interop": TOOLS, "lit_score.evaluate": TOOLS,
}
# Package data, no code (an __init__.py holding a docstring at most): the experiment YAMLs and sbatch templates.
DATA_PACKAGES = {"lit_score.experiments": "experiments", "lit_score.experiments.base": "experiments/base",
                 "lit_score.experiments.eval": "experiments/eval", "lit_score.sbatch": "slurm"}
MAX_GROUND = 8  # .py files directly in lit_score/, __init__ and __main__ included
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")
# The only imports across floors against the rules: (importer, imported) -> why. Importing a.b.c also runs a and a.b.
ALLOWED = {
    ("lit_score", "lit_score.cli.threads"): "OMP_WAIT_POLICY must be set on `import lit_score`, before torch loads "
                                            "OpenMP; threads.py imports only os and sys at module level",
    ("lit_score.__main__", "lit_score.cli.main"): "`python -m lit_score` is the lit-score command",
}


def floor(module: str) -> int | None:
    """A module's floor, by its folder; None for a module in no classified folder."""
    parts = module.split(".")
    if parts[0] != "lit_score":
        return None
    if len(parts) == 1:
        return GROUND
    if ".".join(parts[:2]) in FOLDERS:
        return FOLDERS[".".join(parts[:2])]
    return GROUND if len(parts) == 2 and (ROOT / "lit_score" / f"{parts[1]}.py").is_file() else None


def allowed(importer: str, dep: str) -> bool:
    return any(i == importer and (t == dep or t.startswith(dep + ".")) for i, t in ALLOWED)


def _in_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_graph() -> dict[str, set[str]]:
    """Installed module name -> the lit_score modules (and Lightning packages) it imports."""
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
        resolved = {d for d in deps if d in known or d.split(".")[0] in LIGHTNING}
        # Importing pkg.sub from outside pkg runs pkg/__init__ first.
        resolved |= {".".join(d.split(".")[:i]) for d in list(resolved) if d in known
                     for i in range(1, d.count(".") + 1)
                     if not name.startswith(".".join(d.split(".")[:i]) + ".")
                     and ".".join(d.split(".")[:i]) != name and ".".join(d.split(".")[:i]) in known}
        graph[name] = resolved - {name}
    return graph


def wrong_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports against the floors: ground imports only ground, numerics no glue or tools, glue no tools; neither
    ground nor numerics imports Lightning."""
    wrong = []
    for name, deps in graph.items():
        here = floor(name)
        if here is None or here == TOOLS:
            continue
        for dep in deps:
            if dep.split(".")[0] in LIGHTNING:
                if here in (GROUND, NUMERICS):
                    wrong.append(f"{name} ({NAMES[here]}) imports {dep}")
            elif floor(dep) is not None and floor(dep) > here and not allowed(name, dep):
                wrong.append(f"{name} ({NAMES[here]}) imports {dep} ({NAMES[floor(dep)]})")
    return sorted(wrong)


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def unclassified(root: Path = ROOT, packages: list[str] | None = None) -> list[str]:
    """Modules, folders holding Python files and pyproject packages that belong to no floor."""
    bad = []
    for path in sorted((root / "lit_score").rglob("*.py")):
        rel = path.relative_to(root / "lit_score")
        if len(rel.parts) > 1 and f"lit_score.{rel.parts[0]}" not in FOLDERS:
            bad.append(f"lit_score/{rel} (folder lit_score/{rel.parts[0]}/ has no floor)")
    for package in packages or []:
        if package != "lit_score" and ".".join(package.split(".")[:2]) not in FOLDERS \
                and package not in DATA_PACKAGES:
            bad.append(f"package {package} (pyproject) has no floor")
    return bad


def code_in_data_packages(root: Path = ROOT) -> list[str]:
    bad = []
    for folder in DATA_PACKAGES.values():
        for path in sorted((root / folder).glob("*.py")):
            body = ast.parse(path.read_text()).body
            if path.name != "__init__.py" or len(body) > 1 or (body and not (
                    isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant))):
                bad.append(f"{folder}/{path.name}")
    return bad


def ground_modules(root: Path = ROOT) -> list[str]:
    return sorted(p.name for p in (root / "lit_score").glob("*.py"))


def test_ground_imports_only_ground():
    wrong = [w for w in wrong_imports(import_graph()) if w.split(" ")[1] == "(ground)"]
    assert not wrong, "\n".join(wrong)


def test_numerics_import_no_lightning_glue_or_tools():
    wrong = [w for w in wrong_imports(import_graph()) if w.split(" ")[1] == "(numerics)"]
    assert not wrong, "\n".join(wrong)


def test_glue_imports_no_tools():
    wrong = [w for w in wrong_imports(import_graph()) if w.split(" ")[1] == "(glue)"]
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    circles = import_circles(import_graph())
    assert not circles, "\n".join(" <-> ".join(c) for c in circles)


def test_at_most_eight_ground_modules():
    assert len(ground_modules()) <= MAX_GROUND, ground_modules()


def test_every_module_and_package_has_a_floor():
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {v: k for k, v in setuptools["package-dir"].items()} == {
        **{f: p for f, p in PACKAGES.items() if f != "lit_score"}, **{"experiments": "lit_score.experiments",
                                                                      "slurm": "lit_score.sbatch"}}
    assert not unclassified(packages=setuptools["packages"]), "\n".join(unclassified(packages=setuptools["packages"]))
    assert not [n for n in import_graph() if floor(n) is None]
    assert not code_in_data_packages()
    # Every folder of lit_score holding code is a package the wheel installs.
    on_disk = {f"lit_score.{p.parent.relative_to(ROOT / 'lit_score')}".replace("/", ".")
               for p in (ROOT / "lit_score").rglob("*.py") if p.parent != ROOT / "lit_score"}
    assert on_disk <= set(setuptools["packages"]), sorted(on_disk - set(setuptools["packages"]))


def test_the_checks_see_planted_violations(tmp_path):
    graph = import_graph()
    assert {"lit_score.diffusion.sdes", "lit_score.cli.lightning_cli", "lit_score.callbacks.ema",
            "lit_score.rng", "lit_score"} <= set(graph)
    assert [floor(n) for n in ("lit_score", "lit_score.rng", "lit_score.__main__", "lit_score.sampling.pc",
                               "lit_score.metrics", "lit_score.callbacks.fid", "lit_score.data.image",
                               "lit_score.runtime.module", "lit_score.cli.lightning_cli", "lit_score.interop.export",
                               "lit_score.evaluate.evaluator", "lit_score.newfolder.x", "lit_score.nofile")] == [
        GROUND, GROUND, GROUND, NUMERICS, NUMERICS, GLUE, GLUE, GLUE, TOOLS, TOOLS, TOOLS, None, None]

    def plant(name: str, dep: str) -> list[str]:  # what the checks say of `name` importing only `dep`
        return [w for w in wrong_imports({**graph, name: {dep}}) if w.startswith(name + " ")]

    assert plant("lit_score.rng", "lit_score.sampling.pc") == [
        "lit_score.rng (ground) imports lit_score.sampling.pc (numerics)"]
    assert plant("lit_score.errors", "lightning") == ["lit_score.errors (ground) imports lightning"]
    assert plant("lit_score", "lit_score.cli.config") == ["lit_score (ground) imports lit_score.cli.config (tools)"]
    assert plant("lit_score.diffusion.densities", "lightning") == [
        "lit_score.diffusion.densities (numerics) imports lightning"]
    assert plant("lit_score.diffusion.densities", "lit_score.runtime.module") == [
        "lit_score.diffusion.densities (numerics) imports lit_score.runtime.module (glue)"]
    assert plant("lit_score.sampling.pc", "lit_score.interop.export") == [
        "lit_score.sampling.pc (numerics) imports lit_score.interop.export (tools)"]
    assert plant("lit_score.callbacks.ema", "lit_score.cli.main") == [
        "lit_score.callbacks.ema (glue) imports lit_score.cli.main (tools)"]
    assert plant("lit_score.cli.main", "lightning") == plant("lit_score.evaluate.cli", "lit_score.runtime") == []

    circles = import_circles({**graph, "lit_score.diffusion.sdes": graph["lit_score.diffusion.sdes"]
                              | {"lit_score.diffusion.likelihood"}})
    assert any({"lit_score.diffusion.sdes", "lit_score.diffusion.likelihood"} <= set(c) for c in circles)
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]

    (tmp_path / "lit_score" / "newfolder").mkdir(parents=True)
    (tmp_path / "lit_score" / "newfolder" / "x.py").write_text("")
    for i in range(MAX_GROUND + 1):
        (tmp_path / "lit_score" / f"m{i}.py").write_text("")
    assert unclassified(tmp_path) == ["lit_score/newfolder/x.py (folder lit_score/newfolder/ has no floor)"]
    assert unclassified(tmp_path / "nothing", ["lit_score", "lit_score.sbatch", "lit_score.tools"]) == [
        "package lit_score.tools (pyproject) has no floor"]
    assert len(ground_modules(tmp_path)) > MAX_GROUND
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "__init__.py").write_text('"""Doc."""\nimport os\n')
    assert code_in_data_packages(tmp_path) == ["slurm/__init__.py"]


@pytest.mark.timeout(120)
def test_ground_and_numerics_load_without_lightning():
    """Importing every ground and numerics module in a fresh interpreter loads neither Lightning nor any glue or
    tools module (but the allowed ones)."""
    modules = sorted(n for n in import_graph() if floor(n) in (GROUND, NUMERICS) and n != "lit_score.__main__")
    code = ("import json, sys\n" + "".join(f"import {n}\n" for n in modules) +
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('lit_score', *%r))))\n" % (LIGHTNING,))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, env=env,
                          timeout=110)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = sorted({m.split(".")[0] for m in loaded if m.split(".")[0] in LIGHTNING}) + [
        m for m in loaded if floor(m) is not None and floor(m) > NUMERICS and not any(allowed(i, m) for i in modules)]
    assert not bad, bad
    assert len([m for m in modules if floor(m) == NUMERICS]) > 20
