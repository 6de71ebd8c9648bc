"""manifest.json beside the shards: what produced a group dataset, and whether a rerun may extend it.

The identity (model, revision, task, prompt source, reward, sampler, k, seed, split) decides the
content of every row; its hash is the config hash. A rerun with the same identity resumes; a rerun
with another identity would mix two datasets and is refused unless the user asks to overwrite.
"""

import hashlib
import json
from pathlib import Path

MANIFEST_NAME = "manifest.json"


class ManifestMismatch(ValueError):
    pass


def config_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def file_identity(path: str | None) -> dict | None:
    """A prompt file enters the identity by content, so an edited file is a different dataset."""
    if path is None:
        return None
    data = Path(path).read_bytes() if Path(path).is_file() else b""
    return {"name": Path(path).name, "sha256": hashlib.sha256(data).hexdigest()[:16]}


def read_manifest(directory: str | Path) -> dict | None:
    path = Path(directory) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"manifest {str(path)!r} is not valid JSON ({error})") from error


def check_resumable(directory: str | Path, identity: dict) -> None:
    """Raise ManifestMismatch naming each setting that differs from the dataset already there."""
    existing = read_manifest(directory)
    if existing is None or existing.get("config_hash") == config_hash(identity):
        return
    before = existing.get("identity", {})
    changed = sorted(key for key in identity.keys() | before.keys() if before.get(key) != identity.get(key))
    details = "; ".join(f"{key}: {before.get(key)!r} -> {identity.get(key)!r}" for key in changed)
    raise ManifestMismatch(
        f"{str(directory)!r} holds a group dataset made with other settings ({details}). "
        "Use another output directory, or pass --overwrite to delete it and start again."
    )


def write_manifest(directory: str | Path, identity: dict, counts: dict, complete: bool,
                   prompt_file: str | None = None) -> dict:
    """prompt_file: where the prompt file was read (the identity holds its name and hash), for evaluations of
    its held-out split."""
    manifest = {"config_hash": config_hash(identity), "identity": identity, "counts": counts, "complete": complete,
                "prompt_file": str(Path(prompt_file).resolve()) if prompt_file else None}
    path = Path(directory) / MANIFEST_NAME
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    partial.replace(path)
    return manifest


def read_dataset_manifest(directory: str | Path) -> dict:
    """The manifest of a complete group dataset, or an error naming the directory."""
    manifest = read_manifest(directory)
    if manifest is None:
        raise FileNotFoundError(f"{str(directory)!r} holds no group dataset ({MANIFEST_NAME} is missing)")
    if not manifest.get("complete"):
        raise ValueError(f"the group dataset in {str(directory)!r} is incomplete: rerun its generation to finish it")
    return manifest
