"""The one writer for every output: checked before the work, atomic, and never losing a finished result.

* `check_writable` / `check_csv_appendable` run before a command starts its work, so a bad path
  fails in a second, not after an hour of training or benching.
* Every file is written to a temp file beside it and renamed (`atomic_write_files`); a temp name
  carries the writer's pid, so `clean_stray_temps` can remove those of writers that died.
* `append_csv_row` rewrites the file atomically with the new row, and only a CSV with the same
  header (a half-written or foreign file is refused, never appended to).
* `deliver` writes a command's results; when a write fails anyway (disk full), the content goes
  to a rescue file (or stdout) and the one error line says where.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rcdeploy.errors import UsageError

RESCUE_DIR_ENV = "RCDEPLOY_RESCUE_DIR"  # where results go when their own path cannot be written
MAX_CSV_BYTES = 256 << 20  # a bench CSV is rewritten whole on every append
STRAY_AGE_S = 600.0  # a dead writer's temp outside a locked folder is removed once this old
_TEMP = re.compile(r"^\..+\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")  # .NAME.PID.RANDOM.tmp


def reason(e: BaseException) -> str:
    """An OSError as its short human reason ('No space left on device'), anything else as its first line."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    first = str(e).strip().splitlines()
    return first[0] if first else type(e).__name__


# ------------------------------------------------------------------------------------------ atomic


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB blocks; OSError propagates."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_files(files: dict[Path, bytes]) -> None:
    """Write every file to a temp file beside it, then rename them all; on failure remove the temps.

    All temps are complete before the first rename, so a failure while writing leaves every
    existing file untouched.
    """
    temps: list[tuple[str, Path]] = []
    umask = os.umask(0)
    os.umask(umask)
    try:
        for path, data in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            clean_stray_temps(path.parent)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
            temps.append((tmp, path))
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; written files should look like any other
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for tmp, path in temps:
            os.replace(tmp, path)
    finally:
        for tmp, _ in temps:
            Path(tmp).unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    atomic_write_files({Path(path): data})
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _age(entry: os.DirEntry) -> float:
    try:
        return time.time() - entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


def clean_stray_temps(folder: str | Path, *, all_temps: bool = False, min_age_s: float = STRAY_AGE_S) -> list[Path]:
    """Remove temp files (.NAME.PID.X.tmp) that writers killed mid-write left in `folder`.

    Only temps whose writer is gone (and older than `min_age_s`, in case the folder is shared with
    another machine, whose pids mean nothing here) are removed, so a concurrent writer is never
    disturbed; `all_temps` removes every `.*.tmp` at once (for a folder this process holds the lock of,
    such as a run folder).
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(".tmp")) or entry.is_dir(follow_symlinks=False):
            continue
        m = _TEMP.match(entry.name)
        stale = m and int(m["pid"]) != os.getpid() and not _alive(int(m["pid"])) and _age(entry) > min_age_s
        if all_temps or stale:
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


# ---------------------------------------------------------------------------------- before the work


def check_writable(path: str | Path, label: str) -> Path:
    """Fail now, with one line, if `path` cannot be written later (folder, read-only, not a directory)."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{label} {p} is a folder; pass a file name, e.g. {label} {p / 'out.json'}")
    folder = p.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"cannot write {label} {p}: {existing} is a file, not a folder")
    if existing == folder:
        _probe(folder, f"{label} {p}")
    elif not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {label} {p}: cannot create folders in {existing} (permission denied)")
    return p


def check_folder_writable(folder: str | Path, label: str) -> Path:
    """Create `folder` if needed and prove a file can be made in it."""
    f = Path(folder)
    try:
        f.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot write to {label} {f}: {reason(e)}") from None
    _probe(f, f"to {label} {f}")
    return f


def _probe(folder: Path, what: str) -> None:
    """Create and remove a temp file: the only check that also sees read-only mounts and root squash."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".write-test.{os.getpid()}.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UsageError(f"cannot write {what}: {reason(e)}") from None


# --------------------------------------------------------------------------------------------- CSV


def csv_text(header: Sequence[str], rows: Sequence[dict[str, Any]], *, with_header: bool) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(header), extrasaction="raise", restval="")
    if with_header:
        w.writeheader()
    for row in rows:
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def _existing_csv(p: Path, header: Sequence[str], label: str) -> bytes:
    """The bytes of a CSV that may be appended to (b'' when new or empty); anything else is refused."""
    if not p.exists():
        return b""
    if not p.is_file():
        raise UsageError(f"{label} {p} is not a regular file; pass a CSV file name")
    if p.stat().st_size > MAX_CSV_BYTES:
        raise UsageError(f"{label} {p} is over {MAX_CSV_BYTES >> 20} MiB; start a new CSV file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {label} {p} ({reason(e)})") from None
    if not data:
        return b""
    try:
        first = next(csv.reader(io.StringIO(data.decode("utf-8"))), [])
    except (UnicodeDecodeError, csv.Error):
        first = None
    if first != list(header):
        from rcdeploy.validate import shown

        head = data.split(b"\n", 1)[0][:60].decode("utf-8", "replace")
        raise UsageError(f"{label} {p} is not a CSV with this command's columns (its first line is {shown(head)}); "
                         "rows are appended only to a file written by the same command: pass a new file name")
    if not data.endswith(b"\n"):
        raise UsageError(f"{label} {p} ends in an incomplete row; fix or move the file, then run again")
    return data


def check_csv_appendable(path: str | Path, header: Sequence[str], label: str) -> Path:
    p = check_writable(path, label)
    _existing_csv(p, header, label)
    return p


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Serialize read-modify-write of `path` across processes (an flock on the file itself)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process exclusion, the write is still atomic
        yield
        return
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)  # read-only suffices for flock
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # A writer may have renamed a new file over the one we locked: lock that one instead.
            if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
                yield
                return
        finally:
            os.close(fd)


def append_csv_row(path: str | Path, header: Sequence[str], row: dict[str, Any], label: str) -> Path:
    """Append one row: the whole file is rewritten to a temp file and renamed, so no reader or crash
    ever sees half a row; a file that is not a CSV with exactly `header` is refused."""
    p = Path(path)
    existed = p.exists()
    with _exclusive(p):
        old = _existing_csv(p, header, label)
        try:
            new = csv_text(header, [row], with_header=not old).encode()
            atomic_write_bytes(p, old + new)
        except BaseException:
            if not existed and p.exists() and p.stat().st_size == 0:
                p.unlink()  # the empty file the lock created
            raise
    return p


# ------------------------------------------------------------------------------------------ deliver


@dataclass
class Pending:
    """One output of a command: how to write it, and what to save elsewhere if that fails."""

    label: str  # the option that named it, e.g. "--json"
    path: Path
    write: Callable[[], Any]
    rescue: bytes  # standalone content (a whole JSON report, a header + row CSV)


def rescue(data: bytes, name: str) -> str:
    """Save `data` where it can be found, and say where: the rescue folder, else stdout."""
    folder = Path(os.environ.get(RESCUE_DIR_ENV) or tempfile.gettempdir())
    target = folder / f"rcdeploy-rescued-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{name}"
    try:
        with open(target, "xb") as f:
            f.write(data)
        return f"it was saved to {target} instead"
    except OSError:
        try:
            target.unlink(missing_ok=True)
        except OSError:
            pass
        sys.stdout.write(data.decode("utf-8", "replace"))
        sys.stdout.flush()
        return "it was printed to stdout instead"


def deliver(outputs: Sequence[Pending]) -> None:
    """Write every output; those that fail are rescued, and one UsageError line names each failure."""
    failures = []
    for out in outputs:
        try:
            out.write()
        except (OSError, UsageError) as e:
            failures.append(f"cannot write {out.label} {out.path} ({reason(e)}); {rescue(out.rescue, out.path.name)}")
    if failures:
        raise UsageError("; ".join(failures))
