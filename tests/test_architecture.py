"""The package layers hold: every import of a sink_eval module goes to its own package or to a lower layer
(`sink_eval.LAYERS`), and the module graph has no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import sink_eval

ROOT = Path(sink_eval.__file__).parent


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """The nodes inside `if TYPE_CHECKING:` blocks (imports for annotations only)."""
    blocks = [n for n in ast.walk(tree) if isinstance(n, ast.If) and getattr(n.test, "id", None) == "TYPE_CHECKING"]
    return {node for block in blocks for stmt in block.body for node in ast.walk(stmt)}


def imports(runtime_only: bool = False) -> dict[str, set[str]]:
    """Every sink_eval module -> the sink_eval modules it imports (function-level imports too; `TYPE_CHECKING` ones
    unless `runtime_only`)."""
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        module = _module(path)
        found = graph.setdefault(module, set())
        tree = ast.parse(path.read_text())
        skipped = _type_checking_only(tree) if runtime_only else set()
        for node in ast.walk(tree):
            if node in skipped:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sink_eval"):
                for alias in node.names:  # `from sink_eval.x import y`: y may be a module
                    child = f"{node.module}.{alias.name}"
                    found.add(
                        child if (ROOT.parent / child.replace(".", "/")).with_suffix(".py").exists() else node.module
                    )
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name.startswith("sink_eval.")}
    return graph


def package(module: str) -> str:
    """The layered unit a module belongs to: its first name below sink_eval ("sink_eval" itself for the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "sink_eval"


def layer(module: str) -> int:
    name = package(module)
    if name == "sink_eval":
        return -1  # the root holds only the version and LAYERS
    return next(i for i, names in enumerate(sink_eval.LAYERS) if name in names)


def test_every_package_has_one_layer_and_there_are_at_most_eight():
    listed = [name for names in sink_eval.LAYERS for name in names]
    present = {package(m) for m in imports()} - {"sink_eval"}
    assert sorted(listed) == sorted(present) and len(listed) == len(set(listed))
    assert len(sink_eval.LAYERS) <= 8


def test_no_module_imports_from_a_package_beside_or_above_its_own():
    wrong = [
        f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
        for module, targets in imports().items()
        for target in targets
        if package(target) != package(module) and layer(target) >= layer(module)
    ]
    assert not wrong, "\n".join(sorted(wrong))


def test_the_runtime_module_graph_has_no_cycle():
    """(An annotation may name a type of a module that imports its own: `if TYPE_CHECKING:` imports run never.)"""
    graph = imports(runtime_only=True)
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return [*path, module, target]
            if target not in state and (cycle := visit(target, [*path, module])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [])
            assert cycle is None, " -> ".join(cycle or [])


def test_architecture_md_draws_the_layers_as_written_in_code():
    """ARCHITECTURE.md's diagram has one line per layer, top first, naming that layer's packages."""
    text = (ROOT.parent / "ARCHITECTURE.md").read_text()
    drawn = {int(line.split()[1]): line for line in text.splitlines() if line.startswith("layer ")}
    assert sorted(drawn) == list(range(len(sink_eval.LAYERS)))
    for index, names in enumerate(sink_eval.LAYERS):
        assert drawn[index].split()[2 : 2 + 2 * len(names) - 1 : 2] == list(names), drawn[index]
