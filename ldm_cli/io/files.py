"""Files on disk: the one atomic-write helper (a file or a folder), the cache folder, output folders.

Atomic: everything is written under a hidden temp name in the destination's own folder, flushed to
disk, and renamed into place, so a kill at any moment leaves either the old state or the whole new
file, never a partial one. An existing destination is never replaced unless asked.
"""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ldm_cli.errors import LdmError


def cache_root() -> Path:
    """Where ldm keeps caches (latents, compiled kernels): $LDM_CACHE_DIR, or ~/.cache/ldm when it is
    unset or empty."""
    return Path(os.environ.get("LDM_CACHE_DIR") or Path.home() / ".cache" / "ldm")


def ensure_dir(out_dir: Path) -> Path:
    """Create `out_dir` if needed and prove it writable, before any work is done."""
    if out_dir.is_file():  # `-o picture.png`: the option names a folder
        raise LdmError(f"{out_dir}: is a file; --out takes a folder (images are named there by number, seed and "
                       "prompt)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not out_dir.is_dir():
            raise NotADirectoryError(20, "not a folder")
        probe = tempfile.NamedTemporaryFile(dir=out_dir, prefix=".ldm-probe-", delete=True)
        probe.close()
    except OSError as e:
        raise LdmError(f"{out_dir}: output folder is not writable ({e.strerror or type(e).__name__}); "
                       "choose another with --out") from None
    return out_dir


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: set it straight back
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Path, overwrite: bool = False, durable: bool = True):
    """Yield a temp path beside `path`; when the block ends without error, move it to `path`.

    Without `overwrite`, an existing `path` raises FileExistsError (checked by the rename itself, so
    two processes racing for one name cannot both win). On any error the temp file is removed.
    `durable`: the data reaches the disk before the rename (fsync); without it a power cut can leave an empty
    file under the name, for files whose reader checks them and can make them again (cache entries)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; a finished file gets the user's umask
    try:
        yield Path(tmp)
        if durable:
            _fsync(Path(tmp))
        if overwrite:
            os.replace(tmp, path)
        else:
            _rename_no_replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _rename_no_replace(tmp: str, path: Path) -> None:
    """Move tmp to path, raising FileExistsError if path exists (no race between check and write)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links: claim the name exclusively, then replace it
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        os.replace(tmp, path)
        return
    os.unlink(tmp)


@contextmanager
def atomic_folder(final: Path, replace: bool = False, tag: str = ""):
    """Yield an empty hidden temp folder beside `final`; when the block ends without error, rename it
    to `final`. An existing `final` raises FileExistsError unless `replace`, in which case it is renamed
    away first and deleted after the new one is in place (a kill in between leaves the new one).
    On any error the temp folder is removed. `tag` names the temp folder (`.tmp-<tag>-<pid>`)."""
    final = Path(final)
    tmp = final.parent / f".tmp-{tag or final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        for p in [*tmp.rglob("*"), tmp]:  # the rename must not reach the disk before the data does
            if p.is_file() or p == tmp:
                _fsync(p)
        if final.exists():
            if not replace:
                raise FileExistsError(17, "exists", str(final))
            old = final.parent / f".tmp-old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_folder(folder: Path) -> None:
    """Delete a folder so that a kill midway hides nothing: renamed out of its listing first."""
    doomed = folder.parent / f".tmp-delete-{folder.name}-{os.getpid()}"
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
