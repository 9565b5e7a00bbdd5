"""Directories that appear whole or not at all, with a manifest of sizes and SHA-256 hashes.

Every writer of checkpoints and exports goes through `atomic_directory`: files are written into a
hidden sibling folder that is renamed onto the destination only when the writer succeeds, so a
crash never leaves a half-written checkpoint under the real name. `verify_manifest` detects a
truncated or corrupted one before anything is loaded from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

MANIFEST = "manifest.json"
PART_PREFIX = "manifest.rank-"


class IntegrityError(RuntimeError):
    """A directory's files do not match its manifest (missing, resized or altered)."""


@contextlib.contextmanager
def atomic_directory(dest: Path, *, described: dict | None = None) -> Iterator[Path]:
    """Yield a temporary folder; on success write its manifest and rename it to `dest`.

    `dest` may exist only as an empty folder: nothing already written is replaced. Files whose
    entries the writer puts into `described` during the block (hashed where they were written,
    e.g. by the ranks of a distributed conversion) are not hashed again.
    """
    dest = Path(dest).absolute()
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(f"{dest} exists and is not empty; choose a new output folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        write_manifest(tmp, described=described)
        if dest.exists():
            dest.rmdir()  # empty, checked above
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not _is_manifest(p.name))


def _is_manifest(name: str) -> bool:
    return name == MANIFEST or (name.startswith(PART_PREFIX) and name.endswith(".json"))


def describe(root: Path, paths: list[Path] | None = None) -> dict:
    """Manifest entries (size, SHA-256) of `paths` (default: every file) under `root`."""
    return {
        str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in (_files(root) if paths is None else paths)
    }


def write_manifest(root: Path, *, described: dict | None = None) -> dict:
    known = described or {}
    rest = [p for p in _files(root) if str(p.relative_to(root)) not in known]
    manifest = {"files": {**known, **describe(root, rest)}}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def write_manifest_part(root: Path, rank: int, world_size: int) -> None:
    """The manifest of the files one rank wrote into its own folder `root`.

    Sharded checkpoints are written by every rank into a folder of its own and merged by the
    storage layer (Ray Train uploads all ranks' folders into one); the parts, one per rank,
    together describe the merged folder.
    """
    manifest = {"files": describe(root), "rank": rank, "world_size": world_size}
    name = f"{PART_PREFIX}{rank:05d}-of-{world_size:05d}.json"
    (root / name).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _listed_files(root: Path) -> dict:
    """The files the manifest (or the complete set of manifest parts) of `root` lists."""
    if (root / MANIFEST).is_file():
        return json.loads((root / MANIFEST).read_text())["files"]
    parts = sorted(root.glob(f"{PART_PREFIX}*.json"))
    if not parts:
        raise IntegrityError(f"{root}: no {MANIFEST}; the checkpoint is incomplete or not ours")
    files: dict = {}
    world_size = json.loads(parts[0].read_text())["world_size"]
    ranks = set()
    for part in parts:
        manifest = json.loads(part.read_text())
        ranks.add(manifest["rank"])
        files.update(manifest["files"])
    missing = sorted(set(range(world_size)) - ranks)
    if missing:
        raise IntegrityError(
            f"{root}: manifests of ranks {missing} of {world_size} are missing; "
            "the checkpoint is incomplete"
        )
    return files


def manifest_sha256(root: Path) -> str:
    """SHA-256 identifying the content of `root`: of the file list (names, sizes, hashes) its
    manifest or its complete set of manifest parts holds, so both forms of one content agree."""
    listed = json.dumps(_listed_files(Path(root)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(listed.encode()).hexdigest()


def verify_manifest(root: Path) -> dict:
    """Check every file against the manifest; raise `IntegrityError` naming the first problem."""
    root = Path(root)
    files = _listed_files(root)
    for rel, meta in files.items():
        p = root / rel
        if not p.is_file():
            raise IntegrityError(f"{root}: {rel} is listed in the manifest but missing")
        if p.stat().st_size != meta["bytes"]:
            raise IntegrityError(
                f"{root}: {rel} has {p.stat().st_size} bytes, the manifest says {meta['bytes']}"
            )
        if _sha256(p) != meta["sha256"]:
            raise IntegrityError(f"{root}: {rel} does not match its SHA-256 in the manifest")
    return {"files": files}
