"""The package's shape, read from its own imports (``ast``, lazy imports inside functions too):
data flows one way (docs/layout.md), no module imports one above it, no circle, no private name
crosses a module, no file grows past what one reader holds."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lora_kernels"
LAYOUT_DOC = PACKAGE.parent / "docs" / "layout.md"

# The floors, from the ground up (docs/layout.md draws the same). A module imports only modules
# on lower floors; within a floor, only inside its own subpackage (kernels/, tune/, adapters/).
FLOORS = [
    ["_version", "env", "engines", "reference", "quant", "dropout", "roofline"],
    ["kernels", "dora"],
    ["validation", "torch_path"],
    ["triton_path"],
    ["timing"],
    ["tune"],
    ["function"],
    ["layer"],
    ["adapters"],
    ["__init__"],
    ["testing"],
    ["inspect", "gpu_check", "demo"],
]
# The modules that need Triton at import: the only ones a module may import lazily (inside a
# function), so that the package imports without Triton.
NEEDS_TRITON = ("triton_path", "kernels")
MAX_LINES = 650


def module_name(path: pathlib.Path) -> str:
    """``kernels.fused_mm``, ``adapters``, ``__init__`` (the package's face), ..."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def floor_of(module: str) -> tuple[int, str]:
    """``(floor, room)``: the room is the top-level module or subpackage the module lies in."""
    room = module.split(".")[0]
    for floor, rooms in enumerate(FLOORS):
        if room in rooms:
            return floor, room
    raise AssertionError(f"lora_kernels/{MODULES[module]}: on no floor of FLOORS")


def imports(module: str):
    """``(target module, lazy, names)`` for every import of a package module in ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    if module == "__init__":
        package = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lora_kernels."):
                    yield alias.name.removeprefix("lora_kernels."), id(node) not in top, []
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if not (node.module or "").startswith("lora_kernels"):
                    continue
                base = (node.module or "").split(".")[1:]
            else:
                base = package[: len(package) - (node.level - 1)] + (
                    node.module.split(".") if node.module else []
                )
            for alias in node.names:
                whole = ".".join([*base, alias.name])
                target = whole if whole in MODULES else ".".join(base) or "__init__"
                names = [] if whole in MODULES else [alias.name]
                yield target, id(node) not in top, names


EDGES = [(m, t, lazy, names) for m in MODULES for t, lazy, names in imports(m) if t != m]


def test_every_import_runs_down_the_flow():
    wrong = []
    for module, target, _, _ in EDGES:
        (floor, room), (target_floor, target_room) = floor_of(module), floor_of(target)
        if floor < target_floor or (floor == target_floor and room != target_room):
            wrong.append(f"{module} (floor {floor}) imports {target} (floor {target_floor})")
    assert not wrong, "\n".join(wrong)


def test_no_circle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, target, _, _ in EDGES:
        graph[module].add(target)
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("circle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for module in MODULES:
        if module not in state:
            visit(module, [])


def test_lazy_imports_only_keep_triton_optional():
    wrong = [
        f"{module} imports {target} inside a function"
        for module, target, lazy, _ in EDGES
        if lazy and target.split(".")[0] not in NEEDS_TRITON
    ]
    assert not wrong, "\n".join(wrong)


def test_no_private_name_crosses_a_module():
    wrong = [
        f"{module} imports {name} from {target}"
        for module, target, _, names in EDGES
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_file_over_the_limit(module):
    lines = MODULES[module].read_text().count("\n")
    assert lines <= MAX_LINES, f"{MODULES[module]}: {lines} lines (at most {MAX_LINES})"


def test_the_layout_doc_lists_every_module():
    text = LAYOUT_DOC.read_text()
    listed = set(re.findall(r"`(lora_kernels/[\w/]+\.py)`", text))
    on_disk = {f"lora_kernels/{p.relative_to(PACKAGE).as_posix()}" for p in MODULES.values()}
    assert listed == on_disk, (
        f"docs/layout.md lists {sorted(listed - on_disk)} that do not exist and misses "
        f"{sorted(on_disk - listed)}"
    )
