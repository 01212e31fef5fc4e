"""The compare command: every DVC experiment (git refs/exps) and the current run, ranked, outside DVC."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from pipeline.pages import compare
from pipeline.cli import app


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def _commit(repo: Path, policy: str, dice: float, message: str, test_dice: float | None = None) -> str:
    (repo / "params.yaml").write_text(f"clean:\n  policy: {policy}\ntrain:\n  lr: 0.001\n")
    for stage, data in (("tune", {"dice_best": dice, "dice_all_empty": 0.5}),
                        ("predict", {"synthetic_test_dice": test_dice} if test_dice else None)):
        (repo / "reports" / stage).mkdir(parents=True, exist_ok=True)
        if data:
            (repo / "reports" / stage / "metrics.json").write_text(json.dumps(data))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", message)
    return _git(repo, "rev-parse", "HEAD")


def _compare(repo: Path) -> tuple[str, str]:
    md = compare.run(out=repo / "reports" / "experiments.html", params=repo / "params.yaml",
                     reports=repo / "reports")
    return (repo / "reports" / "experiments.html").read_text(), md


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    return repo


def test_experiments_ranked_from_git_refs(tmp_path):
    repo = _repo(tmp_path)
    base = _commit(repo, "drop_empty", 0.7, "baseline")
    for name, policy, dice, test in (("exp-none", "none", 0.65432, None), ("exp-both", "drop_both", 0.76543, 0.6),
                                     ("exp-test", "none", 0.6, 0.8)):
        _git(repo, "update-ref", f"refs/exps/{base[:2]}/{base[2:]}/{name}", _commit(repo, policy, dice, name, test))
        _git(repo, "reset", "-q", "--hard", base)
    _git(repo, "update-ref", "refs/exps/celery/stash", base)  # DVC's internal refs are not experiments
    (repo / "reports" / "tune" / "metrics.json").write_text(json.dumps({"dice_best": 0.71}))  # the current run
    page, md = _compare(repo)
    table = md.split("## Experiments ranked by Dice")[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith("| ") and line[2].isdigit()]
    # test Dice first (exp-test beats exp-both), then OOF Dice for runs without it
    assert [r[1] for r in rows] == ["exp-test", "exp-both", "current run (workspace)", f"baseline {base[:7]}",
                                    "exp-none"]
    assert {"0.8000", "0.6000"} <= set(rows[0]) and {"0.7654", "drop_both"} <= set(rows[1])
    assert {"0.6543", "none"} <= set(rows[4]) and "0.7100" in rows[2]
    assert "clean.policy" in table and "train.lr" not in table  # only params that differ
    assert "<tr class=current>" in page and "exp-test" in page and "<script" not in page


def test_no_experiments_is_a_note_not_an_error(tmp_path):
    repo = _repo(tmp_path)
    _commit(repo, "none", 0.7, "baseline")
    result = CliRunner().invoke(app, ["compare", "--out", str(repo / "exps.html"), "--params",
                                      str(repo / "params.yaml"), "--reports", str(repo / "reports")])
    assert result.exit_code == 0, result.output
    assert "No DVC experiments in this repository yet" in result.stdout
    assert "python -m pipeline compare" in result.stdout and result.stdout.startswith("# ")
    assert "No DVC experiments in this repository yet" in (repo / "exps.html").read_text()


def test_not_a_git_repository_is_a_note(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    _, md = _compare(tmp_path)
    assert "not a git repository" in md


def test_compare_imports_neither_the_report_nor_torch():
    code = ("import sys, pipeline.pages.compare; "
            "print(sorted(m for m in ('torch', 'pipeline.stages.report', 'pipeline.stages.tune') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr


def test_scientific_notation_in_params_is_the_same_number(tmp_path):
    """`lr: 1e-03` (as `dvc exp run -S` writes it) and `lr: 0.001` are one value, not a difference."""
    repo = _repo(tmp_path)
    base = _commit(repo, "drop_empty", 0.7, "baseline")
    (repo / "params.yaml").write_text("clean:\n  policy: none\ntrain:\n  lr: 1e-03\n")
    _git(repo, "commit", "-qam", "exp")
    _git(repo, "update-ref", f"refs/exps/{base[:2]}/{base[2:]}/exp-sci", _git(repo, "rev-parse", "HEAD"))
    _git(repo, "reset", "-q", "--hard", base)
    (repo / "params.yaml").write_text("clean:\n  policy: drop_empty\ntrain:\n  lr: 1e-3\n")
    _, md = _compare(repo)
    table = md.split("## Experiments ranked by Dice")[1]
    assert "clean.policy" in table and "train.lr" not in table
