"""The package's layering holds: every folder of ``lorakit/`` is one layer of docs/architecture.md and imports
only its own folder and the layers below it (the package root, a layer of its own, included), with no import
circles, type-only imports counted; the kernels are reached only through the policy the package root
installs; no code outside ``lorakit/variants`` names a variant or probes one; and every settings field
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
ROOT = "lorakit"  # the package face, lorakit/__init__.py
# The layers, bottom to top: a module imports only its own folder and the layers below it, never a folder
# beside it in its own layer. The package root is a layer: the drivers use the public API through it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("common",),  # the foundation: errors, settings, one writer per directory, directories swapped whole
    ("core",),  # layer types, weights, and the variant <-> driver contract
    ("kernels",),  # faster forms of core's computations, behind one seam; never a variant's name
    ("variants",),  # one method each, through the contract only
    ("adapters",),  # the public API on adapted models: apply, merge, save, load, targets, quantise
    ("interop",),  # PEFT's adapter files, on the public API
    ("engine",),  # one optimizer step, in one order, for every driver
    (ROOT,),  # the package face: the public API, the kernels' policy installed
    ("data",),  # what a run reads: files and datasets, chat templates, batches
    ("train", "privacy", "distributed", "integrations"),  # the drivers, each on the engine
    ("jobs",),  # what turns a job into a run: its settings, model, directory, and which driver runs it
    ("federated",),  # Flower's client and server, which run a job's model and data
    ("eval",),  # evaluating a trained run: generation and scoring
    ("bench",),  # several runs side by side, evaluated with eval's own checks
    ("cli",),  # the command line
    ("__main__",),  # ``python -m lorakit``
)
RANK = {folder: rank for rank, folders in enumerate(LAYERS) for folder in folders}
LOOSE = ("__init__.py", "__main__.py", "cli.py")  # the only modules directly in lorakit/


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path: Path) -> set[str]:
    return imports_in(path.read_text(), module_name(path))


def imports_in(source: str, importer: str) -> set[str]:
    """lorakit modules the module ``importer`` imports anywhere in ``source`` (function bodies and
    ``TYPE_CHECKING`` blocks included: a type-only import is a dependency too), with the packages they are
    in: importing ``lorakit.engine.run`` from outside ``lorakit.engine`` runs ``lorakit/engine/__init__.py``
    first. The package root counts where it is named (``import lorakit``), not as every module's parent."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, (importer, node.module)  # absolute imports only
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    found |= {p for m in found for p in packages_of(m) if not f"{importer}.".startswith(f"{p}.")}
    return {m for m in found if m in MODULES}


def packages_of(module: str) -> set[str]:
    """The packages below the root that ``module`` lies in (their ``__init__`` runs when it is first
    imported from outside them)."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(2, len(parts))}


GRAPH = {name: imports(path) - {name} for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def folder_of(module: str) -> str:
    """``lorakit.engine.run`` -> ``engine``; ``lorakit.cli`` -> ``cli``; the package root -> ``lorakit``."""
    return module.split(".")[1] if "." in module else ROOT


def test_imports_have_no_circles_type_only_imports_included() -> None:
    assert cycles(GRAPH) == []


def test_a_type_only_import_counts_and_closes_a_circle() -> None:
    source = (
        "from typing import TYPE_CHECKING\n\n"
        "if TYPE_CHECKING:\n"
        "    from lorakit.core.layer import AdaptedLayer\n"
    )
    found = imports_in(source, "lorakit.core.variant")
    assert found == {"lorakit.core.layer"}  # the package lorakit.core is the importer's own
    graph = {**GRAPH, "lorakit.core.variant": GRAPH["lorakit.core.variant"] | found}
    assert any({"lorakit.core.layer", "lorakit.core.variant"} <= set(c) for c in cycles(graph))


def test_the_package_root_holds_only_the_face_and_the_command_line() -> None:
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert loose == sorted(LOOSE), [name for name in loose if name not in LOOSE]
    folders = {p.relative_to(PACKAGE).parts[0] for p in PACKAGE.glob("*/**/*.py")}
    assert folders | {ROOT, "cli", "__main__"} == set(RANK), set(RANK) ^ (folders | {ROOT, "cli", "__main__"})


def test_every_folder_is_one_layer_and_imports_only_itself_and_the_layers_below() -> None:
    unplaced = sorted({folder_of(name) for name in GRAPH} - set(RANK))
    assert unplaced == [], f"put {unplaced} in a layer of LAYERS"
    wrong = []
    for name, targets in GRAPH.items():
        here = folder_of(name)
        for target in sorted(targets):
            there = folder_of(target)
            if there != here and RANK[there] >= RANK[here]:
                wrong.append(f"{name} ({here}) imports {target} ({there})")
    assert wrong == []


def test_the_root_is_in_the_graph_between_the_public_api_and_the_drivers() -> None:
    assert "lorakit.adapters.api" in GRAPH[ROOT] and "lorakit.engine.gradients" in GRAPH[ROOT]
    below = [
        name for name, targets in GRAPH.items() if ROOT in targets and RANK[folder_of(name)] < RANK[ROOT]
    ]
    assert below == []  # the engine, the public API, core and the variants never reach the root


KERNELS = "lorakit.kernels"
POLICY_INSTALLER = ROOT  # the package root imports the kernels, which install their policy in core


def test_nothing_outside_the_seam_but_the_package_root_imports_the_kernels() -> None:
    for name, targets in GRAPH.items():
        reached = sorted(t for t in targets if t == KERNELS or t.startswith(KERNELS + "."))
        if name != POLICY_INSTALLER and not name.startswith(KERNELS + ".") and name != KERNELS:
            assert reached == [], (name, reached)
    assert KERNELS in GRAPH[POLICY_INSTALLER]


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
