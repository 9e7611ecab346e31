"""Folder writes that never lose anything: the guard before a folder is replaced, hidden work names, the atomic
commit, recovery after a crash, the removal of killed runs' leftovers, and SIGTERM handled like Ctrl-C.

Used by dataset.py (datasets and DIR/packs, through TokenizedWriter and write_packs) and by the pre-tokenization
and packing drivers. Imports neither numpy nor torch.

Work names. A run writing OUT builds the new folder in a hidden sibling `.OUT.tmp-HOST-PID-XXXXXXXX`; on a file
system without an atomic exchange the previous folder waits for a moment as `.OUT.old-HOST-PID-XXXXXXXX`. HOST and
PID say whose it is: `sweep_stale(OUT)` (run when a writer of OUT starts) removes those of processes that are dead
on this host, and leaves those of a live run, and of another host, alone. Names from earlier versions of this
toolkit (`.OUT.tmp-XXXXXXXX`, no owner) are removed once untouched for an hour.

Commit (`replace_dir`). The finished temp folder replaces OUT in one step: on Linux renameat2(RENAME_EXCHANGE)
swaps the two folders atomically (ext4, xfs, btrfs, tmpfs, ...), so OUT exists at every moment and holds either
the old or the new complete folder; a crash leaves at most a hidden leftover for the next sweep. Where the
exchange is not supported (NFS, macOS) it falls back to two renames, OUT aside to `.OUT.old-*` and the new one in;
a crash between them leaves no OUT but a complete `.OUT.old-*`, which the next reader or writer renames back
(`recover_dir`; a reader waits a few seconds for a live writer to finish instead).

Guard (`foreign_entries`). Replacing a folder deletes what it held, so only a folder that is provably one of ours
may be replaced: its meta.json carries our format name, and it holds nothing but our own file names (and our
work names). Anything else is refused by the callers with the list of the foreign entries.

Disk trouble (`write_failure_message`, `writable_problem`): a write that fails for lack of space, a file-size limit
or a read-only folder becomes one message saying what failed, where, how much space it needed and what is intact;
an unwritable output folder is found before any work.

Readers (`FolderReader`) open a folder once and read every file relative to that descriptor, so a commit that
swaps in a new folder meanwhile cannot mix files of two versions; `changed()` tells the caller to reopen.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import signal
import socket
import stat
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"
LEGACY_STALE_S = 3600  # unowned work names (earlier versions) count as stale once untouched this long
RECOVER_WAIT_S = 5.0  # how long a reader waits for a live writer between its two renames


# ----------------------------------------------------------------------------------------------
# Work names
# ----------------------------------------------------------------------------------------------

def work_name(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """A hidden sibling of `path` owned by this process: `.NAME.KIND-HOST-PID-XXXXXXXX` (kind: tmp | old)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{kind}-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def parse_work_name(name: str, base: str) -> dict | None:
    """{kind, host, pid} of a work name of `base` (host and pid None for the unowned names of earlier versions)."""
    m = re.fullmatch(rf"\.{re.escape(base)}\.(tmp|old)-(?:(.+)-(\d+)-)?[0-9a-f]{{8}}", name)
    if m is None:
        return None
    return {"kind": m.group(1), "host": m.group(2), "pid": int(m.group(3)) if m.group(3) else None}


def owner_alive(host: str | None, pid: int | None) -> bool:
    """Whether the process that owns a work name may still be running (unknown owners: another host's, alive)."""
    if pid is None or host != HOST:
        return host is not None
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _newest_mtime(path: Path) -> float:
    times = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        times += [p.lstat().st_mtime for p in path.iterdir()]
    return max(times)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _size(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(p.lstat().st_size for p in path.rglob("*"))
    return path.lstat().st_size


def sweep_stale(path: str | os.PathLike) -> list[tuple[Path, int]]:
    """Remove the work folders and files that dead runs left beside `path` (after recovering `path` if a crash left
    it missing). Returns (removed path, bytes) pairs."""
    path = Path(os.path.realpath(path))
    recover_dir(path, wait_s=0)
    removed = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        w = parse_work_name(p.name, path.name)
        if w is None:
            continue
        try:
            if w["pid"] is None:  # an earlier version's: an old copy next to its folder, or untouched for an hour
                stale = (w["kind"] == "old" and path.exists()) or time.time() - _newest_mtime(p) > LEGACY_STALE_S
            else:
                stale = not owner_alive(w["host"], w["pid"])
            if stale:
                size = _size(p)
                _remove(p)
                removed.append((p, size))
        except OSError:
            continue  # gone meanwhile, or not ours to remove: leave it
    return removed


def describe_removed(removed: list[tuple[Path, int]]) -> str:
    names = ", ".join(p.name for p, _ in removed[:5]) + (", ..." if len(removed) > 5 else "")
    return (f"removed {len(removed)} temp folder(s) left by killed runs ({sum(n for _, n in removed) / 1e6:.1f} MB): "
            f"{names}")


# ----------------------------------------------------------------------------------------------
# Commit and recovery
# ----------------------------------------------------------------------------------------------

_RENAME_EXCHANGE, _AT_FDCWD = 2, -100
_renameat2: Any = None


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE). False where the system or
    the file system does not support it; other failures raise OSError."""
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _renameat2 = fn
            except (OSError, AttributeError):
                pass
    if not _renameat2:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_dir(tmp_dir: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Put the finished folder `tmp_dir` (a sibling of out_dir) in place as `out_dir`, replacing an older one.

    Atomic where the file system can exchange two names (see the module docstring): out_dir never stops existing
    and a crash at any moment leaves the old or the new complete folder. Elsewhere a crash between the two renames
    of the fallback leaves the old folder as `.NAME.old-*`, which recover_dir() restores. A symlinked out_dir is
    written through (its target is replaced, the link stays)."""
    tmp_dir, out_dir = Path(tmp_dir), Path(os.path.realpath(out_dir))
    if not os.path.lexists(out_dir):
        os.rename(tmp_dir, out_dir)
    elif exchange(tmp_dir, out_dir):
        shutil.rmtree(tmp_dir, ignore_errors=True)  # now the previous folder
    else:
        old = work_name(out_dir, "old")
        os.rename(out_dir, old)
        try:
            os.rename(tmp_dir, out_dir)
        except BaseException:
            if not os.path.lexists(out_dir):
                os.rename(old, out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out_dir.parent)


def recover_dir(path: str | os.PathLike, wait_s: float = RECOVER_WAIT_S) -> bool:
    """If `path` is missing because a fallback commit was cut between its two renames, rename the hidden old copy
    back (the newest, if a dead run left several). A live writer's copy is waited for up to wait_s seconds: it is
    about to put the new folder in place. True when `path` exists afterwards."""
    path = Path(os.path.realpath(path))
    deadline = time.monotonic() + wait_s
    while not os.path.lexists(path):
        try:
            olds = [(p, parse_work_name(p.name, path.name)) for p in path.parent.iterdir()]
        except OSError:
            return False
        olds = [(p, w) for p, w in olds if w and w["kind"] == "old"]
        dead = [p for p, w in olds if not owner_alive(w["host"], w["pid"])]
        if dead:
            try:
                os.rename(max(dead, key=lambda p: p.lstat().st_ctime), path)
            except OSError:
                pass  # someone else recovered it, or the writer finished
            break
        if not olds or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return os.path.lexists(path)


# ----------------------------------------------------------------------------------------------
# Small atomic files, the guard, reading
# ----------------------------------------------------------------------------------------------

def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to `path` through a temp file and a rename: readers never see half a file. (The temp name stays
    `.NAME.tmp-XXXXXXXX`: main.py's output-folder check knows it as another rank's file being written.)"""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def foreign_entries(folder: Path, fmt: str, names: set[str], subfolders: dict | None = None) -> list[str] | None:
    """What in `folder` is not ours: None when its meta.json does not carry the format name `fmt` (the folder is
    not ours at all), else the foreign entries' names (subfolders checked alike, `{name: (fmt, names)}`); [] = ours.
    Our own work names (of the listed files and subfolders) are ours too."""
    subfolders = subfolders or {}
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        return None
    foreign = []
    for p in sorted(folder.iterdir()):
        plain = not p.is_symlink()
        if p.name in names and plain and p.is_file():
            continue
        if p.name in subfolders and plain and p.is_dir():
            inner = foreign_entries(p, *subfolders[p.name])
            foreign += [f"{p.name}/"] if inner is None else [f"{p.name}/{n}" for n in inner]
            continue
        if any(parse_work_name(p.name, base) for base in (*names, *subfolders)):
            continue
        foreign.append(p.name + ("/" if p.is_dir() and plain else ""))
    return foreign


def replace_problem(folder: str | os.PathLike, what: str, fmt: str, names: set[str],
                    subfolders: dict | None = None) -> str | None:
    """Why `folder` may not be replaced by a new `what` (None: it does not exist, is empty, or is provably ours)."""
    folder = Path(os.path.realpath(folder))
    if not os.path.lexists(folder):
        return None
    if not folder.is_dir():
        return f"{folder} exists and is not a folder"
    if not any(folder.iterdir()):
        return None
    foreign = foreign_entries(folder, fmt, names, subfolders)
    if foreign is None:
        return f"{folder} exists and is not a {what} (no meta.json of format {fmt!r})"
    if foreign:
        listed = ", ".join(foreign[:10]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 10 else "")
        return f"{folder} is a {what} but also holds files that are not part of it: {listed}"
    return None


def folder_identity(path: str | os.PathLike, fd: int | None = None) -> tuple | None:
    """(device, inode) of the folder (through `fd` when given, else the path) and of its meta.json; None when the
    folder is missing. Two calls give the same value only for the same version of a folder that commits replace."""
    try:
        st = os.fstat(fd) if fd is not None else os.stat(path)
    except OSError:
        return None
    try:
        meta = os.stat("meta.json", dir_fd=fd) if fd is not None and os.stat in os.supports_dir_fd \
            else os.stat(Path(path) / "meta.json")
        meta_id = (meta.st_dev, meta.st_ino)
    except OSError:
        meta_id = None
    return (st.st_dev, st.st_ino, meta_id)


class FolderReader:
    """Reads the files of one folder through a descriptor opened once (where the system allows it), so every file
    comes from the same version of the folder even while a commit swaps a new one in."""

    def __init__(self, path: str | os.PathLike, parent: "FolderReader | None" = None):
        self.path = Path(path)
        self.fd = None
        if os.open in os.supports_dir_fd and hasattr(os, "O_DIRECTORY"):
            at = parent.fd if parent is not None else None
            name = self.path.name if at is not None else self.path
            try:
                self.fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=at)
            except (FileNotFoundError, NotADirectoryError):
                self.fd = None

    def _where(self, name: str) -> tuple[str | Path, dict]:
        return (name, {"dir_fd": self.fd}) if self.fd is not None else (self.path / name, {})

    def exists(self) -> bool:
        return self.fd is not None or self.path.is_dir()

    def size(self, name: str) -> int | None:
        """Byte size of a regular file in the folder, None if there is none."""
        where, kw = self._where(name)
        try:
            st = os.stat(where, **kw)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def open(self, name: str):
        where, kw = self._where(name)
        return os.fdopen(os.open(where, os.O_RDONLY, **kw), "rb")

    def read_text(self, name: str) -> str:
        with self.open(name) as f:
            return f.read().decode("utf-8")

    def identity(self) -> tuple | None:
        """What tells this version of the folder from any other: (device, inode) of the folder and of its
        meta.json (written last by every commit, so a new version never shares it). None where unknown."""
        return folder_identity(self.path, self.fd)

    def changed(self) -> bool:
        """Whether the path now names another folder than the one read (a commit replaced it)."""
        if self.fd is None:
            return False
        try:
            now, then = os.stat(self.path), os.fstat(self.fd)
        except OSError:
            return True
        return (now.st_dev, now.st_ino) != (then.st_dev, then.st_ino)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ----------------------------------------------------------------------------------------------
# Disk trouble: what failed, where, how much space it needed, what is intact
# ----------------------------------------------------------------------------------------------

WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.EFBIG: "a file reached the file-size limit of this process (ulimit -f)",
                errno.EROFS: "the file system is read-only", errno.EACCES: "no permission to write there",
                errno.EPERM: "no permission to write there"}
# what libraries that hide the errno say (torch.save: "PytorchStreamWriter failed writing file ...: file write
# failed"; safetensors: "Error while serializing: IoError(...)"; both end up here as RuntimeError / other types)
WRITE_FAILURE_TEXT = ("No space left on device", "File too large", "Disk quota exceeded", "Read-only file system",
                      "file write failed", "PytorchStreamWriter failed", "failed writing file", "IoError")


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n} TB"


def _write_error(e: BaseException | None) -> BaseException | None:
    """The exception in e's chain that is a failed write (an OSError with a disk errno, or a library's write error
    that names one), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            return e
        if not isinstance(e, OSError) and any(t in str(e) for t in WRITE_FAILURE_TEXT):
            return e
        e = e.__cause__ or e.__context__
    return None


def _existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_failure_message(e: BaseException, what: str, where: str | os.PathLike, needed: int | None = None,
                          intact: str = "") -> str | None:
    """One paragraph for a write that failed for lack of space, a file-size limit, a read-only or forbidden folder
    (None when `e` is no such failure: the caller re-raises it): what failed and on which file, why, how much space
    the whole write needs (`needed` bytes, when known) against what is free there, the file-size limit when one is
    set, and what is intact (`intact`, e.g. "the previous dataset in DIR is intact")."""
    err = _write_error(e)
    if err is None:
        return None
    import resource  # POSIX only, like the rest of the commit machinery

    file = getattr(err, "filename", None)
    if isinstance(err, OSError):
        detail = f"{WRITE_ERRNOS[err.errno]} ([Errno {err.errno}] {err.strerror}{f': {file}' if file else ''})"
    else:
        detail = f"the write failed ({str(err).strip().splitlines()[0][:300]})"
    parts = [f"{what} failed: {detail}"]
    try:
        free = shutil.disk_usage(_existing(Path(where))).free
        parts.append((f"it needs about {human_bytes(needed)}, " if needed else "") +
                     f"{human_bytes(free)} are free on that file system")
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        parts.append(f"files of this process may not grow past {human_bytes(soft)} (ulimit -f {soft // 1024}); "
                     f"raise it with `ulimit -f unlimited`")
    if isinstance(err, OSError) and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        parts.append("write somewhere this user may write")
    return "; ".join(parts) + (f". {intact}" if intact else ".")


@contextmanager
def write_failures_reported(what: str, where: str | os.PathLike, intact: str, needed=lambda: None):
    """Inside the block, a write that fails for disk reasons becomes a UserError with write_failure_message's
    paragraph (`needed`: a callable giving the bytes the whole write needs, when known); other errors, Ctrl-C and
    SIGTERM pass through. Put it outside the writer, whose own exit removes the unfinished copy first."""
    from longsft.errors import UserError

    try:
        yield
    except (KeyboardInterrupt, SystemExit, UserError):
        raise
    except BaseException as e:
        message = write_failure_message(e, what, where, needed(), intact)
        if message is None:
            raise
        raise UserError(message) from None


def writable_problem(path: str | os.PathLike, setting: str) -> str | None:
    """Why nothing can be created in the folder `path` (it, or its nearest existing parent, is read-only or not
    writable by this user), or None; `setting` names what the user gave (e.g. "--output_dir out"). Checked before
    work starts, so a run does not fail at its end."""
    base = _existing(Path(path))
    if not base.is_dir() or os.access(base, os.W_OK | os.X_OK):
        return None
    try:
        read_only = bool(os.statvfs(base).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        read_only = False
    why = "is on a read-only file system" if read_only else "is not writable by this user"
    return f"{setting}: {base} {why}, so nothing can be written there; choose a folder you can write"


# ----------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------

class Terminated(SystemExit):
    """Raised in the main thread by SIGTERM / SIGHUP inside `signals_as_exit()`; exit status 128 + signal."""


@contextmanager
def signals_as_exit(signals=("SIGTERM", "SIGHUP")):
    """Inside the block, SIGTERM (and SIGHUP) raise Terminated like Ctrl-C raises KeyboardInterrupt, so the usual
    cleanup (temp folders removed, the old output kept) runs instead of the process dying on the spot."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        print(f"\n{signal.Signals(signum).name}: stopping, removing the unfinished output", file=sys.stderr,
              flush=True)
        raise Terminated(128 + signum)

    previous = {}
    for name in signals:
        sig = getattr(signal, name, None)
        if sig is not None:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def default_signals(signals=("SIGTERM", "SIGHUP")) -> None:
    """Back to the default action (for forked worker processes, which have nothing to clean up)."""
    for name in signals:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_DFL)
