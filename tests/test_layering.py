"""Packages in layers, arrows pointing one way (issue 10, item 3). Every import of the package --
module level and inside functions, read with ``ast`` -- may only go to the same layer or one below:

    base (errors, config, manifest, outputs, sharding_rules)
      -> kernels, data -> model -> elastic -> checkpoint (formats only)
      -> export (every exporter and slicer) -> train, infer, distributed
      -> cli, launcher, demo, report, the package root

The table is the documented order of docs/ARCHITECTURE.md; a new module must be placed in it."""
from __future__ import annotations

import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "star_elastic_jax")
LAYERS = (
    ("errors", "config", "manifest", "outputs", "sharding_rules"),
    ("kernels", "data"),
    ("model",),
    ("elastic",),
    ("checkpoint",),
    ("export",),
    ("train", "infer", "distributed"),
    ("cli", "launcher", "demo", "report", ""),  # "": the package root (lazy public re-exports)
)
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def top_level(module: str) -> str:
    """``star_elastic_jax.a.b`` -> ``a`` (``""`` for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def modules() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def imports_of(path: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every star_elastic_jax import in the file, at any depth (functions too)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "star_elastic_jax":  # from star_elastic_jax import x: x is the module
                out += [(node.lineno, f"star_elastic_jax.{a.name}") for a in node.names]
            elif node.module.startswith("star_elastic_jax."):
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("star_elastic_jax")]
    return out


def test_every_module_is_in_the_layer_table():
    missing = sorted({top_level(m) for m in modules()} - set(LAYER))
    assert not missing, f"place these in LAYERS (and docs/ARCHITECTURE.md): {missing}"


def test_imports_point_down_the_layers():
    bad = []
    for module, path in sorted(modules().items()):
        src = LAYER[top_level(module)]
        for line, target in imports_of(path):
            dst = LAYER.get(top_level(target))
            if dst is None or dst > src:
                bad.append(f"{os.path.relpath(path, PKG)}:{line} {module} -> {target}")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycles_between_packages():
    edges: dict[str, set[str]] = {}
    for module, path in modules().items():
        for _, target in imports_of(path):
            a, b = top_level(module), top_level(target)
            if a != b and a and b:
                edges.setdefault(a, set()).add(b)
    seen, stack = set(), []

    def visit(n):
        if n in stack:
            pytest.fail(f"import cycle: {' -> '.join(stack[stack.index(n):] + [n])}")
        if n in seen:
            return
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            visit(m)
        stack.pop()
        seen.add(n)

    for n in sorted(edges):
        visit(n)


def test_the_checker_sees_function_level_imports(tmp_path):
    """Guard on the checker itself: a function-level import against the order is found."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from star_elastic_jax.cli import main\n    return main\n")
    assert imports_of(str(f)) == [(2, "star_elastic_jax.cli")]
