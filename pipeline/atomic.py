"""Atomic outputs: temporaries renamed into place, one commit per stage, and ownership.

Why: a killed stage must never leave a half-written file where DVC would cache it; after any
interrupt a stage's outputs must be all old or all new; and a stage must never delete or
replace what it did not write.

- `atomic_path` / `atomic_dir` write to a temporary sibling `.NAME.pidPID.XXXXXXXX.tmp` and
  rename it into place on success. Inside `stage_commit` the renames wait until the stage has
  finished, then happen together with SIGINT/SIGTERM held back, and are undone together if one
  fails.
- A commit records what it published in a ledger (`.pipeline-outputs.json`) in each folder it
  writes into, and refuses to replace an entry that another stage, or no stage, wrote there.
- `check_paths` refuses, before any work, an output that is, contains or lies inside an input,
  or that holds something not written by the same stage.
- A process killed outright (SIGKILL, power loss) cannot delete its temporaries; the next atomic
  write into the same folder removes every leftover whose process is gone (`remove_stale_temps`),
  and `.dvcignore` keeps DVC from ever hashing one.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.errors import InputError

LEDGER = ".pipeline-outputs.json"
_TEMP_NAME = re.compile(r"^\..+\.pid(?P<pid>\d+)\.[^.]+(?:\.old)?\.tmp$")
_ACTIVE: set[str] = set()    # absolute paths of the temporaries this process is writing right now


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _key(path: str | Path) -> str:
    """How `_ACTIVE` names a path: absolute, so a relative and an absolute spelling agree."""
    return os.path.abspath(path)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.pid{os.getpid()}."


def _temp_sibling(path: Path, suffix: str) -> Path:
    return path.with_name(f"{_temp_prefix(path)}{secrets.token_hex(4)}{suffix}")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own pid, but not one of our active temporaries: a reused pid (containers)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporaries of atomic writes whose process died before renaming them; returns them.

    Only names this module creates are touched, and only when their process is gone, so a
    concurrent writer's temporary survives.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if not match or _key(entry) in _ACTIVE or _process_alive(int(match["pid"])):
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def _inside_active_temp(path: Path) -> bool:
    absolute = Path(_key(path))
    return any(str(folder) in _ACTIVE for folder in (absolute.parent, *absolute.parent.parents))


def _prepare(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A folder inside one of our temporary folders is new and clean (and may hold thousands of
    # files, as in synth); any other may hold a killed run's leftovers.
    if not _inside_active_temp(path):
        remove_stale_temps(path.parent)


# ---------------------------------------------------------------- ownership ledger

def _read_ledger(folder: Path) -> dict[str, str]:
    try:
        ledger = json.loads((folder / LEDGER).read_text())
    except (OSError, ValueError):
        return {}
    return ledger if isinstance(ledger, dict) else {}


def owner(path: str | Path) -> str | None:
    """The stage that published `path`, from its folder's ledger; None when no stage did."""
    path = Path(path)
    return _read_ledger(path.parent).get(path.name)


def _claim(stage: str, paths: Iterable[Path]) -> None:
    """Record `stage` as the writer of `paths`, before they are published (a kill in between
    then leaves a claim on an absent or already-owned path, never on someone else's file)."""
    by_folder: dict[Path, list[str]] = {}
    for path in paths:
        by_folder.setdefault(path.parent, []).append(path.name)
    for folder, names in by_folder.items():
        ledger = _read_ledger(folder)
        if all(ledger.get(name) == stage for name in names):
            continue
        ledger.update(dict.fromkeys(names, stage))
        tmp = _temp_sibling(folder / LEDGER, ".tmp")
        tmp.write_text(json.dumps(dict(sorted(ledger.items())), indent=1) + "\n")
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, folder / LEDGER)


def _occupied(path: Path) -> bool:
    """True when `path` holds something: a file, a link, or a folder with entries (a ledger alone
    or an empty folder does not count)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        return True
    return path.is_dir() and any(p.name != LEDGER for p in path.iterdir())


def _not_ours(stage: str, path: Path) -> str | None:
    if not _occupied(path) or owner(path) == stage:
        return None
    by = owner(path)
    return (f"{path} was written by the {by} stage, not {stage}" if by else
            f"{path} already exists and was not written by the {stage} stage")


# ---------------------------------------------------------------- checks before any work

Role = Literal["replace", "folder", "persist"]


@dataclass(frozen=True)
class Output:
    """An output path of a stage command and how the stage writes it.

    replace: the path is replaced as a whole (a file, or a folder written with `atomic_dir`);
    folder: the stage writes files into this folder (only those files are replaced);
    persist: a folder written in place and kept between runs (train's resumable checkpoints).
    """
    path: Path
    role: Role = "replace"


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_paths(stage: str, *, inputs: Mapping[str, Path], outputs: Mapping[str, Output],
                outputs_may_nest_in: Iterable[str] = ()) -> None:
    """Refuse, before any work, outputs that would delete or replace an input or a file this
    stage did not write, or that cannot be written; one InputError naming both paths.

    `outputs_may_nest_in` names inputs that are folders of pipeline outputs (report's
    `--reports`): this stage's own outputs may lie inside those, never over one of their files.
    """
    problems: list[str] = []
    nest_ok = set(outputs_may_nest_in)
    for name, out in outputs.items():
        real = _real(out.path)
        for in_name, in_path in inputs.items():
            real_in = _real(in_path)
            if real == real_in:
                problems.append(f"output --{name} {out.path} is the input --{in_name} {in_path}")
            elif _within(real_in, real):
                problems.append(f"output --{name} {out.path} contains the input --{in_name} {in_path}")
            elif _within(real, real_in) and in_name not in nest_ok:
                problems.append(f"output --{name} {out.path} lies inside the input --{in_name} {in_path}")
        for other_name, other in outputs.items():
            if other_name < name and (_within(real, _real(other.path)) or _within(_real(other.path), real)):
                problems.append(f"outputs --{other_name} {other.path} and --{name} {out.path} overlap")
        if out.role == "folder":
            if out.path.exists() and not out.path.is_dir():
                problems.append(f"output --{name} {out.path} is a file, not a folder")
        else:
            problem = _not_ours(stage, out.path)
            if problem:
                problems.append(f"output --{name} {problem}")
        problem = _probe_writable(out.path)
        if problem:
            problems.append(f"output --{name} {out.path}: {problem}")
    if problems:
        raise InputError(f"{stage}: refusing to run, nothing was changed: " + "; ".join(problems))


def _probe_writable(path: Path) -> str | None:
    """Why `path` could not be created, judged at its nearest existing ancestor (nothing is left
    behind: a probe file is created there and removed); None when it can."""
    existing = next(p for p in (path.parent, *path.parent.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"cannot write in {existing} ({exc.strerror or exc})"
    return None


# ---------------------------------------------------------------- one commit per stage

@dataclass
class _Commit:
    stage: str
    immediate: tuple[Path, ...]                 # resolved folders whose writes are not held back
    pending: dict[Path, Path] = field(default_factory=dict)   # final path -> complete temporary


_OPEN: list[_Commit] = []


def _holding(path: Path) -> _Commit | None:
    """The open commit that holds back the rename into `path`, if any."""
    if not _OPEN or _inside_active_temp(path):
        return None
    commit = _OPEN[-1]
    real = _real(path)
    return None if any(_within(real, root) for root in commit.immediate) else commit


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT/SIGTERM wait until the block is done, then take effect as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])


def _swap_in(pairs: list[tuple[Path, Path]]) -> None:
    """Rename every temporary onto its final path, or none: a failure puts back what was there."""
    done: list[tuple[Path, Path, Path | None]] = []
    try:
        for tmp, final in pairs:
            aside = None
            if final.is_dir() and not final.is_symlink():
                aside = _temp_sibling(final, ".old.tmp")
                _ACTIVE.add(_key(aside))
                os.replace(final, aside)
            elif final.exists() or final.is_symlink():
                aside = _temp_sibling(final, ".old.tmp")
                _ACTIVE.add(_key(aside))
                os.link(final, aside, follow_symlinks=False)  # the final path is never missing
            done.append((tmp, final, aside))
            os.replace(tmp, final)
    except BaseException:
        for tmp, final, aside in reversed(done):
            if not tmp.exists() and (final.exists() or final.is_symlink()):
                os.replace(final, tmp)
            if aside is not None:
                os.replace(aside, final)
        raise
    finally:
        for _, _, aside in done:
            if aside is not None:
                _remove(aside)
                _ACTIVE.discard(_key(aside))


@contextlib.contextmanager
def stage_commit(stage: str, *, immediate: Iterable[Path] = ()) -> Iterator[None]:
    """Hold back every atomic rename of the block, then publish them all at once on success.

    Renames into `immediate` folders (resumable checkpoints) happen at once as usual, and those
    folders are recorded as this stage's at the start. Before
    publishing, each final path must be absent or a previous output of `stage` (its folder's
    ledger says so); otherwise nothing is published and InputError names the paths.
    """
    commit = _Commit(stage, tuple(_real(Path(p)) for p in immediate))
    for folder in commit.immediate:  # written in place from now on: this stage's from now on
        folder.parent.mkdir(parents=True, exist_ok=True)
    _claim(stage, commit.immediate)
    _OPEN.append(commit)
    try:
        yield
        _OPEN.remove(commit)
        problems = [p for p in (_not_ours(stage, final) for final in commit.pending) if p]
        if problems:
            raise InputError(f"{stage}: nothing was published: " + "; ".join(problems))
        _claim(stage, commit.pending)
        with _signals_held():
            _swap_in([(tmp, final) for final, tmp in commit.pending.items()])
    finally:
        if commit in _OPEN:
            _OPEN.remove(commit)
        for tmp in commit.pending.values():
            _remove(tmp)
            _ACTIVE.discard(_key(tmp))


def _publish(tmp: Path, path: Path) -> bool:
    """Rename the complete temporary into place now, or hand it to the open commit; True if handed."""
    commit = _holding(path)
    if commit is None:
        if tmp.is_dir():
            _swap_in([(tmp, path)])
        else:
            os.replace(tmp, path)
        return False
    earlier = commit.pending.pop(path, None)
    if earlier is not None:
        _remove(earlier)
        _ACTIVE.discard(_key(earlier))
    commit.pending[path] = tmp
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only on success."""
    path = Path(path)
    _prepare(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    _ACTIVE.add(_key(tmp))
    handed = False
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes it private (0600)
        handed = _publish(tmp_path, path)
    finally:
        if not handed:
            tmp_path.unlink(missing_ok=True)
            _ACTIVE.discard(_key(tmp))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; it replaces `path` (if any) only on success.

    The previous `path` is moved aside first and put back if the final rename fails, so at
    every moment `path` holds either the complete old or the complete new contents (a
    SIGKILL between the two renames leaves no `path` and the old one under a temporary name).
    """
    path = Path(path)
    _prepare(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    _ACTIVE.add(_key(tmp))
    handed = False
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it private (0700)
        handed = _publish(tmp, path)
    finally:
        if not handed:
            shutil.rmtree(tmp, ignore_errors=True)
            _ACTIVE.discard(_key(tmp))
