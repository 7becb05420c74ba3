"""Writing files so that nothing partial is ever left behind: write to a temporary name
beside the target, rename over it when complete (a rename within one directory is atomic
on POSIX), remove the temporary on any failure."""

import contextlib
import os
import pathlib
import secrets
import shutil
import tempfile


def _temporary_name(path, suffix):
    # Hidden, unique per writer (hosts sharing a file system may reuse process ids), and
    # keeping the extension libraries key on (np.savez appends .npz; soundfile and
    # matplotlib pick the format from it).
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}")


@contextlib.contextmanager
def atomic_path(path, suffix=""):
    """Yields a temporary file path beside `path`; renamed to `path` when the block ends
    normally, removed when it raises. `suffix` is the extension the writer needs to see
    (e.g. ".npz", ".wav", ".png"). The parent directory is created."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path):
    """Yields a fresh temporary directory beside `path`; when the block ends normally it
    replaces `path` (an existing directory there is removed first), when it raises it is
    removed with everything in it."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes_atomic(path, data):
    """Writes `data` (bytes) to `path` through `atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return pathlib.Path(path)


def sha256_file(path, block=1 << 20):
    """Hex SHA-256 of a file's bytes (read in `block`-byte pieces)."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()
