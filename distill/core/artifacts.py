"""Artifact layout and atomic writes: a file is either complete under its name or absent.

Run folder::

    runs/<name>/
      recipe.yaml                resolved recipe of the whole run
      generate/ shards/part-*.parquet, shards.json, dataset/{train,eval}.parquet, distill_config.json
      train/    model/ (save_pretrained), loss.json, distill_config.json
      export/   bundle/ (model.onnx, model.<preset>.onnx, tokenizer, distill_generation.json), distill_config.json
      eval/     <model>.jsonl per-example outputs, distill_config.json
      report.md, metrics.json, plots/*.png
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path

import yaml

# The resolved config beside each artifact; not "config.json", which model folders already use.
CONFIG_FILE = "distill_config.json"


# Mode a new artifact is created with; the kernel takes the process umask off it (0644 under 022).
FILE_MODE = 0o666
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


def _open_temp(path: Path) -> tuple[int, str]:
    """Create a new, uniquely named temp file beside ``path``; returns (fd, its name).

    Not ``tempfile.mkstemp``: that creates files 0600 whatever the umask, and the rename carried that
    mode onto every artifact, so a bundle was unreadable to a container running as another user.
    ``os.open(..., FILE_MODE)`` lets the kernel apply the process umask (and a folder's default ACL)
    at creation: 0666 & ~umask, the mode ``open()`` gives any file. The umask is never read or
    changed here, so there is no race with other threads, and a umask set later is honoured.
    The name is ``.<name>.<random>.tmp``, which the CLI recognises to name the folder on a failed write.
    """
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, _TEMP_FLAGS, FILE_MODE), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp file name beside {path}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync, then rename over it.

    The file gets ordinary permissions (0666 & ~umask), and missing folders 0777 & ~umask (what
    ``mkdir`` gives), so artifacts are readable by others under the usual umask 022."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _open_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_config(folder: Path, stage: str, section: dict, recipe: dict) -> None:
    """Every artifact folder carries the resolved config that produced it."""
    write_json(folder / CONFIG_FILE, {"stage": stage, "stage_config": section, "recipe": recipe})


def write_recipe(path: Path, recipe: dict) -> None:
    write_text(path, yaml.safe_dump(recipe, sort_keys=False))


def write_parquet(path: Path, table) -> str:
    """Write a pyarrow table atomically; returns its sha256."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


class ShardWriter:
    """Buffers rows and commits them as Parquet shards; ``manifest`` (a JSON file outside the shard
    folder, so the folder reads as one Parquet dataset) lists the committed shards and their hashes."""

    def __init__(self, folder: Path, manifest: Path, schema, rows_per_shard: int = 64):
        self.folder = folder
        self.manifest = manifest
        self.schema = schema
        self.rows_per_shard = rows_per_shard
        self.buffer: list = []
        self.shards: list[dict] = []
        folder.mkdir(parents=True, exist_ok=True)

    def resume(self) -> list:
        """Adopt shards committed by an earlier (killed) run; returns their tables.

        A shard whose bytes no longer match its manifest checksum is dropped (and deleted), so its
        rows are produced again instead of trusted.
        """
        import pyarrow.parquet as pq

        if not self.manifest.exists():
            return []
        tables = []
        for shard in json.loads(self.manifest.read_text())["shards"]:
            f = self.folder / shard["file"]
            if f.exists() and hashlib.sha256(f.read_bytes()).hexdigest() == shard["sha256"]:
                self.shards.append(shard)
                tables.append(pq.read_table(f))
            elif f.exists():
                f.unlink()
        listed = {s["file"] for s in self.shards}
        for f in self.folder.glob("part-*.parquet"):
            if f.name not in listed:  # renamed into place, but the manifest write never happened
                f.unlink()
        # Renumber nothing: new shards continue after the highest committed index.
        self._next = max((int(s["file"][5:10]) for s in self.shards), default=-1) + 1
        write_json(self.manifest, {"shards": self.shards})
        return tables

    def add(self, table) -> None:
        self.buffer.append(table)
        if sum(t.num_rows for t in self.buffer) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if not self.buffer:
            return
        table = pa.concat_tables(self.buffer).cast(self.schema)
        self.buffer = []
        index = getattr(self, "_next", len(self.shards))
        self._next = index + 1
        name = f"part-{index:05d}.parquet"
        digest = write_parquet(self.folder / name, table)
        self.shards.append({"file": name, "rows": table.num_rows, "sha256": digest})
        write_json(self.manifest, {"shards": self.shards})

    def close(self) -> list[dict]:
        self.flush()
        write_json(self.manifest, {"shards": self.shards})
        return self.shards
