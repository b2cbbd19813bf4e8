"""The shared fault-tolerant pipeline every dataset reader builds on, and what a reader gives the CLI
(``processing.prepare``) to be run from the command line.

Every reader works in two steps: a cheap *index* (CSV/TSV tables, report text, file names) that runs in this process
and filters samples by content (lateral views, short reports, ...), then a *load* step that decodes pixels (JPEG,
NIfTI) in a process pool. A file that fails to load is logged with its reason, counted and skipped; the counts by
reason and the list of failed files are written next to the shards as ``prepare_summary.json``. Layouts: README.md.
"""

import argparse
import json
import logging
import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from modeling_unimedi.loading_unimedi import load_ct
from modeling_unimedi.volume_processing_unimedi import UniMedIVolumeProcessor

from .schema import ct_record
from .shards import write_shards

LOGGER = logging.getLogger(__name__)
SUMMARY_FILE = "prepare_summary.json"
MISSING_FILE = "missing_file"
UNREADABLE_FILE = "unreadable_file"
FILE_ERRORS = (MISSING_FILE, UNREADABLE_FILE)


@dataclass(frozen=True)
class Drop:
    """One sample (or candidate file) left out, and why; ``reason`` is a short key counted in the summary."""

    sample_id: str
    reason: str
    file: str = ""
    detail: str = ""


@dataclass
class PrepareLog:
    """Kept records by split and dropped samples by reason, so nothing leaves a run uncounted."""

    kept: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    file_errors: list[Drop] = field(default_factory=list)

    def keep(self, record: dict) -> None:
        self.kept[record["split"]] += 1

    def drop(self, drop: Drop) -> None:
        self.dropped[drop.reason] += 1
        if drop.reason in FILE_ERRORS:
            self.file_errors.append(drop)
            LOGGER.warning("skipped %s (%s): %s: %s", drop.file, drop.sample_id, drop.reason, drop.detail)
        else:
            LOGGER.debug("dropped %s: %s %s", drop.sample_id, drop.reason, drop.detail)

    def summary(self) -> dict:
        return {
            "kept": dict(self.kept),
            "kept_total": sum(self.kept.values()),
            "dropped": dict(sorted(self.dropped.items())),
            "dropped_total": sum(self.dropped.values()),
            "file_errors": [asdict(drop) for drop in self.file_errors],
        }


def load_records(load: Callable, candidates: Iterable, log: PrepareLog, num_proc: int = 1) -> Iterator[dict]:
    """Records from ``load(candidate)`` in candidate order, decoded by ``num_proc`` processes when above one.

    Candidates need ``sample_id``, ``split`` and ``file`` attributes. A candidate whose load raises is logged as a
    ``Drop`` naming its file instead of stopping the run; memory stays bounded by a small window of pending loads.
    """
    for record, drop in _ordered_map(partial(_attempt, load), candidates, num_proc):
        if record is None:
            log.drop(drop)
        else:
            log.keep(record)
            yield record


def _attempt(load: Callable, candidate) -> tuple[dict | None, Drop | None]:
    """``load(candidate)``, or the reason it failed: a corrupt file may raise anything inside a decoder."""
    try:
        return load(candidate), None
    except FileNotFoundError as error:
        return None, Drop(candidate.sample_id, MISSING_FILE, error.filename or str(candidate.file), str(error))
    except Exception as error:  # noqa: BLE001 - one corrupt file must not end a multi-hour run
        return None, Drop(
            candidate.sample_id, UNREADABLE_FILE, str(candidate.file), f"{type(error).__name__}: {error}"
        )


def _ordered_map(function: Callable, items: Iterable, num_proc: int) -> Iterator:
    """``map`` over a process pool with at most ``2 * num_proc`` items in flight, results in input order."""
    if num_proc <= 1:
        yield from map(function, items)
        return
    # forkserver: workers fork from a clean server that imported the heavy decoder stack (torch, transformers) once,
    # instead of inheriting the parent's torch/OpenMP/arrow thread state (fork) or re-importing it each (spawn).
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([ct_record.__module__, load_ct.__module__])
    with ProcessPoolExecutor(num_proc, mp_context=context, initializer=single_threaded_worker) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def single_threaded_worker() -> None:
    """Pool initializer: num_proc workers on one torch thread each use the cores without oversubscribing them (and
    a forked one never enters an OpenMP pool inherited from its parent)."""
    import torch

    torch.set_num_threads(1)


def read_table(path: Path, columns: tuple[str, ...], sep: str = ",") -> pd.DataFrame:
    """The ``columns`` of a CSV/TSV (plain or compressed) as strings, "" for empty cells; errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, usecols=lambda column: column in columns)
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ValueError(f"{path} lacks the columns {missing}")
    return table


# --- CT volumes (BIMCV, CT-RATE) -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CTCandidate:
    """One CT to decode: everything except the voxels is known from the index."""

    sample_id: str
    split: str
    source: str
    file: Path
    report: str
    metadata: dict
    spacing: tuple[float, float, float] | None = None  # mm along the file's voxel axes, replacing the header's
    rescale: tuple[float, float] | None = None  # (slope, intercept) from stored values to HU when not stored as HU


# Depth slabs whose native slices a CT record stores: the paper-size grid's 32 slices over ViT-B's 3D patch depth 4,
# the slabs pretraining selects from with `pseudo_image_source="native"` (§3.2).
NATIVE_SLABS = 8


def load_ct_record(candidate: CTCandidate) -> dict:
    """Decode a NIfTI CT, reorient it exactly to the canonical orientation, convert to HU, resample to the grid, and
    keep each depth slab's native-resolution image at the 2D input size (`slab_images`: the mean of its native slices,
    the volume processor's default `slab_image_reduction`)."""
    ct = load_ct(nifti_with_geometry(candidate.file, candidate.spacing))
    if candidate.rescale is not None:
        slope, intercept = candidate.rescale
        ct = replace(ct, hu=ct.hu * np.float32(slope) + np.float32(intercept))
    processor = UniMedIVolumeProcessor()
    return ct_record(
        sample_id=candidate.sample_id,
        source=candidate.source,
        split=candidate.split,
        report=candidate.report,
        volume=processor.resample_to_grid(ct),
        spacing=processor.grid_spacing(ct),
        metadata={**candidate.metadata, "file": candidate.file.name, "source_shape": list(ct.hu.shape)},
        slab_images=processor.native_slab_images(ct, NATIVE_SLABS),
    )


def nifti_with_geometry(path: Path, spacing: tuple[float, float, float] | None = None):
    """The NIfTI image at ``path``, refusing one whose header does not say how its axes lie in the patient.

    Without a qform/sform code, nibabel falls back to a guessed affine and "canonical orientation" would be a guess.
    ``spacing`` (mm along the voxel axes i, j, k) replaces the header's voxel size and keeps its axis directions.
    """
    image = nib.load(path)
    if image.header["qform_code"] == 0 and image.header["sform_code"] == 0:
        raise ValueError(
            f"{path}: the NIfTI header has neither qform nor sform, so the patient orientation is unknown"
        )
    if spacing is None:
        return image
    directions = image.affine[:3, :3] / np.sqrt((image.affine[:3, :3] ** 2).sum(axis=0))
    affine = image.affine.copy()
    affine[:3, :3] = directions * np.asarray(spacing, dtype=np.float64)
    return nib.Nifti1Image(image.dataobj, affine, image.header)


# --- writing a dataset -----------------------------------------------------------------------------------------------


def prepare(
    read_split: Callable[[str, PrepareLog], Iterable[dict]],
    splits: Iterable[str],
    out_dir: str | os.PathLike,
    *,
    records_per_shard: int,
    description: dict,
    overwrite: bool = False,
) -> dict:
    """Write ``read_split(split, log)`` of every split as shards in ``out_dir`` and the run summary next to them.

    Splits are written one after another in the given order (list the small ones first: a configuration problem then
    surfaces before the long pass). Returns the summary also written to ``prepare_summary.json``.
    """
    out_dir = Path(out_dir)
    _claim_output_dir(out_dir, overwrite)
    log = PrepareLog()
    shards = {}
    for split in splits:
        shards[split] = len(write_shards(read_split(split, log), out_dir, split, records_per_shard))
        LOGGER.info("%s: %d records in %d shards", split, log.kept[split], shards[split])
    summary = {**description, "records_per_shard": records_per_shard, "shards": shards, **log.summary()}
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _claim_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Shards of an earlier run would silently mix with the new ones: refuse them, or delete them on request."""
    old = sorted([*out_dir.glob("*.parquet"), *out_dir.glob(SUMMARY_FILE)]) if out_dir.is_dir() else []
    if old and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds {len(old)} shard/summary files (e.g. {old[0].name}); "
            "pass --overwrite to replace them or choose another --out"
        )
    for path in old:
        path.unlink()


# --- a reader's entry in the command line ----------------------------------------------------------------------------

SplitReader = Callable[[str, PrepareLog], Iterable[dict]]  # (split, log) -> that split's records


@dataclass(frozen=True)
class DatasetCommand:
    """What ``python -m processing.prepare <name>`` needs from a reader; a new reader defines one and the CLI lists it.

    ``add_arguments`` adds the reader's own options (the CLI adds --root, --out, --records-per-shard, --num-proc and
    --overwrite to every dataset); ``open_reader(args)`` returns the options to record in the summary and the
    ``SplitReader`` of the run. ``input_files`` names the options holding extra input files, recorded in the summary
    so a dataset can be traced to what built it.
    """

    name: str
    help: str
    splits: tuple[str, ...]
    records_per_shard: int
    add_arguments: Callable[[argparse.ArgumentParser], None]
    open_reader: Callable[[argparse.Namespace], tuple[dict, SplitReader]]
    input_files: tuple[str, ...] = ()
