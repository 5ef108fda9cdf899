"""Output directories that never lose a user's data.

Every command that writes a directory goes through `atomic_output_dir`:
- OUT may not be, contain or lie inside any of the command's inputs (symlinks resolved), nor be the
  working directory or one of its parents: `--force` must never be able to delete a model or data set;
- `--force` replaces only an earlier awaker output (it holds the marker file `.awaker-output`);
- one writer per OUT: an exclusive lock beside it (`.OUT.lock`, holding the writer's pid), released on
  exit and by the kernel when the process dies;
- the result is built in `.OUT.partial-PID-XXXX` and renamed into place at the end; temporaries left by
  killed awaker processes (their pid no longer runs) are removed at the next write to the same parent.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..errors import AwakerError

MARKER = ".awaker-output"  # in every finished output: --force may replace a directory that holds it
PARTIAL_MARKER = ".awaker-partial"  # in every temporary: the cleaner removes only directories awaker made
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)-[0-9a-f]+$")


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def check_not_an_input(out: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an OUT that equals, contains or lies inside one of the inputs (files or directories)."""
    target = _resolved(out)
    for source in inputs:
        if source is None:
            continue
        src = _resolved(source)
        if target == src:
            raise AwakerError(f"{out}: is the input {source} itself; write the result to a new directory")
        if target in src.parents:
            raise AwakerError(f"{out}: contains the input {source}; write the result to a new directory")
        if src in target.parents:
            raise AwakerError(f"{out}: lies inside the input {source}; write the result elsewhere")


def is_awaker_output(path: Path) -> bool:
    return (path / MARKER).is_file()


def check_output_dir(out: str | Path, force: bool = False, inputs: Iterable[str | Path | None] = ()) -> None:
    """Before any work: OUT is new or empty, or (with --force) an earlier awaker output that is no input."""
    out = Path(out).expanduser()
    check_not_an_input(out, inputs)
    cwd = Path.cwd().resolve()
    if _resolved(out) == cwd or _resolved(out) in cwd.parents:  # replacing it would pull the floor away
        raise AwakerError(f"{out}: is the working directory or one of its parents; write to a new directory")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not force:
        raise AwakerError(f"{out}: already exists and is not empty (use --force to replace an earlier awaker "
                          "output)")
    if not out.is_dir() or not is_awaker_output(out):
        raise AwakerError(f"{out}: is not an awaker output (no {MARKER} in it); --force replaces only what "
                          "awaker wrote: choose another directory or remove it yourself")


def write_marker(directory: Path, what: str) -> None:
    from .. import __version__

    # no timestamp: the same command writes the same bytes
    (directory / MARKER).write_text(json.dumps({"written_by": f"awaker {__version__}", "what": what}) + "\n")


# -- one writer per output ---------------------------------------------------------------------------
@contextlib.contextmanager
def output_lock(out: Path):
    """An exclusive lock on OUT (a file `.OUT.lock` beside it, removed on release). fcntl locks die with
    their process, so a killed writer never leaves OUT locked. Hand-written rather than the filelock
    package: the file holds the writer's pid (so the refusal can name it) and is removed on release, with
    the inode check that makes removal safe."""
    out = _resolved(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = path.read_text().strip() if path.exists() else ""
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise AwakerError(f"{out}: awaker {who} is writing it right now; wait for it to finish or choose "
                              "another output") from None
        try:  # a releasing holder may have removed the file between our open and lock: lock the new one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


# -- temporaries -------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temporaries(parent: Path, say=None) -> list[str]:
    """Remove the temporaries that killed awaker processes left in `parent`: a `.partial` is deleted; an
    `.old` (a previous output moved aside just before the new one took its place) goes back to its name
    if that name is empty, else it is deleted."""
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        match = _TEMP_NAME.match(entry.name)
        if not match or not entry.is_dir() or entry.is_symlink() or _alive(int(match["pid"])):
            continue
        if not ((entry / PARTIAL_MARKER).is_file() or (entry / MARKER).is_file()) and any(entry.iterdir()):
            continue  # not made by awaker (or not recognisably): leave it alone
        final, kept = parent / match["name"], entry / match["name"]
        if match["kind"] == "old" and kept.is_dir() and not final.exists():
            os.replace(kept, final)
            removed.append(f"{entry.name} (the earlier {final.name} put back)")
        else:
            removed.append(entry.name)
        shutil.rmtree(entry, ignore_errors=True)
    if removed and say is not None:
        say(f"removed {len(removed)} leftover temporar{'y' if len(removed) == 1 else 'ies'} of a killed awaker "
            f"run in {parent}: {', '.join(removed)}")
    return removed


def _temporary(parent: Path, name: str, kind: str) -> Path:
    path = parent / f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir(mode=0o777)  # the umask applies, as for any directory the user creates
    (path / PARTIAL_MARKER).write_text(f"{os.getpid()}\n")
    return path


def _honour_umask(directory: Path) -> None:
    """Give the output the permissions any file the user creates gets: some writers (safetensors via
    transformers) make their files 0600 whatever the umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(directory, 0o777 & ~mask)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _notice(message: str) -> None:
    from ..progress import stderr

    stderr.print(f"[yellow]note:[/] {message}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, force: bool = False, inputs: Iterable[str | Path | None] = (),
                      what: str = "model"):
    """Yield a temporary sibling directory; on success it replaces `out`, on any error it is removed,
    so `out` is either untouched or complete. `inputs`: every path the command reads (models, bases,
    data files); `out` may not be, contain or lie inside any of them. `what` is recorded in the marker."""
    inputs = [i for i in inputs if i is not None]
    check_output_dir(out, force, inputs)
    out = _resolved(out)  # a symlink OUT: its target is what gets replaced (and was checked above)
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        remove_stale_temporaries(parent, say=_notice)
        check_output_dir(out, force, inputs)  # again, now that no other awaker writer can race us
        tmp = _temporary(parent, out.name, "partial")
        try:
            yield tmp
            (tmp / PARTIAL_MARKER).unlink()
            write_marker(tmp, what)
            _honour_umask(tmp)
            if out.exists():
                check_output_dir(out, force, inputs)  # something (not awaker) may have created it meanwhile
                old = _temporary(parent, out.name, "old")
                os.replace(out, old / out.name)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def check_free_space(directory: str | Path, needed: int, what: str) -> None:
    """Refuse up front when the filesystem of `directory` (or its nearest existing parent) has less free
    space than `needed` bytes (plus 1% and 64 MB of headroom)."""
    probe = _resolved(directory)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed * 1.01 + 64e6 > free:
        raise AwakerError(f"{directory}: {what} needs {needed / 1e9:.2f} GB, only {free / 1e9:.2f} GB free on "
                          f"that filesystem")
