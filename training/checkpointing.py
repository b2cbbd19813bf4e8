"""Atomic, verifiable training checkpoints: a half-written checkpoint can never be picked up for resuming.

A checkpoint is written into a hidden temporary folder, a manifest with every file's size and SHA-256 is added last,
and only then is the folder renamed to `step-XXXXXXXX` (a rename is atomic on one file system). Resuming takes the
newest folder whose manifest matches its files, skipping (and reporting) any that do not.

Nothing in a checkpoint is unpickled: the model is safetensors, the optimizer is read with `torch.load(weights_only=True)`
(Accelerate), and the scheduler, data positions, training settings and Python/NumPy random states are JSON, the torch
random states safetensors. Anyone who can write the folder can reseal its manifest, so a folder holding a pickle file
(`*.pkl`) is refused outright.
"""

import hashlib
import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from training.config import PretrainConfig, settings_changed_on_resume

logger = logging.getLogger(__name__)
MANIFEST = "manifest.json"
PREFIX = "step-"
SCHEDULER = "scheduler.json"
SETTINGS = "training_config.json"
LEFTOVER_PREFIXES = (".tmp-", ".trash-")  # half-written and half-deleted checkpoints


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


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` so that a kill at any moment leaves either the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True))


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
        expected = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        return f"unreadable manifest ({type(error).__name__}: {error})"
    if not expected:
        return "the manifest lists no files"
    for name, (size, digest) in expected.items():
        path = folder / name
        if not path.resolve().is_relative_to(folder.resolve()):
            return f"the manifest names a file outside the checkpoint ({name})"
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != size or _sha256(path) != digest:
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


def _delete(folder: Path) -> None:
    """Rename first (atomic), then delete: a kill mid-way leaves a `.trash-` folder, never a half-deleted checkpoint
    under its real name; `remove_leftovers` finishes the job on the next start."""
    trash = folder.with_name(f".trash-{folder.name}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_leftovers(root: str | Path) -> None:
    """Delete the temporary and half-deleted folders a killed run left behind."""
    for prefix in LEFTOVER_PREFIXES:
        for stale in Path(root).glob(f"{prefix}{PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)


def prune(root: str | Path, keep: int) -> None:
    """Delete all but the `keep` newest complete checkpoints (and leftovers of killed runs)."""
    root = Path(root)
    remove_leftovers(root)
    complete = [f for f in sorted(root.glob(f"{PREFIX}*"), reverse=True) if (f / MANIFEST).is_file()]
    for old in complete[keep:]:
        _delete(old)


def drop_after(root: str | Path, step: int) -> None:
    """Delete the checkpoints written after `step`: resuming from an earlier checkpoint abandons them, and a later
    plain `--resume` must not pick them up."""
    for folder in sorted(Path(root).glob(f"{PREFIX}*")):
        number = folder.name[len(PREFIX) :]
        if number.isdigit() and int(number) > step:
            _delete(folder)


def _rng_state_file(folder: Path, rank: int) -> Path:
    return folder / f"rng_state_rank{rank}.safetensors"


def _data_state_file(folder: Path, rank: int) -> Path:
    return folder / f"data_state_rank{rank}.json"


def save_rng_state(folder: Path, rank: int) -> dict:
    """Write this rank's torch (CPU and CUDA) random states as safetensors; return Python's and NumPy's as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, _rng_state_file(folder, rank))
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
    }


def load_rng_state(folder: Path, rank: int, values: dict) -> None:
    tensors = load_file(_rng_state_file(folder, rank))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count())])
    version, internal, gauss = values["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = values["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))


def save(
    accelerator: Accelerator, root: Path, step: int, batches, scheduler, config: PretrainConfig, keep: int
) -> None:
    """Model (with the EMA teacher and DINO centres as buffers) and optimizer through Accelerate; the scheduler, the
    training settings, and each rank's data position and random states as JSON/safetensors. Sealed atomically by the
    main process once every rank has written its part."""
    tmp, final = temporary_dir(root, step), checkpoint_dir(root, step)
    rank = accelerator.process_index
    accelerator.save_state(str(tmp))
    (tmp / f"random_states_{rank}.pkl").unlink(missing_ok=True)  # Accelerate's pickle: replaced by ours below
    rng = save_rng_state(tmp, rank)
    write_json_atomic(_data_state_file(tmp, rank), {"step": step, **batches.state_dict(), "rng": rng})
    if accelerator.is_main_process:
        write_json_atomic(tmp / SCHEDULER, scheduler.state_dict())
        write_json_atomic(tmp / SETTINGS, {**config.to_dict(), "num_processes": accelerator.num_processes})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finalize(tmp, final, step)
        prune(root, keep)
    accelerator.wait_for_everyone()


def find(source: Path) -> Path:
    """The checkpoint to resume from: `source` itself when it is a `step-*` folder (it must be complete), else the
    newest complete one under it."""
    if source.name.startswith(PREFIX):
        problem = verify(source) if source.is_dir() else "no such folder"
        if problem is not None:
            raise ValueError(f"--resume {source}: not a usable checkpoint ({problem})")
        return source
    folder = latest_complete(source)
    if folder is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {source}")
    return folder


def resume(accelerator: Accelerator, source: Path, batches, scheduler, config: PretrainConfig) -> int:
    """Restore a checkpoint (see `find`) and this rank's data position and random states; returns its step. Refuses
    a checkpoint holding pickles or written with other settings (see `settings_changed_on_resume`)."""
    folder = find(Path(source))
    pickles = sorted(p.name for p in folder.rglob("*.pkl"))
    if pickles:
        raise ValueError(f"--resume {folder}: refusing a checkpoint that holds pickle files {pickles}")
    if not (folder / SETTINGS).is_file():
        raise ValueError(f"--resume {folder}: the checkpoint holds no {SETTINGS} (written by an older version)")
    saved = json.loads((folder / SETTINGS).read_text())
    changes = settings_changed_on_resume(saved, {**config.to_dict(), "num_processes": accelerator.num_processes})
    if changes:
        raise ValueError(
            f"--resume {folder}: the checkpoint was written with other settings: {'; '.join(changes)}. "
            "Resume with the checkpoint's settings, or start a new run"
        )
    try:
        accelerator.load_state(str(folder))
    except pickle.UnpicklingError as error:  # `weights_only=True` met something other than tensors and numbers
        raise ValueError(f"--resume {folder}: refusing unsafe content in the optimizer state ({error})") from None
    scheduler.load_state_dict(json.loads((folder / SCHEDULER).read_text()))
    data_state = json.loads(_data_state_file(folder, accelerator.process_index).read_text())
    batches.load_state_dict(data_state)
    load_rng_state(folder, accelerator.process_index, data_state["rng"])
    logger.info("resumed from %s (step %d)", folder, data_state["step"])
    return int(data_state["step"])
