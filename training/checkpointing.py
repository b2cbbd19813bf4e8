"""Atomic, verifiable training checkpoints: a half-written checkpoint can never be picked up for resuming.

A checkpoint is written into a hidden temporary folder, a manifest with every file's size and SHA-256 is added last,
and only then is the folder renamed to `step-XXXXXXXX` (a rename is atomic on one file system). Resuming takes the
newest folder whose manifest matches its files, skipping (and reporting) any that do not.
"""

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from accelerate import Accelerator

logger = logging.getLogger(__name__)
MANIFEST = "manifest.json"
PREFIX = "step-"


def checkpoint_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step:08d}"


def temporary_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f".tmp-{PREFIX}{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def finalize(tmp: Path, final: Path, step: int) -> Path:
    """Seal a fully written temporary checkpoint: manifest last, then the atomic rename."""
    files = {
        str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(tmp.rglob("*"))
        if p.is_file()
    }
    write_json_atomic(tmp / MANIFEST, {"step": step, "files": files})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def verify(folder: Path) -> str | None:
    """None if `folder` is a complete checkpoint, else the reason it is not."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest (incomplete write)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as error:
        return f"unreadable manifest ({error})"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            return f"file {name} does not match its manifest (corrupted)"
    return None


def latest_complete(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`; broken ones are logged and skipped."""
    candidates = sorted(Path(root).glob(f"{PREFIX}*"), reverse=True) if Path(root).is_dir() else []
    for folder in candidates:
        problem = verify(folder)
        if problem is None:
            return folder
        logger.warning("skipping checkpoint %s: %s", folder, problem)
    return None


def prune(root: str | Path, keep: int) -> None:
    """Delete all but the `keep` newest complete checkpoints (and stale temporary folders)."""
    root = Path(root)
    for stale in root.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    complete = [f for f in sorted(root.glob(f"{PREFIX}*"), reverse=True) if (f / MANIFEST).is_file()]
    for old in complete[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def save(accelerator: Accelerator, root: Path, step: int, batches, keep: int) -> None:
    """Model, optimizer, scheduler, RNG states, EMA teacher and DINO centres (model buffers) and each rank's data
    position (`batches.state_dict()`), sealed atomically by the main process once every rank has written its part."""
    tmp, final = temporary_dir(root, step), checkpoint_dir(root, step)
    accelerator.save_state(str(tmp))
    tmp.mkdir(parents=True, exist_ok=True)
    write_json_atomic(tmp / f"data_state_rank{accelerator.process_index}.json", {"step": step, **batches.state_dict()})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finalize(tmp, final, step)
        prune(root, keep)
    accelerator.wait_for_everyone()


def resume(accelerator: Accelerator, root: Path, batches) -> int:
    """Restore the newest complete checkpoint under `root` and this rank's data position; returns its step."""
    folder = latest_complete(root)
    if folder is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {root}")
    accelerator.load_state(str(folder))
    data_state = json.loads((folder / f"data_state_rank{accelerator.process_index}.json").read_text())
    batches.load_state_dict(data_state)
    logger.info("resumed from %s (step %d)", folder, data_state["step"])
    return int(data_state["step"])
