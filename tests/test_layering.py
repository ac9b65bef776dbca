"""Which parts of the package may import which: read from the source with ``ast`` (every import
statement, at the top of a module or inside a function), so the rules hold without importing
anything.

Training and evaluation are apart: ``x2sam_jax.train`` and ``x2sam_jax.eval`` never import each
other; what both need (the model a run config builds, restoring a workdir) is ``x2sam_jax.runs``,
and the training loop is handed its evaluation (``train.py``) instead of importing it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "x2sam_jax"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every ``x2sam_jax`` module ``path`` imports, anywhere in the file (relative imports
    resolved; ``from x2sam_jax.a import b`` counts as ``x2sam_jax.a.b`` when ``b`` is a module,
    else as ``x2sam_jax.a``)."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                found.add(candidate if _is_module(candidate) else module)
    return {name for name in found if name == "x2sam_jax" or name.startswith("x2sam_jax.")}


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def package_imports(subpackage: str) -> dict[str, set[str]]:
    """{module of ``x2sam_jax.<subpackage>``: the x2sam_jax modules it imports}."""
    root = PACKAGE.joinpath(*subpackage.split("."))
    assert root.is_dir(), root
    return {module_name(path): imported_modules(path) for path in sorted(root.rglob("*.py"))}


def within(name: str, subpackage: str) -> bool:
    prefix = f"x2sam_jax.{subpackage}"
    return name == prefix or name.startswith(prefix + ".")


def offending(subpackage: str, forbidden: str) -> dict[str, list[str]]:
    """Modules of ``subpackage`` that import anything under ``forbidden``, with those imports."""
    bad = {}
    for module, imports in package_imports(subpackage).items():
        hits = sorted(name for name in imports if within(name, forbidden))
        if hits:
            bad[module] = hits
    return bad


def test_the_reader_sees_imports_at_the_top_inside_functions_and_relative(tmp_path, monkeypatch):
    fake = tmp_path / "x2sam_jax"
    (fake / "train").mkdir(parents=True)
    (fake / "eval").mkdir()
    for name in ("__init__.py", "train/__init__.py", "eval/__init__.py", "eval/tasks.py", "runs.py"):
        (fake / name).write_text("")
    (fake / "train" / "loop.py").write_text(
        "import os\nfrom x2sam_jax import runs\n\ndef f():\n    from x2sam_jax.eval import tasks\n")
    (fake / "train" / "step.py").write_text("from ..eval import tasks\nfrom . import loop\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    imports = package_imports("train")
    assert imports["x2sam_jax.train.loop"] == {"x2sam_jax.runs", "x2sam_jax.eval.tasks"}
    assert imports["x2sam_jax.train.step"] == {"x2sam_jax.eval.tasks", "x2sam_jax.train.loop"}
    assert offending("train", "eval") == {"x2sam_jax.train.loop": ["x2sam_jax.eval.tasks"],
                                          "x2sam_jax.train.step": ["x2sam_jax.eval.tasks"]}


def test_training_does_not_import_evaluation():
    assert package_imports("train"), "no modules found under x2sam_jax/train"
    assert offending("train", "eval") == {}, "x2sam_jax.train must not import x2sam_jax.eval (hand it a function)"


def test_evaluation_does_not_import_training():
    assert package_imports("eval"), "no modules found under x2sam_jax/eval"
    assert offending("eval", "train") == {}, "x2sam_jax.eval must not import x2sam_jax.train (use x2sam_jax.runs)"


# What the model definitions may build on; weight conversion (rule tables, checkpoint reading)
# lives in convert_weights/ and x2sam_jax.conversion, on top of the models.
MODELS_MAY_IMPORT = ("layers", "config", "sharding", "models")


def test_models_import_only_layers_config_sharding_and_themselves():
    imports = package_imports("models")
    assert imports, "no modules found under x2sam_jax/models"
    bad = {module: hits for module, names in imports.items()
           if (hits := sorted(name for name in names
                              if not any(within(name, allowed) for allowed in MODELS_MAY_IMPORT)))}
    assert bad == {}, ("x2sam_jax.models may import only x2sam_jax.layers, .config, .sharding and "
                       f"itself (conversion rules belong in convert_weights/): {bad}")
