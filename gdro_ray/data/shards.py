"""Parquet shards of group rows: written all-or-nothing, listed for resume, read back with checks.

A shard is named by the prompt ids it holds, so a retried batch (an actor that died after writing)
rewrites the same file instead of adding a second copy; it becomes visible only by an atomic rename,
so a killed writer leaves no half-written shard behind.
"""

import hashlib
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gdro_ray.data.records import GROUP_SCHEMA

SHARD_GLOB = "group-*.parquet"


def write_shard(rows: list[dict], directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ids = sorted(row["prompt_id"] for row in rows)
    name = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:20]
    final = directory / f"group-{name}.parquet"
    partial = directory / f".{final.name}.{uuid.uuid4().hex}.tmp"
    pq.write_table(pa.Table.from_pylist(rows, schema=GROUP_SCHEMA), partial)
    os.replace(partial, final)
    return final


def shard_paths(directory: str | Path) -> list[Path]:
    return sorted(Path(directory).glob(SHARD_GLOB))


def remove_partial_shards(directory: str | Path) -> None:
    for leftover in Path(directory).glob(".group-*.tmp"):
        leftover.unlink(missing_ok=True)


def written_prompt_ids(directory: str | Path) -> set[str]:
    """The prompt ids already stored, reading only that column of each shard."""
    written: set[str] = set()
    for path in shard_paths(directory):
        written.update(_read(path, columns=["prompt_id"]).column("prompt_id").to_pylist())
    return written


def read_shards(directory: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Every group of a dataset directory as one table; each prompt id once."""
    paths = shard_paths(directory)
    if not paths:
        raise FileNotFoundError(f"no group shards ({SHARD_GLOB}) in {str(directory)!r}")
    table = pa.concat_tables([_read(path, columns) for path in paths])
    if columns is None or "prompt_id" in columns:
        ids = table.column("prompt_id").to_pylist()
        if len(ids) != len(set(ids)):
            raise ValueError(f"dataset {str(directory)!r} holds some prompt ids more than once")
    return table


def _read(path: Path, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns, schema=GROUP_SCHEMA)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(
            f"shard {str(path)!r} is corrupt or not a gdro-ray group shard ({error}); "
            "delete it and rerun the generation to regenerate its prompts"
        ) from error
