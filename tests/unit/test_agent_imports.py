"""The guest agent runs on the guest's bare Python: check what it imports, statically."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import hako_agent

AGENT = Path(hako_agent.__file__).parent
ALLOWED_PACKAGES = {"google.protobuf", "hako_ttrpc", "hako_api", "hako_agent"}
# Modules main() imports before the agent answers its first request (see hako_agent.main).
BOOT_MODULES = {"__init__", "main", "linux", "log", "system", "service", "errors"}
# What those may import at module level: cheap, or needed for serving at all.
BOOT_TOP_LEVEL = {"__future__", "os", "time", "ctypes", "threading", "hako_agent"}
BOOT_PACKAGES = ("google.protobuf", "hako_api", "hako_ttrpc")  # needed to serve at all


def _imports(tree: ast.AST, top_level_only: bool) -> list[str]:
    nodes: list[ast.AST] = (
        list(tree.body) if top_level_only and isinstance(tree, ast.Module) else list(ast.walk(tree))
    )
    names: list[str] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names if node.module != "__future__")
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError("relative imports are not used in hako_agent")
    return names


def _is_type_checking_block(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _runtime_tree(path: Path) -> ast.Module:
    """The module without its ``if TYPE_CHECKING:`` blocks (never executed)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        for field in ("body", "orelse"):
            body = getattr(node, field, None)
            if isinstance(body, list):
                setattr(node, field, [n for n in body if not _is_type_checking_block(n)] or [ast.Pass()])
    return tree


def test_only_stdlib_protobuf_and_our_packages() -> None:
    stdlib = sys.stdlib_module_names
    bad = []
    for path in sorted(AGENT.glob("*.py")):
        for name in _imports(_runtime_tree(path), top_level_only=False):
            root = name.split(".")[0]
            if root in stdlib:
                continue
            if any(name == p or name.startswith(p + ".") for p in ALLOWED_PACKAGES):
                continue
            bad.append(f"{path.name}: {name}")
    assert not bad, f"hako_agent imports outside the guest's world: {bad}"


def test_never_imports_the_host_package() -> None:
    for path in sorted(AGENT.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        names = _imports(tree, top_level_only=False)
        assert not [n for n in names if n == "hako" or n.startswith("hako.")], path.name


def test_boot_path_imports_stay_cheap() -> None:
    """Container machinery (json, spawn, sandbox...) is imported only after the agent is ready."""
    for module in sorted(BOOT_MODULES):
        path = AGENT / f"{module}.py"
        names = _imports(_runtime_tree(path), top_level_only=True)
        extra = [
            n
            for n in names
            if n not in BOOT_TOP_LEVEL
            and not any(n == p or n.startswith(p + ".") for p in BOOT_PACKAGES)
            and not (
                n.startswith("hako_agent.")
                and n.removeprefix("hako_agent.") in BOOT_MODULES | {"__version__"}
            )
        ]
        assert not extra, f"{module}.py imports {extra} at boot"


def test_no_typing_dataclasses_or_logging_at_run_time() -> None:
    """typing, dataclasses (inspect) and logging cost boot time on the guest: annotations only."""
    for path in sorted(AGENT.glob("*.py")):
        names = _imports(_runtime_tree(path), top_level_only=False)
        heavy = [n for n in names if n.split(".")[0] in {"typing", "dataclasses", "logging", "subprocess"}]
        assert not heavy, f"{path.name}: {heavy}"
