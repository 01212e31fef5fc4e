"""Outputs never delete what a stage did not write, and a stage's outputs are one commit."""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pipeline.atomic import (LEDGER, Output, atomic_dir, atomic_path, check_paths, owner, resolve, scratch_dir,
                             stage_commit)
from pipeline.cli import STAGES, app
from pipeline.data.io import write_text
from pipeline.errors import InputError


def cli(*args: object):
    """The command line; load also gets a fingerprint path beside its metrics."""
    args = [str(a) for a in args]
    if args[0] == "load" and "--fingerprint" not in args:
        args += ["--fingerprint", str(Path(args[args.index("--metrics") + 1]).with_name("fingerprint.json"))]
    return CliRunner().invoke(app, args)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under `root` (or `root` itself) with its bytes: what must survive a refused run."""
    if root.is_file():
        return {"": root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def dataset(tiny_raw: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny dataset, with a precious sibling file beside it."""
    ds = tmp_path / "work" / "DS"
    shutil.copytree(tiny_raw, ds)
    (tmp_path / "work" / "notes.txt").write_text("my notes")
    return ds


def assert_refused(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and len(result.output.strip().splitlines()) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def test_load_refuses_to_write_over_its_own_dataset(dataset: Path) -> None:
    before = tree_bytes(dataset)
    result = cli("load", "--raw", dataset, "--out", dataset, "--metrics", dataset.parent / "m.json")
    assert_refused(result, f"--out {dataset} is the input --raw {dataset}")
    assert tree_bytes(dataset) == before and not (dataset.parent / "m.json").exists()


def test_load_refuses_an_output_that_contains_the_dataset(dataset: Path) -> None:
    work = dataset.parent
    before = tree_bytes(work)
    result = cli("load", "--raw", dataset, "--out", work, "--metrics", work.parent / "m.json")
    assert_refused(result, f"--out {work} contains the input --raw {dataset}")
    assert tree_bytes(work) == before


def test_load_refuses_an_output_inside_the_dataset(dataset: Path) -> None:
    result = cli("load", "--raw", dataset, "--out", dataset / "interim", "--metrics", dataset.parent / "m.json")
    assert_refused(result, "lies inside the input --raw")
    assert not (dataset / "interim").exists()


def test_a_folder_output_never_replaces_a_users_file(tiny_interim: Path, tiny_plan: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    result = cli("dedup", "--interim", tiny_interim, "--plan", tiny_plan, "--out", notes, "--reports", tmp_path / "reports")
    assert_refused(result, f"{notes} already exists and was not written by the dedup stage")
    assert notes.read_text() == "precious" and not (tmp_path / "reports").exists()


def test_metrics_path_that_is_a_folder_is_refused_before_any_work(dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("x")
    result = cli("load", "--raw", dataset, "--out", tmp_path / "interim", "--metrics", tmp_path / "m")
    assert_refused(result, f"--metrics {tmp_path / 'm'} already exists and was not written by the load stage")
    assert not (tmp_path / "interim").exists(), "load wrote --out before checking --metrics"


def test_an_output_under_a_file_is_refused_before_any_work(dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("a file, not a folder")
    result = cli("load", "--raw", dataset, "--out", tmp_path / "plain" / "interim", "--metrics", tmp_path / "m.json")
    assert_refused(result, f"{tmp_path / 'plain'} is not a folder")
    assert not (tmp_path / "m.json").exists()


def test_a_rerun_replaces_its_own_outputs_but_not_another_stages(dataset: Path, tmp_path: Path) -> None:
    args = ["load", "--raw", dataset, "--out", tmp_path / "interim", "--metrics", tmp_path / "m.json"]
    assert cli(*args).exit_code == 0
    assert owner(tmp_path / "interim") == "load" and owner(tmp_path / "m.json") == "load"
    assert cli(*args).exit_code == 0, "a stage may replace what it wrote itself"
    result = cli("synth", "--out", tmp_path / "interim")
    assert_refused(result, f"{tmp_path / 'interim'} was written by the load stage, not synth")


def test_an_empty_folder_may_become_an_output(dataset: Path, tmp_path: Path) -> None:
    (tmp_path / "interim").mkdir()
    result = cli("load", "--raw", dataset, "--out", tmp_path / "interim", "--metrics", tmp_path / "m.json")
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- property: no input byte is ever lost

NAMES = ("a", "b", "c")


def _build_tree(root: Path, shape: list[tuple[int, ...]]) -> list[Path]:
    """Folders and files under root from index paths; returns every created path."""
    created = []
    for indices in shape:
        path = root.joinpath(*(NAMES[i] for i in indices))
        if path.exists() or any(p.is_file() for p in path.parents if root in p.parents):
            continue
        if len(indices) % 2:
            path.mkdir(parents=True, exist_ok=True)
            (path / "data.bin").write_bytes(os.urandom(8))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(8))
        created.append(path)
    return created


SPELLINGS = st.sampled_from(["plain", "dotdot", "link"])


def _spell(path: Path, spelling: str, link: Path) -> Path:
    """`path` as a user may spell it: plainly, through a missing folder and `..`, or through a link
    (made at `link`, outside the tree) to its folder."""
    if spelling == "dotdot":
        return path.parent / "missing" / ".." / path.name
    if spelling == "link":
        link.symlink_to(path.parent, target_is_directory=True)
        return link / path.name
    return path


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=3).map(tuple), min_size=1, max_size=6),
       picks=st.lists(st.tuples(st.integers(0, 99), st.sampled_from(["same", "parent", "child", "new"]),
                                st.sampled_from(["replace", "folder", "persist"]), SPELLINGS), min_size=1, max_size=3),
       input_pick=st.integers(0, 99), write_inside=st.booleans())
def test_no_input_byte_is_ever_lost_whatever_the_nesting(tmp_path_factory, shape, picks, input_pick,
                                                        write_inside) -> None:
    """Outputs spelled plainly, through `missing/..` or through a link, checked and written as
    `run_stage` does (resolved once)."""
    root = tmp_path_factory.mktemp("nest")
    links = tmp_path_factory.mktemp("links")
    created = _build_tree(root, shape)
    candidates = [root, *created]
    precious = tree_bytes(root)
    inputs = {"raw": candidates[input_pick % len(candidates)]}
    outputs = {}
    for k, (pick, relation, role, spelling) in enumerate(picks):
        base = candidates[pick % len(candidates)]
        path = {"same": base, "parent": base.parent, "child": base / "out", "new": root / f"new{k}"}[relation]
        outputs[f"out{k}"] = Output(_spell(path, spelling, links / f"l{k}"), role)
    try:
        check_paths("stage", inputs=inputs, outputs=outputs)
        where = {name: resolve(out.path, out.role) for name, out in outputs.items()}
        with stage_commit("stage", immediate=[where[n] for n, o in outputs.items() if o.role == "persist"]):
            for name, out in outputs.items():
                if out.role == "replace":
                    with atomic_dir(where[name]) as tmp:
                        (tmp / "result").write_text("new")
                else:
                    with atomic_path(where[name] / ("result" if write_inside else "data.bin")) as tmp:
                        tmp.write_text("new")
    except InputError:
        pass
    after = tree_bytes(root)
    lost = {name: data for name, data in precious.items() if after.get(name) != data}
    assert not lost, (inputs, outputs, sorted(lost))


def _fake_stage_run(stage):
    """What `stage` writes, per its table entry: each replaced output whole, each name it declares in
    a folder output (or one file), a checkpoint in a persistent folder; train also lets dvclive clean
    and fill its own folder, then publishes from it as the real stage does."""
    def run(params, **paths):
        for option in stage.paths:
            path = Path(paths[option.name])
            if option.role == "replace":
                with atomic_path(path) as tmp:
                    tmp.write_text("new")
            elif option.role == "folder":
                for name in option.writes or ("result",):
                    with atomic_path(path / name) as tmp:
                        tmp.write_text("new")
            elif option.role == "persist":
                with atomic_path(path / "fold_0" / "last.pt") as tmp:
                    tmp.write_text("new")
        if stage.name == "train":
            from pipeline.stages import train

            with scratch_dir(Path(paths["reports"]) / "live") as live_dir:
                live = train._open_live(live_dir)
                live.log_metric("fold_0/val_dice", 0.5)
                live.summary = {"dice": 0.5}
                live.make_summary()
                train._publish_live(live_dir, Path(paths["reports"]))
        return {}
    return run


COMMANDS = [stage.name for stage in STAGES] + ["compare"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=3).map(tuple), min_size=1, max_size=6),
       command=st.sampled_from(COMMANDS), picks=st.lists(st.tuples(st.integers(0, 99), st.sampled_from(
           ["same", "parent", "child", "new"]), SPELLINGS), min_size=8, max_size=8))
def test_no_input_byte_is_ever_lost_whatever_the_nesting_for_every_command(tmp_path_factory, monkeypatch, shape,
                                                                          command, picks) -> None:
    """Every path option of every command (compare's page too), inputs and the params file anywhere in
    a random tree, outputs over, in or around them in any spelling: a refused or finished run keeps
    every byte that was there (no stage wrote any of it)."""
    import importlib

    from pipeline.cli import run_stage

    root = tmp_path_factory.mktemp("cmd")
    links = tmp_path_factory.mktemp("links")
    (root / "params.yaml").write_text("seed: 1\n")
    created = _build_tree(root, shape)
    candidates = [root, root / "params.yaml", *created]
    precious = tree_bytes(root)
    options = (next(s for s in STAGES if s.name == command).paths if command != "compare" else
               ("params", "reports", "out"))
    chosen = {}
    for k, option in enumerate(options):
        pick, relation, spelling = picks[k % len(picks)]
        base = candidates[pick % len(candidates)]
        path = {"same": base, "parent": base.parent, "child": base / "out", "new": root / f"new{k}"}[relation]
        chosen[getattr(option, "name", option)] = _spell(path, spelling, links / f"l{k}")
    try:
        if command == "compare":
            monkeypatch.setattr("pipeline.pages.compare.run", lambda *, out, params, reports: (
                Path(out).parent.mkdir(parents=True, exist_ok=True), write_text(out, "<html>"), "")[-1])
            result = CliRunner().invoke(app, ["compare", *(str(a) for kv in chosen.items()
                                                            for a in (f"--{kv[0]}", kv[1]))])
            assert result.exit_code in (0, 1) and "Traceback" not in result.output, result.output
        else:
            stage = next(s for s in STAGES if s.name == command)
            monkeypatch.setattr(importlib.import_module(f"pipeline.stages.{command}"), "run", _fake_stage_run(stage))
            run_stage(stage, root / "params.yaml", chosen)
    except InputError:
        pass
    after = tree_bytes(root)
    lost = {name: data for name, data in precious.items() if after.get(name) != data}
    assert not lost, (command, chosen, sorted(lost))


# ---------------------------------------------------------------- one commit

def _three_outputs(folder: Path, text: str) -> None:
    with atomic_dir(folder / "out") as tmp:
        (tmp / "pairs.csv").write_text(text)
    with atomic_path(folder / "metrics.json") as tmp:
        tmp.write_text(text)
    with atomic_path(folder / "reports" / "gallery.png") as tmp:
        tmp.write_text(text)


def _contents(folder: Path) -> list[str | None]:
    paths = (folder / "out" / "pairs.csv", folder / "metrics.json", folder / "reports" / "gallery.png")
    return [p.read_text() if p.exists() else None for p in paths]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_failure_at_any_rename_of_the_commit_leaves_all_old_outputs(tmp_path, monkeypatch, k) -> None:
    with stage_commit("dedup"):
        _three_outputs(tmp_path, "old")
    real, seen = os.replace, [0]

    def failing(src, dst, *args, **kwargs):
        if ".pid" in Path(src).name and not Path(src).name.endswith(".old.tmp") and Path(dst).name != LEDGER:
            seen[0] += 1
            if seen[0] == k:
                raise KeyboardInterrupt
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(KeyboardInterrupt):
        with stage_commit("dedup"):
            _three_outputs(tmp_path, "new")
    assert _contents(tmp_path) == ["old"] * 3
    assert sorted(tmp_path.rglob(".*.tmp")) == []


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_commit_takes_effect_after_it(tmp_path, monkeypatch, k, sig) -> None:
    with stage_commit("dedup"):
        _three_outputs(tmp_path, "old")
    real, seen = os.replace, [0]

    def signalled(src, dst, *args, **kwargs):
        if ".pid" in Path(src).name and Path(dst).name != LEDGER:
            seen[0] += 1
            if seen[0] == k:
                os.kill(os.getpid(), sig)
        return real(src, dst, *args, **kwargs)

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    monkeypatch.setattr(os, "replace", signalled)
    # Python's own SIGINT handler, set here: a shell's background job starts with SIGINT ignored
    previous = signal.signal(signal.SIGTERM, stop), signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt if sig == signal.SIGINT else SystemExit):
            with stage_commit("dedup"):
                _three_outputs(tmp_path, "new")
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    assert _contents(tmp_path) == ["new"] * 3
    assert sorted(tmp_path.rglob(".*.tmp")) == []


def test_nothing_is_published_when_the_stage_fails(tmp_path) -> None:
    with pytest.raises(RuntimeError):
        with stage_commit("dedup"):
            _three_outputs(tmp_path, "new")
            raise RuntimeError("late failure")
    assert _contents(tmp_path) == [None] * 3 and sorted(tmp_path.rglob(".*.tmp")) == []


def test_a_commit_refuses_to_replace_a_file_no_stage_wrote(tmp_path) -> None:
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "gallery.png").write_text("the user's picture")
    with pytest.raises(InputError, match="gallery.png already exists and was not written by the dedup stage"):
        with stage_commit("dedup"):
            _three_outputs(tmp_path, "new")
    assert _contents(tmp_path) == [None, None, "the user's picture"]


def test_persistent_folders_are_written_at_once(tmp_path) -> None:
    with pytest.raises(RuntimeError):
        with stage_commit("train", immediate=[tmp_path / "models"]):
            with atomic_path(tmp_path / "models" / "last.pt") as tmp:
                tmp.write_text("epoch 1")
            raise RuntimeError("killed mid-training")
    assert (tmp_path / "models" / "last.pt").read_text() == "epoch 1"


def test_ledgers_are_small_and_readable(tmp_path) -> None:
    with stage_commit("dedup"):
        _three_outputs(tmp_path, "x")
    ledger = (tmp_path / LEDGER).read_text()
    assert '"metrics.json": "dedup"' in ledger and '"out": "dedup"' in ledger


def test_relative_outputs_in_one_folder_all_survive_the_commit(tmp_path, monkeypatch) -> None:
    """A second write into the folder must not take the first one's pending temporary for a dead run's."""
    monkeypatch.chdir(tmp_path)
    with stage_commit("load"):
        for name, text in (("metrics.json", "a"), ("fingerprint.json", "b")):
            with atomic_path(Path("reports") / name) as tmp:
                tmp.write_text(text)
    assert (tmp_path / "reports" / "metrics.json").read_text() == "a"
    assert (tmp_path / "reports" / "fingerprint.json").read_text() == "b"


def test_a_folder_output_may_hold_an_input_beside_the_names_it_writes(tmp_path) -> None:
    """train --reports DIR with the params file in DIR: train writes only metrics.json and plots/metrics there."""
    from pipeline.atomic import Output, check_paths
    from pipeline.errors import InputError

    beside, under = tmp_path / "params.yaml", tmp_path / "plots" / "metrics" / "params.yaml"
    beside.write_text("seed: 1\n")
    out = Output(tmp_path, "folder", ("metrics.json", "plots/metrics"))
    check_paths("train", inputs={"params": beside}, outputs={"reports": out})  # no error
    under.parent.mkdir(parents=True)
    under.write_text("seed: 1\n")
    with pytest.raises(InputError, match="contains the input --params"):
        check_paths("train", inputs={"params": under}, outputs={"reports": out})
    with pytest.raises(InputError, match="contains the input --params"):  # a folder replaced whole: refused
        check_paths("train", inputs={"params": beside}, outputs={"reports": Output(tmp_path)})
