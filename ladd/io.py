"""Atomic outputs: a stage either replaces its output whole or leaves the previous one untouched."""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ladd.errors import Busy, DataError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temp path beside `path`; on success it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: outputs get the modes the user's umask gives
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def clear_leftovers(path: str | Path) -> None:
    """What a killed `atomic_dir` of `path` left: a swap stopped between its two renames is undone (the previous
    output back in place) and its temp folders (`.<name>.*.tmp`) are removed. Call it as the output's one writer."""
    path = Path(path)
    restore_interrupted_swap(path)
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield an empty temp dir beside `path`; on success it replaces `path` (old one removed last). Leftovers of a
    killed earlier run go first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore_interrupted_swap(path: str | Path) -> None:
    """Undo half of a `replace_dir` killed between its two renames: `path` gone, its old copy beside it."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir():
        os.replace(old, path)


def replace_dir(new: str | Path, path: str | Path) -> None:
    """Put directory `new` in the place of `path` by renames (the old one is removed last)."""
    new, path = Path(new), Path(path)
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def exclusive(path: str | Path, busy: str | None = None):
    """Hold `<path>.lock` (flock) for the block: a second run writing the same output fails at once (Busy, saying
    `busy` or that `path` is being written) instead of interleaving with the first; the lock goes with its
    process however that ends (SIGKILL included)."""
    import fcntl

    lock = Path(f"{path}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise Busy(
                f"{busy or f'{path} is being written by another run'} (pid {holder}, {lock}): wait for it "
                "to end, or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def save_tensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with its I/O failures (disk full, file size limit) raised as OSError naming
    the file, like any other write."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as e:  # SafetensorError: one type for every failure
        if "I/O error" not in str(e):
            raise
        raise OSError(f"cannot write {path}: {e}") from None
    canonicalize_safetensors(path)
    os.chmod(path, 0o666 & ~_umask())  # a large file is written anew (0600): the modes the user's umask gives


def canonicalize_safetensors(path: str | Path) -> None:
    """Rewrite a safetensors file's header with its `__metadata__` in sorted key order. safetensors writes the
    metadata from a hash map whose order changes from process to process, so with two or more metadata keys the
    same tensors hash differently run to run (and DVC sees a new output). The header keeps its length (the same
    entries, reordered), so only its bytes are rewritten, in place: no second copy of a large file."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        metadata = header.pop("__metadata__", None)
        if not metadata or len(metadata) < 2:
            return
        text = json.dumps(
            {"__metadata__": dict(sorted(metadata.items())), **header}, separators=(",", ":"), ensure_ascii=False
        ).encode()
        if len(text) > size:  # never seen: serde_json and json write these strings alike
            raise ValueError(f"{path}: its safetensors header cannot be rewritten in place")
        f.seek(8)
        f.write(text + b" " * (size - len(text)))  # safetensors pads headers with spaces


def _builtin(value):
    """numpy scalars/arrays (as GX and metrics return them) -> Python numbers/lists; anything else -> str."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def write_json(path: str | Path, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_builtin) + "\n")


def fingerprint(*paths: str | Path) -> str:
    """sha256 over the bytes of files (directories: every file, in sorted order), first 16 hex digits."""
    h = hashlib.sha256()
    for root in map(Path, paths):
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            h.update(f.relative_to(root).as_posix().encode() if root.is_dir() else f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def file_md5(path: str | Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dvc_md5s(folder: str | Path) -> dict[str, str]:
    """The hash DVC 3 gives `folder` ("", what dvc.lock records for it) and each folder directly in it (by name),
    computed without DVC: the md5 of the folder's files' sorted JSON list [{"md5", "relpath"}], and ".dir". Each
    file is read once, a chunk at a time."""
    folder = Path(folder)
    files = {f.relative_to(folder).as_posix(): file_md5(f) for f in folder.rglob("*") if f.is_file()}

    def digest(prefix: str) -> str:
        entries = [
            {"md5": md5, "relpath": rel[len(prefix) :]} for rel, md5 in sorted(files.items()) if rel.startswith(prefix)
        ]
        return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"

    return {"": digest(""), **{d.name: digest(d.name + "/") for d in folder.iterdir() if d.is_dir()}}


_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)  # UTF-32 LE starts like UTF-16 LE


def read_text(path: str | Path, encoding: str = "auto") -> str:
    """A text file in `encoding`, or with `auto` UTF-8/16/32 by its byte-order mark, else strict UTF-8; DataError
    naming the line and byte that do not decode."""
    data = Path(path).read_bytes()
    if encoding == "auto":
        encoding = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line} (byte {e.start}) is not {encoding} text: save the table as UTF-8, or "
            "set prepare.encoding to its encoding (latin-1, cp1252...)"
        ) from None
