"""The pipeline source files a stage runs: the transitive closure of its `pipeline.*` imports.

Why: dvc.yaml's code deps and train's resume hash must name exactly the code a stage runs. A
hand-kept list misses imports, and DVC then calls stale outputs up to date. Imports are read
from the source (every `import`, also inside functions), so nothing is executed.
"""
from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE = PACKAGE_DIR.name


def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    path = PACKAGE_DIR.joinpath(*parts[1:])
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return path / "__init__.py" if (path / "__init__.py").is_file() else None


@cache
def _direct_imports(path: Path) -> frozenset[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pipeline import x`
    return frozenset(m for m in found if m.split(".")[0] == PACKAGE and _module_file(m) is not None)


def code_files(module: str) -> list[Path]:
    """Source files of `module` and of every package module it imports, directly or not
    (the packages' `__init__.py` aside: each holds only its docstring), relative to the repository root, sorted."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_direct_imports(_module_file(name)))
    files = {_module_file(name) for name in seen if _module_file(name).name != "__init__.py"}
    return sorted(f.relative_to(PACKAGE_DIR.parent) for f in files)
