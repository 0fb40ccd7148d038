"""Small file utilities shared by every stage: atomic writes and cached SHA-256 digests."""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from platformdirs import user_cache_dir

from nsds.errors import NsdsError, first_line
from nsds.progress import byte_bar, note


def cache_dir() -> Path:
    """nsds's cache folder: $NSDS_CACHE if set, else the user's cache dir."""
    return Path(os.environ.get("NSDS_CACHE") or user_cache_dir("nsds")).expanduser()


def keyed_cache_path(kind: str, key: dict[str, Any], folder: Path | None = None) -> Path:
    """Where a cached result for `key` lives: `folder` (default: the cache folder's `kind`), named by a digest
    of the key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return (folder or cache_dir() / kind) / f"{digest}.json"


def write_cache(path: Path, data: Any, what: str) -> None:
    """write_json for a cache entry; an unwritable cache is one NsdsError that says how to move it."""
    try:
        write_json(path, data)
    except OSError as err:
        raise NsdsError(
            f"cannot write the {what} '{path}': {first_line(err)}; set NSDS_CACHE to a writable folder"
        ) from None


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file through a temporary sibling and rename it, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; outputs and cached assets are ordinary files
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged(target: Path, tool: str) -> Iterator[Path]:
    """A temporary sibling of `target` for an external `tool` to write: renamed onto `target` when the block
    succeeds (an empty file is an NsdsError: the tool wrote nothing), removed whatever happens."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.fchmod(fd, 0o644)  # as atomic_write: a tool that truncates the file keeps mkstemp's 0600 otherwise
    os.close(fd)
    path = Path(name)
    try:
        yield path
        if not path.is_file() or path.stat().st_size == 0:
            raise NsdsError(f"{tool} reported success but wrote nothing to '{path}'")
        os.replace(path, target)
    finally:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A temporary sibling folder of `target` to write a command's outputs into (same filesystem, so they can
    be renamed into place by `publish`); removed with whatever is left in it when the block ends."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.nsds-"))
    folder.chmod(0o755)  # mkdtemp makes 0700, and `publish` may rename this folder into place
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def publish(staged: Path, target: Path, stale: Iterable[str]) -> list[str]:
    """Move every file and folder of `staged` into `target` (the folder itself when `target` does not exist yet)
    and remove those named in `stale` that `target` still holds from an earlier run; the names removed."""
    target = Path(target)
    if not target.exists():
        os.replace(staged, target)
        return []
    written = {path.name for path in staged.iterdir()}
    for name in sorted(written):
        if (staged / name).is_dir() and (target / name).is_dir():  # a folder output replaces the earlier one
            _remove(target / name)
        os.replace(staged / name, target / name)
    removed = [name for name in stale if name not in written and (target / name).exists()]
    for name in removed:
        _remove(target / name)
    return removed


def _remove(path: Path) -> None:
    """Delete a file or a folder with everything in it."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def copy_file(source: Path, target: Path) -> None:
    """Copy `source` to `target` atomically (large files too: streamed through a temporary sibling)."""
    with open(source, "rb") as data:
        atomic_write(target, lambda handle: shutil.copyfileobj(data, handle, 1 << 22))


def check_output_file(path: Path, option: str) -> None:
    """Fail before any work when `path` cannot be written: a folder, under a file, or read-only."""
    path = Path(path)
    if path.is_dir():
        raise NsdsError(f"{option} '{path}' is a folder; give a file name")
    _check_writable_folder(path.parent, option, path)


def check_output_folder(path: Path, option: str) -> None:
    """Fail before any work when the folder `path` cannot be created or written into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NsdsError(f"{option} '{path}' is a file; give a folder")
    _check_writable_folder(path, option, path)


def _check_writable_folder(folder: Path, option: str, target: Path) -> None:
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NsdsError(f"{option} '{target}' lies under '{existing}', which is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise NsdsError(f"{option} '{target}': no permission to write in '{existing}'")


def write_bytes(path: Path, data: bytes) -> None:
    """Atomically write `data`."""
    atomic_write(path, lambda handle: handle.write(data))


def write_json(path: Path, data: Any) -> None:
    """Atomically write `data` as indented UTF-8 JSON."""
    write_bytes(path, (json.dumps(data, indent=2, allow_nan=False) + "\n").encode())


def read_document(path: Path, schema: str, what: str, build: Callable[[dict], Any]) -> Any:
    """Read a versioned JSON document (plan, scores, results, caches) and build it, as one clear error if
    anything is off: unreadable, not JSON, another schema, or content of the wrong shape (documents.build)."""
    try:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or data.get("schema") != schema:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"schema {found!r}, expected {schema!r}")
        return build(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, NsdsError) as err:
        raise NsdsError(f"cannot read {what} file '{path}': {first_line(err)}") from None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) so repeated runs do not re-read big models."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    memo = cache_dir() / "sha256.json"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):  # a hand-edited memo is only lost work
        known = {}
    cached = known.get(key)
    if isinstance(cached, str) and len(cached) == 64 and all(c in "0123456789abcdef" for c in cached):
        return cached
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    known[key] = digest.hexdigest()
    with contextlib.suppress(OSError):  # a read-only cache must not stop scoring; the digest still returns
        write_json(memo, known)
    return known[key]


def verified(path: Path, sha256: str) -> bool:
    """Whether `path` exists and has this SHA-256 (a fetched asset kept from an earlier download)."""
    return Path(path).exists() and sha256_file(path) == sha256


def check_digest(what: str, got: str, expected: str) -> None:
    """NsdsError unless a download's SHA-256 is the pinned one."""
    if got != expected:
        raise NsdsError(f"checksum mismatch for {what}: got sha256 {got}, expected {expected}")


def download(url: str, out: IO[bytes], desc: str) -> str:
    """Stream `url` into `out` with a progress bar; its SHA-256 (hex). A network failure is an NsdsError."""
    note(f"{desc}: {url}")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            size = int(response.headers.get("Content-Length") or 0) or None
            with byte_bar(desc, size) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
    except OSError as err:
        raise NsdsError(f"cannot download {url}: {first_line(err)}") from None
    return digest.hexdigest()
