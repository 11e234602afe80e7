"""The package's layers, read from its source: no import cycle, and each layer imports only the ones
below it (README, "Layout"). Function-level imports count too: a cycle hidden in a function body is
still a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mlx_gemma3n"

# Low to high; a module may import its own layer's modules and those of lower layers. The entry points
# (the public API, the commands) share the top layer.
LAYERS = [
    {"errors", "command"},
    {"architecture"},
    {"backends"},
    {"weights"},
    {"adapters"},
    {"inputs", "decoding"},
    {"tuner"},
    {"__init__", "generate", "convert", "server", "transcribe", "lora", "fuse", "matformer"},
]
RANK = {part: rank for rank, layer in enumerate(LAYERS) for part in layer}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def enclosing_packages(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Our modules whose code importing `name` needs: each module it imports by name, the modules
    it takes names from, and the subpackages on the way (their __init__ runs first), except its own
    enclosing packages, which are being imported already when it runs."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            submodules = {f"{source}.{alias.name}" for alias in node.names} & known.keys()
            takes_names = len(submodules) < len(node.names)
            targets = submodules | ({source} if takes_names else set())
        elif isinstance(node, ast.Import):
            targets = {alias.name for alias in node.names}
        else:
            continue
        for target in targets & known.keys():
            found.add(target)
            found |= (enclosing_packages(target) - enclosing_packages(name)) & known.keys()
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in graph[node]:
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_graph_sees_function_level_and_package_imports():
    graph = import_graph()
    assert "mlx_gemma3n.weights.loader" in graph["mlx_gemma3n"]
    assert "mlx_gemma3n" in graph["mlx_gemma3n.lora"]  # `from . import load` inside a function
    assert "mlx_gemma3n.adapters" in graph["mlx_gemma3n.convert.convert"]  # the package's __init__ runs
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    found = cycles(import_graph())
    files = [" -> ".join(str(modules()[name].relative_to(PACKAGE.parent)) for name in cycle) for cycle in found]
    assert not found, "import cycles: " + "; ".join(files)


def test_every_module_belongs_to_a_layer():
    assert {layer(name) for name in modules()} <= RANK.keys()


def test_layers_import_only_downwards():
    wrong = [
        f"{modules()[name].relative_to(PACKAGE.parent)} imports {target}"
        for name, targets in import_graph().items()
        for target in targets
        if layer(target) != layer(name) and RANK[layer(target)] >= RANK[layer(name)] and RANK[layer(name)] < len(LAYERS) - 1
    ]
    assert not wrong, "; ".join(wrong)


def test_checkpoint_files_sit_low():
    """Names and discovery of checkpoint files: below the loader, slicing, conversion and adapters."""
    allowed = {"mlx_gemma3n.errors", "mlx_gemma3n.architecture", "mlx_gemma3n.architecture.config",
               "mlx_gemma3n.weights", "mlx_gemma3n.weights.mapped"}
    assert import_graph()["mlx_gemma3n.weights.files"] <= allowed
    users = [name for name, targets in import_graph().items() if "mlx_gemma3n.weights.files" in targets]
    assert {"mlx_gemma3n.weights.loader", "mlx_gemma3n.weights.matformer", "mlx_gemma3n.adapters.reader"} <= set(users)


def test_each_subpackage_says_what_it_holds():
    for init in PACKAGE.glob("*/__init__.py"):
        docstring = ast.get_docstring(ast.parse(init.read_text()))
        assert docstring, f"{init.relative_to(PACKAGE.parent)} has no docstring"
