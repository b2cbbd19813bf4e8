"""Preparing the pretraining sources as sharded parquet datasets: the shared fault-tolerant pipeline and the CLI.

    python -m processing.prepare mimic-cxr --root /data/mimic-cxr-jpg --reports /data/mimic-cxr-reports \
        --out data/mimic --records-per-shard 256
    python -m processing.prepare bimcv --root /data/bimcv/covid19_posi --translations en.json --out data/bimcv
    python -m processing.prepare ct-rate --root /data/CT-RATE/dataset --out data/ct-rate --num-proc 8

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
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from modeling_unimedi.volume_processing_unimedi import UniMedIVolumeProcessor, load_ct

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
    # instead of inheriting the parent's torch/OpenMP/arrow thread state (fork) or re-importing it each (spawn). This
    # module itself is not preloaded: under `python -m processing.prepare` workers run it afresh as their __main__.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([ct_record.__module__, load_ct.__module__])
    with ProcessPoolExecutor(num_proc, mp_context=context, initializer=_single_threaded_worker) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _single_threaded_worker() -> None:
    """num_proc workers each decoding one volume on one thread use the cores without oversubscribing them."""
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


def load_ct_record(candidate: CTCandidate) -> dict:
    """Decode a NIfTI CT, reorient it exactly to the canonical orientation, convert to HU, resample to the grid."""
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


# --- command line ----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m processing.prepare", description=__doc__.split("\n\n")[0])
    datasets = parser.add_subparsers(dest="dataset", required=True)

    mimic = _add_dataset(datasets, "mimic-cxr", "MIMIC-CXR-JPG 2.0.0 frontal X-rays with MIMIC-CXR reports", 256)
    mimic.add_argument("--reports", required=True, type=Path, help="folder of mimic-cxr-reports (holds files/p10/...)")
    mimic.add_argument(
        "--max-side", type=int, default=512, help="downscale X-rays whose longer side exceeds this (0 keeps originals)"
    )

    bimcv = _add_dataset(datasets, "bimcv", "BIMCV-COVID19+ chest CTs with their (translated) reports", 32)
    bimcv.add_argument("--translations", type=Path, help="English reports keyed by report id (.json, .csv or .tsv)")
    bimcv.add_argument(
        "--keep-spanish", action="store_true", help="keep reports without a translation in Spanish (opt-in)"
    )
    bimcv.add_argument("--validation-fraction", type=float, default=0.05, help="share of subjects for validation")
    bimcv.add_argument("--test-fraction", type=float, default=0.0, help="share of subjects for test")

    ct_rate = _add_dataset(datasets, "ct-rate", "CT-RATE chest CTs with English reports", 32)
    ct_rate.add_argument(
        "--intensity",
        choices=("raw", "hu"),
        default="raw",
        help="raw: NIfTIs hold stored values, apply the metadata CSV's RescaleSlope/Intercept (first release); "
        "hu: NIfTIs already hold HU (CT-RATE v2)",
    )
    return parser


def _add_dataset(datasets, name: str, help_text: str, records_per_shard: int) -> argparse.ArgumentParser:
    parser = datasets.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("--root", required=True, type=Path, help="dataset folder (layout: processing/README.md)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the parquet shards and the summary")
    parser.add_argument("--records-per-shard", type=int, default=records_per_shard)
    parser.add_argument("--num-proc", type=int, default=1, help="processes decoding images/volumes")
    parser.add_argument("--overwrite", action="store_true", help="replace shards of an earlier run in --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    # The readers build on this module's pipeline, so they are imported once it is defined.
    from . import bimcv, ct_rate, mimic_cxr

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    options = {"num_proc": args.num_proc}
    if args.dataset == "mimic-cxr":
        splits = mimic_cxr.SPLITS
        options.update(max_side=args.max_side)

        def read_split(split, log):
            return mimic_cxr.read_mimic_cxr(args.root, args.reports, split, log=log, **options)

    elif args.dataset == "bimcv":
        splits = bimcv.SPLITS
        translator = bimcv.translations_from_file(args.translations) if args.translations else None
        options.update(
            keep_spanish=args.keep_spanish,
            validation_fraction=args.validation_fraction,
            test_fraction=args.test_fraction,
        )

        def read_split(split, log):
            return bimcv.read_bimcv(args.root, split, translator=translator, log=log, **options)

    else:
        splits = ct_rate.SPLITS
        options.update(intensity=args.intensity)

        def read_split(split, log):
            return ct_rate.read_ct_rate(args.root, split, log=log, **options)

    description = {"dataset": args.dataset, "root": str(args.root), "options": {**options, **_inputs(args)}}
    summary = prepare(
        read_split,
        splits,
        args.out,
        records_per_shard=args.records_per_shard,
        description=description,
        overwrite=args.overwrite,
    )
    print(json.dumps({key: summary[key] for key in ("kept", "dropped", "shards")}, indent=2))
    if summary["kept_total"] == 0:
        print(f"no record was kept; see {args.out / SUMMARY_FILE}", file=sys.stderr)
        return 1
    return 0


def _inputs(args: argparse.Namespace) -> dict:
    """Extra input files of a run, recorded in the summary so a dataset can be traced to what built it."""
    return {name: str(getattr(args, name)) for name in ("reports", "translations") if getattr(args, name, None)}


if __name__ == "__main__":
    # Run the package's copy of this module, the one the readers and the worker processes import.
    from processing.prepare import main as package_main

    sys.exit(package_main())
