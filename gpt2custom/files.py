"""Small file helpers every script shares: atomic writes with the usual permissions, the datasets builder for a
local data file's suffix, and the lock that keeps two runs out of one output."""

import fcntl
import json
import os
import tempfile
from pathlib import Path

FILE_MODE = 0o644  # what a plain open() gives under the usual umask; mkstemp's 0600 would hide outputs from others

# A local data file's suffix -> the `datasets` builder that reads it (load_dataset(builder, data_files=...)).
DATA_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def builder_for(path: "str | Path", allowed: "tuple[str, ...] | None" = None) -> str:
    """The datasets builder for `path`'s suffix; ValueError naming the file and the suffixes accepted otherwise.
    `allowed` narrows the suffixes (a reader that cannot use plain text, say)."""
    suffixes = allowed or tuple(DATA_BUILDERS)
    suffix = Path(path).suffix
    if suffix not in suffixes:
        raise ValueError(f"{path}: expected a {'/'.join(suffixes)} file")
    return DATA_BUILDERS[suffix]


class Lock:
    """An flock held on an open file or folder until close() or the end of the process, however it ends."""

    def __init__(self, fd: int):
        self.fd = fd

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def exclusive_lock(path: "str | Path", other: str = "another --output") -> Lock:
    """Hold `path` for the life of the returned Lock, so that two runs never write the same output (each would
    overwrite the other's files, or pay for its prompts). `path` is a lock file (created), or an existing folder,
    locked as it is: nothing is written into it. `other` says how to give the second run an output of its own."""
    path = Path(path)
    if path.is_dir():
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"another run holds {path}: wait for it to finish, or give this one {other}") from None
    return Lock(fd)


def write_atomic(path: "str | Path", data: "str | bytes", mode: int = FILE_MODE) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename: a reader sees the old file or
    the new one, never a part. The file gets `mode` (0644: readable by all, like the other outputs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: "str | Path", payload) -> Path:
    return write_atomic(path, json.dumps(payload, indent=2) + "\n")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def model_tokenizer(name_or_path: "str | Path | None" = None, **kwargs):
    """The tokenizer a model folder or Hub repo carries; GPT-2's own (offline) for None or a local folder saved
    without tokenizer files (a bare weights folder). The one fallback the scripts share."""
    from .tokenizer import load_tokenizer

    folder = Path(name_or_path) if name_or_path is not None else None
    if folder is None or (folder.is_dir() and not any((folder / f).exists() for f in TOKENIZER_FILES)):
        return load_tokenizer()
    return load_tokenizer(str(name_or_path), **kwargs)
