"""Compare command: every DVC experiment of the repository and the current run, ranked by Dice.

`python -m pipeline compare` writes one self-contained page (`reports/experiments.html` by
default) and prints the ranked table as Markdown. It is not a DVC stage on purpose: experiments
are git refs (`refs/exps/...`), which dvc.yaml cannot declare as dependencies, so a stage
showing them went stale after every `dvc exp run`. Run it whenever you want the current table.

Experiments are read with git (`git for-each-ref refs/exps`, `git cat-file`), not `dvc exp
show`: git needs no DVC lock (it works while a queued experiment runs) and no DVC import. Their
metrics are the git-tracked (`cache: false`) metrics files committed in each experiment; the
current run's are the workspace's `reports/<stage>/metrics.json`.
"""
from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from pipeline.data.io import read_json, write_text
from pipeline.pages.render import Section, flatten, render_html, render_md
from pipeline.params import parse_yaml

KEY_METRICS = (  # (stage, key, column label): the table's metric columns, ranked by the first two
    ("predict", "synthetic_test_dice", "test Dice (synthetic)"),
    ("tune", "dice_best", "OOF Dice (tuned)"),
    ("train", "dice", "val Dice (0.5 gates)"),
    ("tune", "dice_default", "OOF Dice (defaults)"),
    ("tune", "dice_all_empty", "all-empty Dice"),
)
EXP_REF = re.compile(r"^refs/exps/([0-9a-f]{2})/([0-9a-f]{38})/([^/]+)$")
TITLE = "Experiments ranked by Dice"


def _git(repo: Path, *args: str, stdin: bytes | None = None) -> bytes | None:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], input=stdin, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def _cat_files(repo: Path, specs: list[str]) -> list[bytes | None]:
    """Contents of many `rev:path` blobs through one `git cat-file --batch`; None where absent."""
    out = _git(repo, "cat-file", "--batch", stdin="".join(f"{s}\n" for s in specs).encode())
    if out is None:
        return [None] * len(specs)
    result: list[bytes | None] = []
    pos = 0
    for _ in specs:
        end = out.index(b"\n", pos)
        header = out[pos:end].split()
        pos = end + 1
        if len(header) == 3 and header[1] == b"blob":
            size = int(header[2])
            result.append(out[pos:pos + size])
            pos += size + 1
        else:
            result.append(None)
    return result


def _load(blob: bytes | None, parse: Callable[[bytes], Any]) -> dict[str, Any]:
    if blob is None:
        return {}
    try:
        data = parse(blob)
    except (ValueError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def read_experiments(repo: Path, reports: Path, params_path: Path) -> list[dict[str, Any]] | None:
    """Every experiment under refs/exps plus their baseline commits, with params and key metrics.

    None when `repo` is not a git work tree; [] when it has no experiments.
    Each row: name, rev, baseline, params (flat), metrics.
    """
    top = _git(repo, "rev-parse", "--show-toplevel")
    if top is None:
        return None
    root = Path(top.decode().strip()).resolve()
    refs = (_git(repo, "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps") or b"").decode()
    found = []
    for line in refs.splitlines():
        ref, _, sha = line.partition(" ")
        m = EXP_REF.match(ref)
        if m:
            found.append((m.group(3), sha, m.group(1) + m.group(2)))
    if not found:
        return []
    revs = [(f"baseline {b[:7]}", b, "") for b in dict.fromkeys(base for *_, base in found)] + found
    try:
        rel_params = params_path.resolve().relative_to(root).as_posix()
        rel_reports = reports.resolve().relative_to(root).as_posix()
    except ValueError:
        return []
    stages = list(dict.fromkeys(stage for stage, _, _ in KEY_METRICS))
    specs = [f"{sha}:{rel_params}" for _, sha, _ in revs]
    specs += [f"{sha}:{rel_reports}/{stage}/metrics.json" for stage in stages for _, sha, _ in revs]
    blobs = _cat_files(root, specs)
    rows = []
    for i, (name, sha, base) in enumerate(revs):
        stage_metrics = {st: _load(blobs[len(revs) * (1 + j) + i], json.loads) for j, st in enumerate(stages)}
        rows.append({"name": name, "rev": sha[:7], "baseline": base[:7],
                     "params": flatten(_load(blobs[i], parse_yaml)),
                     "metrics": {label: stage_metrics[st].get(key) for st, key, label in KEY_METRICS}})
    return rows


def _workspace_metrics(reports: Path) -> dict[str, dict[str, Any]]:
    """The current run's metrics files (a missing or unreadable one counts as empty)."""
    found = {}
    for stage in dict.fromkeys(stage for stage, _, _ in KEY_METRICS):
        try:
            data = read_json(reports / stage / "metrics.json")
        except (OSError, ValueError):
            data = None
        found[stage] = data if isinstance(data, dict) else {}
    return found


def experiments(repo: Path, reports: Path, params_path: Path) -> Section:
    """The ranked table: experiments, their baselines and the current run (workspace)."""
    s = Section(TITLE, "experiments")
    rows = read_experiments(repo, reports, params_path)
    if rows is None:
        s.note(f"{repo}: not a git repository, so there are no DVC experiments to compare.")
        return s
    if not rows:
        s.note("No DVC experiments in this repository yet. Run some with `dvc exp run -S key=value` "
               "(README, \"Comparing runs\"), then run `python -m pipeline compare` again.")
        return s
    try:
        params = flatten(parse_yaml(params_path.read_text()))
    except (OSError, ValueError, yaml.YAMLError):
        params = {}
    current = _workspace_metrics(reports)
    rows.insert(0, {"name": "current run (workspace)", "rev": "workspace", "baseline": "", "params": params,
                    "metrics": {label: current[st].get(key) for st, key, label in KEY_METRICS}})
    keys = sorted(set().union(*(r["params"] for r in rows)))
    differ = [k for k in keys if len({json.dumps(r["params"].get(k), sort_keys=True) for r in rows}) > 1]
    labels = [label for _, _, label in KEY_METRICS]
    # The test images are the same in every run, while cleaning changes which images the OOF Dice averages
    # over: test Dice (synthetic data only) ranks first, OOF Dice breaks ties and ranks real-data runs.
    rows.sort(key=lambda r: tuple(x for lb in labels[:2] for x in (not isinstance(r["metrics"][lb], (int, float)),
                                                                    -(r["metrics"][lb] or 0))))
    s.text(f"{len(rows) - 1} runs from git (refs/exps and their baseline commits) plus the current run, ranked by "
           f"{labels[0]} (the same test images in every run), then {labels[1]} (its images change with "
           f"`clean.policy`: compare it with the all-empty Dice of the same run). Only params that differ are "
           f"shown. Metrics are read from each run's committed metrics files; after new experiments, run "
           f"`python -m pipeline compare` again.")
    s.table(["#", "experiment", "rev", "baseline", *labels, *differ],
            [[k + 1, r["name"], r["rev"], r["baseline"], *(r["metrics"][lb] for lb in labels),
              *(r["params"].get(d) for d in differ)] for k, r in enumerate(rows)],
            current=next(k for k, r in enumerate(rows) if r["rev"] == "workspace"))
    if not differ:
        s.text("All runs have the same params.")
    return s


def run(*, out: str | Path, params: str | Path, reports: str | Path) -> str:
    """Write the experiments page to `out`; returns the same page as Markdown.

    The repository is the one holding `params` (its folder); `reports` is the workspace's
    stage reports folder, for the current run's metrics.
    """
    params_path, reports = Path(params), Path(reports)
    section = experiments(params_path.resolve().parent, reports, params_path)
    subtitle = (f"Every DVC experiment of this repository and the current run (params from `{params_path}`, "
                f"metrics from `{reports}/`). Regenerate with `python -m pipeline compare`.")
    write_text(out, render_html([section], title="nerveseg experiments",
                                heading="Nerve segmentation: experiments", subtitle=subtitle))
    return render_md([section], heading="Nerve segmentation: experiments", subtitle=subtitle)
