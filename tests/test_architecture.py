"""The package's layering holds: imports run one way with no circles (the package root included), variants
never reach up into the code that trains them, the kernels are reached only through the policy the package
root installs, no code outside ``lorakit/variants`` names a variant or probes one, and every settings field
documents itself for ``--help``."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import lorakit
from lorakit.common.settings import field_help
from lorakit.federated.config import FedConfig
from lorakit.jobs.cliargs import SECTIONS

PACKAGE = Path(lorakit.__file__).parent
# What a variant may never import: the code that drives it (and everything above that).
ABOVE_VARIANTS = (
    "lorakit",  # the package root
    "train",
    "engine",
    "privacy",
    "federated",
    "integrations",
    "interop",
    "bench",
    "cli",
    "adapters",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# The drivers and tools on top; the engine below them may use the public API (api, io) and core.
DRIVERS = ("lorakit", "train", "jobs", "privacy", "federated", "integrations", "interop", "bench", "cli")
MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
# Below core: the error types and the settings parser, which import nothing of lorakit but each other.
FOUNDATION = ("lorakit.common", "lorakit.common.errors", "lorakit.common.settings")


def imports(path: Path) -> set[str]:
    """lorakit modules ``path`` imports anywhere (function bodies included, ``TYPE_CHECKING`` blocks not),
    with the packages they are in: importing ``lorakit.engine.run`` from outside ``lorakit.engine`` runs
    ``lorakit/engine/__init__.py`` first. The package root counts where it is named (``import lorakit``), not
    as every module's parent."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    importer = module_name(path)
    found |= {p for m in found for p in packages_of(m) if not f"{importer}.".startswith(f"{p}.")}
    return {m for m in found if m in MODULES}


def packages_of(module: str) -> set[str]:
    """The packages below the root that ``module`` lies in (their ``__init__`` runs when it is first
    imported from outside them)."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(2, len(parts))}


GRAPH = {name: imports(path) - {name} for name, path in MODULES.items()}


def cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return found


def test_imports_have_no_circles() -> None:
    assert cycles() == []


def test_core_and_variants_never_import_the_code_that_drives_them() -> None:
    for name, targets in GRAPH.items():
        layer = name.split(".")[1] if "." in name else ""
        if layer == "core":
            assert all(t.startswith("lorakit.core") or t in FOUNDATION for t in targets), (name, targets)
        if name in FOUNDATION:
            assert all(t in FOUNDATION for t in targets), (name, targets)
        if layer == "engine":  # the engine serves the drivers and never reaches up to one (nor to the root)
            drivers = [t for t in targets if layer_of(t) in DRIVERS]
            assert drivers == [], (name, drivers)
        if layer == "variants":
            above = [t for t in targets if layer_of(t) in ABOVE_VARIANTS]
            assert above == [], (name, above)


def layer_of(module: str) -> str:
    """``lorakit.engine.run`` -> ``engine``; the package root (which imports every layer) -> ``"lorakit"``."""
    return module.split(".")[1] if "." in module else "lorakit"


KERNELS = "lorakit.kernels"
POLICY_INSTALLER = "lorakit"  # the package root imports the kernels, which install their policy in core


def test_only_the_package_root_imports_the_kernels_and_variants_import_nothing_of_them() -> None:
    for name, targets in GRAPH.items():
        reached = sorted(t for t in targets if t == KERNELS or t.startswith(KERNELS + "."))
        if name.startswith("lorakit.variants"):
            assert reached == [], (name, reached)
        elif name != POLICY_INSTALLER and not name.startswith(KERNELS):
            assert reached == [], (name, reached)
    assert KERNELS in GRAPH[POLICY_INSTALLER]


def test_the_root_is_in_the_graph_and_the_engine_reaches_the_api_directly() -> None:
    assert "lorakit" in GRAPH and "lorakit.adapters.api" in GRAPH["lorakit"]
    for name in GRAPH:
        if name.startswith("lorakit.engine"):  # the root imports the engine's gradients: no way back
            assert "lorakit" not in GRAPH[name], name


def test_no_code_outside_variants_names_or_probes_a_variant() -> None:
    names = set(lorakit.VARIANTS)
    for name, path in MODULES.items():
        if name.startswith("lorakit.variants"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("lorakit.variants."), (name, node.module)
            if isinstance(node, ast.Compare):  # e.g. `variant == "dora"`
                constants = [c.value for c in ast.walk(node) if isinstance(c, ast.Constant)]
                assert not names & {c for c in constants if isinstance(c, str)}, (name, ast.unparse(node))
            if isinstance(node, ast.Dict):  # a table keyed by variant name
                keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
                assert not names & keys, (name, ast.unparse(node)[:80])
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("getattr", "hasattr"):
                target = ast.unparse(node.args[0])
                assert "variant" not in target, (name, ast.unparse(node))


def test_no_string_tests_on_layer_kind_names_outside_kinds() -> None:
    for name, path in MODULES.items():
        if name == "lorakit.core.kinds":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) or (
                isinstance(node, ast.Call) and ast.unparse(node.func).endswith(".startswith")
            ):
                assert "kind.name" not in ast.unparse(node), (name, ast.unparse(node))


def test_every_setting_has_help_text_from_its_field_metadata() -> None:
    for cls in [*SECTIONS.values(), FedConfig]:
        for f in dataclasses.fields(cls):
            if f.name in SECTIONS:  # nested sections are not flags
                continue
            assert field_help(f) != f.name and len(field_help(f)) > 5, (cls.__name__, f.name)
