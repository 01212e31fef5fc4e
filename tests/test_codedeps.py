"""dvc.yaml's code deps are exactly the package files each stage imports, directly or not."""
from __future__ import annotations

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

