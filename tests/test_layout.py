"""job/: the package's shape. Imports flow one way, down the layers below; no module imports itself back."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

JOB = Path(__file__).resolve().parents[1] / "job"

LAYERS: list[set[str]] = [
    {"job", "errors", "logs"},
    {"config"},
    {"storage", "dist", "optim", "host"},
    {"durability", "model"},
    {"data", "plan"},
    {"train", "publish"},
    {"run"},
    {"cli"},
    {"__main__"},
]
"""A unit (subpackage or top-level module) may import only from layers below its own (docs/design.md)."""
LAYER_OF = {unit: index for index, units in enumerate(LAYERS) for unit in units}
MAX_LINES = 500


def module_name(path: Path) -> str:
    return ".".join(("job", *path.relative_to(JOB).with_suffix("").parts)).removesuffix(".__init__")


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "job"


def job_imports(path: Path) -> set[str]:
    """Every `job` module this file imports, at module level or inside functions (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "job":
            for alias in node.names:  # `from job.plan import flops` imports the module job.plan.flops
                candidate = f"{node.module}.{alias.name}"
                is_module = (JOB.parent / candidate.replace(".", "/")).with_suffix(".py").exists()
                found.add(candidate if is_module else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "job")
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(path): job_imports(path) for path in JOB.rglob("*.py")}


def test_every_unit_has_a_layer() -> None:
    units = {unit_of(module) for module in graph()}
    assert units <= set(LAYER_OF), f"give these a layer in LAYERS: {sorted(units - set(LAYER_OF))}"


def test_imports_flow_down_the_layers() -> None:
    upward = []
    for module, imports in graph().items():
        for target in imports:
            source_unit, target_unit = unit_of(module), unit_of(target)
            if source_unit != target_unit and LAYER_OF[target_unit] >= LAYER_OF[source_unit]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def test_no_import_cycles_between_modules() -> None:
    edges = graph()
    # A package's __init__ is imported on the way to any of its modules: not an edge of its own.
    edges = {m: {t for t in targets if t in edges and t != m} for m, targets in edges.items()}
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the stack, 2 done
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state[target] == 1:
                cycles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif state[target] == 0:
                visit(target, [*stack, target])
        state[node] = 2

    for module in sorted(edges):
        if state[module] == 0:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_modules_are_documented_and_of_one_concern() -> None:
    problems = []
    for path in sorted(JOB.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if not ast.get_docstring(tree) and path.name != "__main__.py":
            problems.append(f"{path.relative_to(JOB)}: no module docstring")
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            problems.append(f"{path.relative_to(JOB)}: {lines} lines (split it by concern)")
    assert not problems, "\n".join(problems)


def test_the_checker_sees_lazy_imports_and_cycles(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from job.run import train\n    import job.cli\n")
    assert job_imports(source) == {"job.run", "job.cli"}
    assert unit_of("job.storage.s3") == "storage" and unit_of("job.run") == "run"


def test_every_package_directory_is_a_regular_package_that_setuptools_ships() -> None:
    from setuptools import find_packages

    directories = {
        ".".join(path.parent.relative_to(JOB.parent).parts)
        for path in JOB.rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert set(find_packages(str(JOB.parent), include=["job*"])) == directories, "a package lacks __init__.py"
