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
import stat
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


def _writable_folders(root: Path) -> None:
    """Give the owner write and search permission on `root` and every folder under it (folders only:
    a file may be a hardlink into DVC's cache, whose mode must not change), so that a read-only
    earlier output (DVC makes linked outputs read-only) can be deleted."""
    def fix(folder: str) -> None:
        with contextlib.suppress(OSError):
            mode = stat.S_IMODE(os.lstat(folder).st_mode)
            if mode & 0o700 != 0o700:
                os.chmod(folder, mode | 0o700)

    fix(str(root))
    for folder, subfolders, _ in os.walk(root):  # top-down: each folder is fixed before it is listed
        for name in subfolders:
            if not os.path.islink(os.path.join(folder, name)):
                fix(os.path.join(folder, name))


def _remove(path: Path) -> None:
    """Delete one of this module's temporaries (or a moved-aside earlier output), read-only or not."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():  # a read-only folder inside: make the folders writable, then try again
            _writable_folders(path)
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


def _make_folders(folder: Path) -> None:
    """`mkdir -p folder`; the open commit records the folders it created, to remove them if it fails."""
    if folder.is_dir():
        return
    missing = [p for p in (folder, *folder.parents) if not (p.exists() or p.is_symlink())]
    folder.mkdir(parents=True, exist_ok=True)
    if _OPEN:
        _OPEN[-1].created.extend(reversed(missing))


def _prepare(path: Path) -> None:
    _make_folders(path.parent)
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


def _claim(stage: str, paths: Iterable[Path], record: list[tuple[Path, str | None]] | None = None) -> None:
    """Record `stage` as the writer of `paths`, before they are published (a kill in between
    then leaves a claim on an absent or already-owned path, never on someone else's file)."""
    by_folder: dict[Path, list[str]] = {}
    for path in paths:
        by_folder.setdefault(path.parent, []).append(path.name)
    for folder, names in by_folder.items():
        ledger = _read_ledger(folder)
        if all(ledger.get(name) == stage for name in names):
            continue
        if record is not None:  # what a commit changed, taken back if it fails before writing there
            record.extend((folder / name, ledger.get(name)) for name in names if ledger.get(name) != stage)
        ledger.update(dict.fromkeys(names, stage))
        _write_ledger(folder, ledger)


def _write_ledger(folder: Path, ledger: dict[str, str]) -> None:
    if not ledger:
        (folder / LEDGER).unlink(missing_ok=True)
        return
    tmp = _temp_sibling(folder / LEDGER, ".tmp")
    tmp.write_text(json.dumps(dict(sorted(ledger.items())), indent=1) + "\n")
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, folder / LEDGER)


def claim(stage: str, paths: Iterable[str | Path]) -> None:
    """Record `stage` as the writer of `paths` before writing them in place (a persistent folder's
    entries, such as train's `fold_K`); inside a commit that fails before anything was written
    there, the claim is taken back."""
    paths = [Path(p) for p in paths]
    for folder in {p.parent for p in paths}:
        _make_folders(folder)
    _claim(stage, paths, _OPEN[-1].claims if _OPEN else None)


def _unclaim(paths: Iterable[tuple[Path, str | None]]) -> None:
    """Put back each path's earlier owner (None: no entry) in its folder's ledger."""
    for path, previous in paths:
        ledger = _read_ledger(path.parent)
        if previous is None:
            ledger.pop(path.name, None)
        else:
            ledger[path.name] = previous
        with contextlib.suppress(OSError):
            _write_ledger(path.parent, ledger)


def _occupied(path: Path) -> bool:
    """True when `path` holds something: a file, a link, or a folder with entries (a ledger alone
    or an empty folder does not count)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        return True
    return path.is_dir() and any(p.name != LEDGER for p in path.iterdir())


def _ours(stage: str, path: Path) -> bool:
    """True when `stage` wrote `path`: its folder's ledger says so, or it is a folder (not a link)
    whose every entry is the stage's (its own ledger says so) or an empty folder."""
    if owner(path) == stage:
        return True
    if path.is_symlink() or not path.is_dir():
        return False
    entries = [p for p in path.iterdir() if p.name != LEDGER and not _TEMP_NAME.match(p.name)]
    return all(not _occupied(p) or _ours(stage, p) for p in entries)


def _not_ours(stage: str, path: Path) -> str | None:
    if not _occupied(path) or _ours(stage, path):
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
    writes: for a folder, the names the stage writes in it (files, or folders it replaces or writes
    files into), checked before any work like the output itself.
    """
    path: Path
    role: Role = "replace"
    writes: tuple[str, ...] = ()


def _target(path: str | Path, role: Role) -> Path:
    """Where writes to an output land, absolute: symlinks and `..` resolved as the OS will once the
    missing folders exist (`/missing/../x` is `/x`). The last name of a replaced output is kept (a
    rename replaces a link, it does not write through it); a folder written into is followed."""
    path = Path(os.path.abspath(path)) if Path(path).name in ("", ".", "..") else Path(path)
    if role != "replace" or path.name in ("", ".", ".."):
        return _real(path)
    return _real(path.parent) / path.name


def resolve(path: str | Path, role: Role = "replace") -> Path:
    """The path every check and every write uses (`_target`), resolved once before the checks.
    Relative when it lies inside the current folder, so messages keep the usual short spelling."""
    target = _target(path, role)
    here = _real(Path(os.curdir))
    if not Path(path).is_absolute() and _within(target, here):
        return Path(os.path.relpath(target, here))
    return target


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
        target = _target(out.path, out.role)  # the ownership checks judge where the writes will land
        for in_name, in_path in inputs.items():
            real_in = _real(in_path)
            if real == real_in:
                problems.append(f"output --{name} {out.path} is the input --{in_name} {in_path}")
            elif _within(real_in, real) and not (out.role == "folder" and out.writes and not any(
                    _within(real_in, _real(real / w)) for w in out.writes)):  # beside the names it writes: safe
                problems.append(f"output --{name} {out.path} contains the input --{in_name} {in_path}")
            elif _within(real, real_in) and in_name not in nest_ok:
                problems.append(f"output --{name} {out.path} lies inside the input --{in_name} {in_path}")
        for other_name, other in outputs.items():
            if other_name < name and (_within(real, _real(other.path)) or _within(_real(other.path), real)):
                problems.append(f"outputs --{other_name} {other.path} and --{name} {out.path} overlap")
        spelled = Path(out.path) if Path(out.path).is_absolute() else Path.cwd() / out.path
        shown = out.path if spelled == target else f"{out.path} (= {target})"  # a link or `..` named
        if out.role == "folder":
            if target.exists() and not target.is_dir():
                problems.append(f"output --{name} {shown} is a file, not a folder")
            else:
                problems += [f"output --{name} {p}" for p in (_not_ours(stage, target / w) for w in out.writes) if p]
        else:
            problem = _not_ours(stage, target)
            if problem:
                problems.append(f"output --{name} {problem.replace(str(target), str(shown), 1)}")
        problem = _probe_writable(target)
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
    removals: list[Path] = field(default_factory=list)        # earlier outputs that go with the commit
    created: list[Path] = field(default_factory=list)         # folders it created, parents first
    claims: list[tuple[Path, str | None]] = field(default_factory=list)  # (path, earlier owner)


_OPEN: list[_Commit] = []
_PUBLISHED: list[str] = []   # the stages whose commit this process has published


def outputs_published() -> bool:
    """True once a commit of this process has published its outputs and none is open: a signal
    arriving now finds the outputs complete."""
    return bool(_PUBLISHED) and not _OPEN


def _holding(path: Path, with_commit: bool = False) -> _Commit | None:
    """The open commit that holds back the rename into `path`, if any (`with_commit`: also inside
    its persistent folders)."""
    if not _OPEN or _inside_active_temp(path):
        return None
    commit = _OPEN[-1]
    real = _real(path)
    return None if not with_commit and any(_within(real, root) for root in commit.immediate) else commit


def atomic_remove(path: str | Path) -> None:
    """Delete an earlier output of the stage together with the open commit's renames (all or none,
    and only if its ledger says the stage wrote it); at once when no commit is open."""
    path = Path(path)
    commit = _holding(path, with_commit=True)
    if commit is None:
        _remove(path)
    elif path not in commit.removals:
        commit.removals.append(path)


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


def _swap_in(pairs: list[tuple[Path | None, Path]]) -> None:
    """Rename every temporary onto its final path (no temporary: the path is removed), or none: a
    failure puts back what was there."""
    done: list[tuple[Path | None, Path, Path | None]] = []
    try:
        for tmp, final in pairs:
            aside = None
            if tmp is None:
                if final.exists() or final.is_symlink():
                    aside = _temp_sibling(final, ".old.tmp")
                    _ACTIVE.add(_key(aside))
                    os.replace(final, aside)
                done.append((tmp, final, aside))
                continue
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
            if tmp is not None and not tmp.exists() and (final.exists() or final.is_symlink()):
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
    A commit that fails takes back what it did outside its outputs where nothing was written:
    the folders it created that are still empty, and its ledger claims on paths that hold nothing
    (a stage stopped before any work leaves no trace).
    """
    commit = _Commit(stage, tuple(_real(Path(p)) for p in immediate))
    _OPEN.append(commit)
    published = False
    try:
        for folder in commit.immediate:  # written in place from now on: this stage's from now on
            _make_folders(folder.parent)
        _claim(stage, commit.immediate, commit.claims)
        yield
        _OPEN.remove(commit)
        problems = [p for p in (_not_ours(stage, final) for final in (*commit.pending, *commit.removals)) if p]
        if problems:
            raise InputError(f"{stage}: nothing was published: " + "; ".join(problems))
        _claim(stage, commit.pending, commit.claims)
        with _signals_held():
            _swap_in([*((tmp, final) for final, tmp in commit.pending.items()),
                      *((None, gone) for gone in commit.removals)])
            _unclaim((gone, None) for gone in commit.removals)
            published = True
            _PUBLISHED.append(stage)
    finally:
        if commit in _OPEN:
            _OPEN.remove(commit)
        for tmp in commit.pending.values():
            _remove(tmp)
            _ACTIVE.discard(_key(tmp))
        if not published:
            _take_back(commit)


def _take_back(commit: _Commit) -> None:
    """After a failed commit: its claims on paths that hold nothing, and its empty new folders, go."""
    _unclaim([(path, previous) for path, previous in reversed(commit.claims) if not _occupied(path)])
    for folder in reversed(commit.created):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only an empty folder: anything written there stays


def _publish(tmp: Path, path: Path, with_commit: bool = False) -> bool:
    """Rename the complete temporary into place now, or hand it to the open commit; True if handed."""
    commit = _holding(path, with_commit)
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
def atomic_path(path: str | Path, *, with_commit: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only on success (`with_commit`:
    with the open commit's renames even inside a persistent folder, such as train's fold list)."""
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
        handed = _publish(tmp_path, path, with_commit)
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


@contextlib.contextmanager
def scratch_dir(near: str | Path) -> Iterator[Path]:
    """A private temporary folder beside `near`, deleted at the end, for a library that writes a
    folder of its own (dvclive cleans and fills its `dir`): the stage then publishes what it wants
    of it. Named like every temporary here, so a killed run's is removed by the next write."""
    near = Path(near)
    _prepare(near)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(near), suffix=".tmp", dir=near.parent))
    _ACTIVE.add(_key(tmp))
    try:
        yield tmp
    finally:
        _remove(tmp)
        _ACTIVE.discard(_key(tmp))
