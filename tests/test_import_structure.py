"""The package's shape: no import cycle (function-level imports included, so none is left hiding one), and a
plugin whose imports are the shared core (``moeprep.schema``, ``moeprep.errors``) and vLLM's stack only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "moeprep"
CORE = ("moeprep.errors", "moeprep.schema", "moeprep.runtime")  # with their submodules, and the bare ``moeprep``
# The plugin proves a layout with the converter's own transforms only when vLLM runs outside a folder's verified
# range (``quant_config.prove_layout_on_running_vllm``); that import is lazy, and the only one.
RUNTIME_LAZY_CONVERTER_IMPORTS = {("moeprep.runtime.quant_config", "moeprep.layout_check")}


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[tuple[str, bool]]:
    """(imported moeprep module, at module level) for each import outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    type_only = {
        id(node)
        for block in tree.body
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for node in ast.walk(block)
    }
    top = {id(node) for node in tree.body}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only or not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:  # moeprep imports absolutely (checked below)
            assert not node.level, f"{path}: relative import"
            base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        found |= {(target, id(node) in top) for target in targets if target in modules}
    return found


def import_graph() -> dict[str, set[tuple[str, bool]]]:
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}}) is None


def test_no_import_cycle_even_through_function_level_imports() -> None:
    graph = import_graph()
    edges = {name: {target for target, _ in targets} for name, targets in graph.items()}
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges) or [])


def in_core(name: str) -> bool:
    return name == "moeprep" or any(name == core or name.startswith(f"{core}.") for core in CORE)


def test_the_runtime_imports_only_the_core_at_module_level() -> None:
    outside = {
        (name, target)
        for name, targets in import_graph().items()
        if name.startswith("moeprep.runtime") or name.startswith("moeprep.schema")
        for target, top_level in targets
        if not in_core(target) and (top_level or (name, target) not in RUNTIME_LAZY_CONVERTER_IMPORTS)
    }
    assert not outside, sorted(outside)


BLOCK_CONVERTER = """
import importlib, importlib.abc, pkgutil, sys
CORE = {core!r}

class ConverterBlocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        core = name == "moeprep" or any(name == c or name.startswith(c + ".") for c in CORE)
        if name.startswith("moeprep.") and not core:
            raise ImportError(f"{{name}} is converter-only")
        return None

sys.meta_path.insert(0, ConverterBlocked())
import moeprep.runtime
for module in pkgutil.iter_modules(moeprep.runtime.__path__):
    importlib.import_module(f"moeprep.runtime.{{module.name}}")
moeprep.runtime.register()
print(sorted(name for name in sys.modules if name.startswith("moeprep")))
"""


def test_the_plugin_loads_with_every_converter_module_unimportable() -> None:
    """vLLM's view: the entry point and every runtime module import, and register() runs, with nothing of moeprep
    importable but the core."""
    code = BLOCK_CONVERTER.format(core=CORE)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = eval(result.stdout.strip().splitlines()[-1])  # noqa: S307  (our own printed list)
    assert "moeprep.runtime.quant_config" in loaded and all(in_core(name) for name in loaded)


def test_family_modules_share_helpers_but_never_import_each_other() -> None:
    modules = module_names()
    families = {name for name, path in modules.items() if "\n@register_family\n" in path.read_text()}
    assert len(families) >= 7
    crossing = {
        (name, target)
        for name in families
        for target, _ in imports_of(name, modules[name], modules)
        if target in families
    }
    assert not crossing, sorted(crossing)
