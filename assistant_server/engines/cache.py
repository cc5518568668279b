"""Where converted encoders live on disk, and how an entry is written so a crash leaves nothing behind.

Converting LiteMedSAM's TinyViT to OpenVINO takes minutes on a small CPU, so it is done once per set of
weights: an entry is named by the sha256 of the encoder's weights (plus what else changes the converted
graph) and holds the IR (`encoder.xml`/`encoder.bin`) and `meta.json` with the files' own sha256. An
entry is built in a temporary directory beside its final place and renamed into it, so a conversion
that is killed half-way leaves only a temporary directory, never an entry that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

META = "meta.json"


class EngineCacheError(RuntimeError):
    """A cache entry that cannot be trusted (missing file, hash mismatch, unreadable metadata)."""


def default_cache_dir() -> Path:
    """`VESSA_ENGINE_CACHE`, else ~/.cache/vessa/engines (per user: entries are large and reusable)."""
    env = os.environ.get("VESSA_ENGINE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vessa" / "engines"


def entry_name(**parts: object) -> str:
    """A directory name for one converted model: readable prefix + a digest of every part of the key."""
    text = json.dumps(parts, sort_keys=True, default=str)
    digest = hashlib.sha256(text.encode()).hexdigest()[:24]
    return f"{parts.get('engine', 'engine')}-{digest}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_meta(entry: Path, key: dict, files: list[str]) -> None:
    """Record the key and each file's sha256, last: an entry without meta.json is never read."""
    meta = {"key": key, "files": {name: file_sha256(entry / name) for name in files}}
    (entry / META).write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))


def verify_entry(entry: Path) -> dict:
    """The entry's metadata, after checking every file against its recorded sha256."""
    try:
        meta = json.loads((entry / META).read_text())
        files = dict(meta["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EngineCacheError(f"engine cache entry {entry}: unreadable {META} ({exc})") from exc
    for name, want in files.items():
        path = entry / name
        if not path.is_file() or file_sha256(path) != want:
            raise EngineCacheError(
                f"engine cache entry {entry}: {name} is missing or does not match its sha256"
            )
    return meta


def remove_entry(entry: Path) -> None:
    """Drop a bad entry so the next start converts again (best effort: another process may hold it)."""
    shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def atomic_entry(entry: Path) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it becomes `entry` by one rename. If another
    process finished the same entry first, theirs is kept (same key, same content)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent))
    try:
        yield tmp
        try:
            os.replace(tmp, entry)
        except OSError:
            if not (entry / META).is_file():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
