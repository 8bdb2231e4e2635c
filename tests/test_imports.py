"""clm's modules import each other without cycles, and no module imports another's private names.

The import graph is read from the source with `ast`, function-level imports included (an
import moved into a function to dodge a cycle is still a cycle of the design). An import of
a package's submodule is an edge to that submodule, not to the package's __init__.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "clm"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(module: str, source: str | None = None) -> list[tuple[str, str | None, int]]:
    """(imported clm module, imported name or None, line) for every import in `module`, at any depth."""
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name in MODULES]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..y import z
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in MODULES:
                    found.append((submodule, None, node.lineno))
                elif base in MODULES:
                    found.append((base, alias.name, node.lineno))
    return found


def import_graph() -> dict[str, set[str]]:
    return {module: {target for target, _, _ in imports(module) if target != module} for module in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_checker_sees_imports_at_every_depth_and_finds_cycles():
    source = (
        "import clm.storage\n"
        "from clm import tpu, not_a_module\n"
        "from . import documents\n"
        "from .sources import _private\n"
        "def f():\n"
        "    from clm.errors import UserError\n")
    assert imports("clm.data.encode", source) == [
        ("clm.storage", None, 1), ("clm.tpu", None, 2), ("clm", "not_a_module", 2),
        ("clm.data.documents", None, 3), ("clm.data.sources", "_private", 4), ("clm.errors", "UserError", 6)]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    detail = "; ".join(
        " <-> ".join(component) + " (" + ", ".join(
            f"{a} imports {b}" for a in component for b in sorted(graph[a] & set(component))) + ")"
        for component in found)
    assert not found, f"import cycles among clm's modules: {detail}"


def test_errors_is_the_bottom_layer():
    assert import_graph()["clm.errors"] == set(), "clm.errors must import nothing of clm"


def test_no_module_imports_another_modules_private_names():
    private = [f"{MODULES[module].relative_to(REPO)}:{line} imports {name} from {target}"
               for module in MODULES for target, name, line in imports(module)
               if name and name.startswith("_") and not name.startswith("__")]
    assert not private, "private names used outside their module: " + "; ".join(private)


# --------------------------------------------------------------- the engines' libraries

# torch_xla and torch.distributed.tensor belong to the engines (clm/engine) and the modules they
# put together: the XLA runtime, the mesh and placements, checkpoints, and the model's XLA kernels.
ENGINE_LIBRARIES = ("torch_xla", "torch.distributed.tensor")
ENGINE_OWNED = ("clm.engine", "clm.runtime", "clm.parallel", "clm.checkpoint",
                "clm.model.attention", "clm.model.grouped_matmul")
# Modules above the engines on the trainer's path that still import one, each with its reason.
# None today: the trainer, model plan, MoE experts, data, optimizer, schedules and run log are
# plain PyTorch (torch_xla reaches them only through clm.runtime's helpers, e.g. attention's
# on_tpu, which import it only for XLA tensors). A new entry needs a one-line reason.
STILL_IMPORTS: dict[str, str] = {}


def library_imports(module: str) -> list[tuple[str, int]]:
    """(imported module, line) of every import of `module`, clm's and others', at any depth."""
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text(), str(MODULES[module]))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def is_engine_owned(module: str) -> bool:
    return any(module == owner or module.startswith(owner + ".") for owner in ENGINE_OWNED)


def trainer_path() -> set[str]:
    """clm.train and every clm module it reaches through imports, not through the engine-owned ones."""
    graph, reached, todo = import_graph(), set(), ["clm.train"]
    while todo:
        module = todo.pop()
        if module in reached or is_engine_owned(module):
            continue
        reached.add(module)
        todo += graph[module]
    return reached


def test_the_trainer_path_imports_no_engine_library_outside_the_engines():
    offenders = {}
    for module in sorted(trainer_path()):
        lines = [f"{name} (line {line})" for name, line in library_imports(module)
                 if any(name == lib or name.startswith(lib + ".") for lib in ENGINE_LIBRARIES)]
        if lines:
            offenders[module] = lines
    unexpected = {m: lines for m, lines in offenders.items() if m not in STILL_IMPORTS}
    assert not unexpected, ("above the engines, only clm/engine and the modules it owns import torch_xla or "
                            f"torch.distributed.tensor: {unexpected}")
    stale = sorted(set(STILL_IMPORTS) - set(offenders))
    assert not stale, f"STILL_IMPORTS lists modules that no longer import an engine library: {stale}"


XLA_ENGINE = "clm.engine.xla"  # the one module that imports torch_xla when it loads


@pytest.mark.slow
def test_every_module_but_the_xla_engine_imports_without_loading_torch_xla():
    """On either stack (torch 2.9 + torch_xla, or the newest torch without it): every clm module
    other than the XLA engine imports, and none of them loads torch_xla on import."""
    script = ("import importlib, json, sys\n"
              f"modules = {sorted(set(MODULES) - {XLA_ENGINE})!r}\n"
              "failed = {}\n"
              "for name in modules:\n"
              "    try:\n"
              "        importlib.import_module(name)\n"
              "    except Exception as error:\n"
              "        failed[name] = repr(error)\n"
              "print(json.dumps([failed, sorted(m for m in sys.modules if m.split('.')[0] == 'torch_xla')]))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    failed, loaded = json.loads(result.stdout.splitlines()[-1])
    assert failed == {} and loaded == []
    assert XLA_ENGINE in MODULES
