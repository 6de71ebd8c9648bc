"""The package's import graph: one seam for the tiny world, lower layers never reach up, no circles."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gdro_ray"
LOWER = ("gdro_ray.flow", "gdro_ray.objective", "gdro_ray.policy_gradient", "gdro_ray.models", "gdro_ray.rewards",
         "gdro_ray.data", "gdro_ray.presets")
SEAM = "gdro_ray.profiles"  # the one module that reads a model name


def module_imports() -> dict[str, set[str]]:
    """Every gdro_ray module and the gdro_ray modules it imports (at any depth of its code)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gdro_ray"):
                imported |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                             for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names if a.name.startswith("gdro_ray")}
        graph[name] = imported - {name}
    return graph


def is_in(module: str, prefixes) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def test_only_the_seam_imports_the_tiny_world():
    graph = module_imports()
    importers = {name for name, imported in graph.items() if not is_in(name, ["gdro_ray.tiny_world"])
                 and any(is_in(target, ["gdro_ray.tiny_world"]) for target in imported)}
    assert importers == {SEAM}


def test_lower_layers_import_nothing_above_them():
    upward = [(name, target) for name, imported in module_imports().items() if is_in(name, LOWER)
              for target in imported if not is_in(target, LOWER) and target != "gdro_ray"]
    assert upward == []


def test_train_imports_no_recipe():
    recipes = ["gdro_ray.align", "gdro_ray.compare", "gdro_ray.sweep", "gdro_ray.evaluate", "gdro_ray.periodic_eval",
               "gdro_ray.generation"]
    assert [(name, target) for name, imported in module_imports().items() if is_in(name, ["gdro_ray.train"])
            for target in imported if is_in(target, recipes)] == []


def test_the_import_graph_has_no_circle():
    graph, state, circles = module_imports(), {}, []

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph.get(name, ())):
            if state.get(target) == "open":
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []
