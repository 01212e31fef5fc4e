"""dvc.yaml's code deps are exactly the package files each stage imports, directly or not."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from pipeline.codedeps import code_files

REPO = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _module(stage: dict) -> str:
    return "pipeline.stages." + re.match(r"python -m pipeline (\w+)", stage["cmd"]).group(1)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_dvc_code_deps_equal_the_stage_imports(name: str) -> None:
    listed = {dep for dep in STAGES[name]["deps"] if dep.startswith("pipeline/") and dep.endswith(".py")}
    imported = {str(path) for path in code_files(_module(STAGES[name]))}
    assert not imported - listed, f"dvc.yaml stage {name}: deps miss {sorted(imported - listed)}"
    assert not listed - imported, f"dvc.yaml stage {name}: deps list {sorted(listed - imported)}, not imported"


def test_imports_inside_functions_count() -> None:
    """rle imports layouts inside validate_submission_file(): predict, which imports rle, depends on it."""
    assert Path("pipeline/data/layouts.py") in code_files("pipeline.data.rle")


def test_every_stage_depends_on_the_params_schema_and_the_writers() -> None:
    for name, stage in STAGES.items():
        files = set(map(str, code_files(_module(stage))))
        assert {"pipeline/params.py", "pipeline/atomic.py"} <= files, name


def test_no_stage_imports_another_stages_module() -> None:
    """Formats passed between stages live in pipeline/data/artifacts.py, shared code in small modules."""
    stage_files = {Path(f"pipeline/stages/{name}.py") for name in STAGES}
    for name, stage in STAGES.items():
        own = Path(f"pipeline/stages/{name}.py")
        assert not (set(code_files(_module(stage))) & stage_files) - {own}, name


# The layers, top to bottom: a module imports only from its own folder or from a lower floor.
FLOORS = {"entry": 5, "stages": 4, "diagnostics": 3, "deploy": 3, "model": 2, "pages": 2, "data": 1, "framework": 0}
TOP_LEVEL = {"cli": "entry", "__main__": "entry", "params": "framework", "atomic": "framework",
             "errors": "framework", "codedeps": "framework"}


def _room_of(name: str) -> str:
    """A subpackage is a room; the modules in `pipeline/` itself are the framework (and the entry point)."""
    return TOP_LEVEL.get(name, name)


def _room(path: Path) -> str:
    """`pipeline/model/network.py` -> "model"; `pipeline/params.py` -> "framework"."""
    parts = path.relative_to(REPO / "pipeline").parts
    return parts[0] if len(parts) > 1 else _room_of(path.stem)


def _imported_rooms(path: Path) -> set[str]:
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:  # `from pipeline import x` too
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            names = []
        for name in names:
            parts = name.split(".")
            if parts[0] == "pipeline" and len(parts) > 1:
                rooms.add(_room_of(parts[1]))
    return rooms


def test_every_module_has_a_room_on_a_floor() -> None:
    rooms = {_room(p) for p in (REPO / "pipeline").rglob("*.py") if p != REPO / "pipeline" / "__init__.py"}
    assert rooms == set(FLOORS), f"give {sorted(rooms - set(FLOORS))} a floor in FLOORS (README: Architecture)"


@pytest.mark.parametrize("path", sorted((REPO / "pipeline").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_imports_from_a_higher_floor_or_a_neighbouring_room(path: Path) -> None:
    if path.name == "__init__.py":  # a package's __init__ holds only its docstring (code_files leaves it out)
        body = ast.parse(path.read_text()).body
        assert len(body) <= 1 and all(isinstance(n, ast.Expr) for n in body), f"{path}: code in __init__.py"
        return
    own = _room(path)
    for room in _imported_rooms(path) - {own}:
        assert FLOORS[room] < FLOORS[own], f"{path.relative_to(REPO)} imports pipeline.{room} (floor {FLOORS[room]}) from floor {FLOORS[own]}"


def test_the_layer_check_catches_an_upward_import(tmp_path: Path) -> None:
    upward = tmp_path / "io.py"
    upward.write_text("from pipeline.stages import train\nimport pipeline.model.network\nfrom pipeline import cli\n")
    assert _imported_rooms(upward) == {"stages", "model", "entry"}
