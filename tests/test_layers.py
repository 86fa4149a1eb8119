"""The import layers of DESIGN.md hold: serve → search → index → models, nothing upward.

Every ``import`` in a module counts, the lazy ones inside functions too: a layer that reaches up to
another, even late, ties the light query path to the heavy tools (training, evaluation).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vitrina"

# Higher layers may import lower ones, never the other way. The tools (training, distillation,
# self-supervision, evaluation, the demo, the CLI) sit on top of everything and are imported by none
# of the runtime layers.
RUNTIME_LAYERS = [
    ("serve", ["vitrina.serve"]),
    ("search", ["vitrina.search"]),
    ("index", ["vitrina.index"]),
    ("models", ["vitrina.models", "vitrina.checkpoint", "vitrina.runtime"]),
]
TOOLS = ["vitrina.train", "vitrina.distill", "vitrina.ssl", "vitrina.eval", "vitrina.demo", "vitrina.cli"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every vitrina module ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("vitrina")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vitrina"):
            found.add(node.module)
    return found


def layer_of(module: str) -> int | None:
    for rank, (_, prefixes) in enumerate(RUNTIME_LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def is_tool(module: str) -> bool:
    return any(module == t or module.startswith(t + ".") for t in TOOLS)


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_runtime_layer_imports_upward_or_a_tool(path: Path) -> None:
    module = module_name(path)
    rank = layer_of(module)
    if rank is None:
        return  # a tool, or a shared leaf (data, config, encoder, errors, atomic, digest)
    for imported in imports_of(path):
        assert not is_tool(imported), f"{module} (layer {RUNTIME_LAYERS[rank][0]}) imports the tool {imported}"
        other = layer_of(imported)
        assert other is None or other >= rank, (
            f"{module} (layer {RUNTIME_LAYERS[rank][0]}) imports {imported} (layer {RUNTIME_LAYERS[other][0]}): upward"
        )


def test_the_layer_check_catches_an_upward_import(tmp_path: Path) -> None:
    fake = tmp_path / "bad.py"
    fake.write_text("def f():\n    from vitrina.serve.app import create_app\n")
    assert "vitrina.serve.app" in imports_of(fake) and layer_of("vitrina.serve.app") < layer_of("vitrina.index.x")
