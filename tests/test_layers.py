"""The layers of the code, read from the source: every import statement of every module (those inside
functions too; only ``if TYPE_CHECKING:`` blocks, which never run, are left out), resolved to modules of
this project, checked against the architecture (docs/ARCHITECTURE.md):

- no import cycle inside ``diffusion/`` or inside ``orchestrator/``;
- ``diffusion/`` imports nothing of ``orchestrator/``, Ray, MLflow, YAML or OmegaConf;
- ``diffusion/config.py`` imports nothing of ``diffusion/`` except ``errors``.
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("diffusion", "orchestrator")
FORBIDDEN_IN_DIFFUSION = ("orchestrator", "ray", "mlflow", "yaml", "omegaconf")


def module_files() -> dict[str, str]:
    """Dotted module name -> file, for every .py file of the two packages (``pkg/__init__.py`` is ``pkg``)."""
    modules = {}
    for package in PACKAGES:
        for directory, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(directory, name)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = module_files()


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _statements(tree: ast.AST):
    """Every import statement under ``tree`` at any depth, skipping ``if TYPE_CHECKING:`` bodies."""
    for node in ast.iter_child_nodes(tree):
        if _type_checking_block(node):
            yield from (s for child in node.orelse for s in _statements(ast.Module(body=[child], type_ignores=[])))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _statements(node)


def imports_of(module: str) -> set[str]:
    """The absolute names ``module`` imports: for ``from X import y``, X, and X.y where that is a module."""
    with open(MODULES[module]) as handle:
        tree = ast.parse(handle.read())
    is_package = MODULES[module].endswith("__init__.py")
    here = module.split(".") if is_package else module.split(".")[:-1]
    names = set()
    for node in _statements(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        base = here[: len(here) - node.level + 1] if node.level else []
        target = ".".join(base + ([node.module] if node.module else []))
        if node.module or not node.level:
            names.add(target)
        for alias in node.names:
            candidate = f"{target}.{alias.name}"
            if candidate in MODULES:
                names.add(candidate)
    names.discard(module)
    return names


GRAPH = {module: imports_of(module) for module in MODULES}


def _cycle(package: str) -> list[str] | None:
    """One import cycle among the modules of ``package``, as a path that returns to its start, or None."""
    nodes = [m for m in GRAPH if m.split(".")[0] == package]
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(GRAPH[node]):
            if target not in GRAPH or target.split(".")[0] != package:
                continue
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(nodes):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_source_is_read():
    """The parser sees what is there: known edges of both packages, function-level imports included."""
    assert {"diffusion.config", "diffusion.validation", "orchestrator.cli", "orchestrator.runner"} <= set(GRAPH)
    assert "diffusion.errors" in GRAPH["diffusion.registry"]
    assert "diffusion.config" in GRAPH["diffusion.validation"]
    assert "orchestrator.runner" in GRAPH["orchestrator.cli"]  # imported inside main(), after the sweep file is read
    assert "diffusion.config" in GRAPH["orchestrator.schema"]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package):
    cycle = _cycle(package)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    """The check above could fail: a cycle put into a copy of the graph is found."""
    saved = dict(GRAPH)
    try:
        GRAPH["diffusion.errors"] = GRAPH["diffusion.errors"] | {"diffusion.registry"}  # registry imports errors
        assert _cycle("diffusion") is not None
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


def test_diffusion_is_a_plain_library():
    """diffusion/ never imports the orchestrator, Ray, MLflow, YAML or OmegaConf."""
    offenders = {module: sorted(n for n in names if n.split(".")[0] in FORBIDDEN_IN_DIFFUSION)
                 for module, names in GRAPH.items() if module.split(".")[0] == "diffusion"}
    assert {m: n for m, n in offenders.items() if n} == {}


def test_config_holds_only_data():
    """diffusion/config.py imports nothing of the library but its errors (everything else builds on it)."""
    ours = {name for name in GRAPH["diffusion.config"] if name.split(".")[0] == "diffusion"}
    assert ours <= {"diffusion.errors"}, sorted(ours)


def test_readme_notebook_block_runs_without_a_config():
    """The README's notebook block runs as printed, builds no config, and gets the Gaussian back."""
    import contextlib
    import io
    import re

    import torch

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    block = re.search(r"<!-- notebook:begin -->\n```python\n(.*?)```\n<!-- notebook:end -->", readme, re.S).group(1)
    assert "Config" not in block
    scope: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - our own README
    assert scope["nfe"] == 50
    assert torch.allclose(scope["x0"].T.cov(), torch.tensor([[1.0, 0.5], [0.5, 1.0]]), atol=0.1)
