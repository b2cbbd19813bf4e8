"""BIMCV-COVID19+ chest CTs with their session reports, as UniMedI records (one CT series per imaging session).

The reports are Spanish while the text encoder (BioClinicalBERT) is English, so every report needs an English
translation (the UniMedI authors translated them with GPT-4): a callable ``translator(report_id, spanish) -> str`` or
a translations file (``translations_from_file``). A report without one stops the run with an error naming the report
id, unless ``keep_spanish=True`` knowingly keeps it in Spanish. BIMCV ships no train/test partition: subjects are
split by a hash of their id. Assumed layout and its sources: processing/README.md.
"""

import argparse
import ast
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib

from modeling_unimedi.report_processing_unimedi import (
    MIN_REPORT_SENTENCES,
    clean_report,
    count_sentences,
    report_text,
)

from .pipeline import (
    MISSING_FILE,
    UNREADABLE_FILE,
    CTCandidate,
    DatasetCommand,
    Drop,
    PrepareLog,
    load_ct_record,
    load_records,
    read_table,
)

SOURCE = "bimcv"
SPLITS = ("validation", "test", "train")
CT_PATTERNS = ("mod-*/*_ct.nii.gz", "mod-*/*_ct.nii")
# Scouts/localisers are 1-3 slices; the thickest usable chest CTs (10 mm slices over ~30 cm) still have ~30.
MIN_CT_SLICES = 20
SESSIONS_COLUMNS = ("session_id", "medical_evaluation")

Translator = Callable[[str, str], str | None]  # (report id, Spanish report) -> English report, or None if unknown


def read_bimcv(
    root: str | os.PathLike,
    split: str,
    *,
    translator: Translator | None = None,
    keep_spanish: bool = False,
    log: PrepareLog | None = None,
    num_proc: int = 1,
    validation_fraction: float = 0.05,
    test_fraction: float = 0.0,
) -> Iterator[dict]:
    """Records of one split, CTs decoded by ``num_proc`` processes.

    The split's reports are all resolved (and translated) before the first CT is decoded, so a missing translation
    fails the run at its start rather than hours in.
    """
    log = log if log is not None else PrepareLog()
    candidates = list(
        index_bimcv(
            root,
            split,
            translator=translator,
            keep_spanish=keep_spanish,
            log=log,
            validation_fraction=validation_fraction,
            test_fraction=test_fraction,
        )
    )
    return load_records(load_ct_record, candidates, log, num_proc)


def index_bimcv(
    root: str | os.PathLike,
    split: str,
    *,
    translator: Translator | None,
    keep_spanish: bool,
    log: PrepareLog,
    validation_fraction: float = 0.05,
    test_fraction: float = 0.0,
) -> Iterator[CTCandidate]:
    """One candidate per CT session of ``split`` with a usable series and an English report of >= 3 sentences."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    root = Path(root)
    subjects = sorted(path for path in root.glob("sub-*") if path.is_dir())
    if not subjects:
        raise FileNotFoundError(f"no sub-* subject folders in {root}; pass the extracted covid19_posi folder")
    for subject in subjects:
        if subject_split(subject.name, validation_fraction, test_fraction) != split:
            continue
        reports = _SessionReports(subject)
        for session in sorted(path for path in subject.glob("ses-*") if path.is_dir()):
            candidate = _session_candidate(subject, session, split, reports, translator, keep_spanish, log)
            if candidate is not None:
                yield candidate


def subject_split(subject_id: str, validation_fraction: float, test_fraction: float) -> str:
    """A stable split per subject (never per session, so no patient spans two splits) from a hash of its id."""
    if not (0 <= validation_fraction and 0 <= test_fraction and validation_fraction + test_fraction < 1):
        raise ValueError(f"split fractions must be >= 0 and sum below 1, got {validation_fraction}, {test_fraction}")
    position = int.from_bytes(hashlib.sha256(subject_id.encode()).digest()[:8], "big") / 2**64
    if position < test_fraction:
        return "test"
    return "validation" if position < test_fraction + validation_fraction else "train"


def translations_from_file(path: str | os.PathLike) -> Translator:
    """A translator reading English reports keyed by report id from .json ({id: text}) or .csv/.tsv files.

    CSV/TSV files need the columns ``report_id`` and ``translation``. Ids are BIMCV session ids with or without their
    ``ses-`` prefix ("E06119" or "ses-E06119").
    """
    path = Path(path)
    if path.suffix == ".json":
        table = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(table, dict) or not all(isinstance(text, str) for text in table.values()):
            raise ValueError(f"{path}: expected a JSON object mapping report ids to English report strings")
    elif path.suffix in (".csv", ".tsv"):
        rows = read_table(path, ("report_id", "translation"), sep="\t" if path.suffix == ".tsv" else ",")
        table = dict(zip(rows["report_id"], rows["translation"]))
    else:
        raise ValueError(f"{path}: translations must be a .json, .csv or .tsv file")
    translations = {report_id(key): text for key, text in table.items()}
    return lambda rid, _spanish: translations.get(rid)


def report_id(session_id: str) -> str:
    """The id a BIMCV report is known by: its session id without the BIDS ``ses-`` prefix ("E06119")."""
    return session_id.strip().removeprefix("ses-")


def evaluation_text(cell: str) -> str:
    """A ``medical_evaluation`` cell as plain text: BIMCV stores it as a Python list literal of text fragments."""
    text = cell.strip()
    if text.startswith("["):
        try:
            parts = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        if isinstance(parts, list):
            return "\n".join(str(part).strip() for part in parts if str(part).strip())
    return text


def _session_candidate(subject, session, split, reports, translator, keep_spanish, log) -> CTCandidate | None:
    sample_id = f"{subject.name}_{session.name}"
    series = sorted({path for pattern in CT_PATTERNS for path in session.glob(pattern)})
    if not series:
        log.drop(Drop(sample_id, "no_ct_series", str(session)))
        return None
    chosen = _largest_volume(series, sample_id, log)
    if chosen is None:
        return None
    spanish, drop = reports.get(session.name, sample_id)
    if drop is not None:
        log.drop(drop)
        return None
    rid = report_id(session.name)
    english = translator(rid, spanish) if translator is not None else None
    if english is not None and english.strip():
        text, language = _training_text(english, report_text), "en"
    elif keep_spanish:
        text, language = _training_text(spanish, clean_report), "es"
    else:
        raise ValueError(
            f"BIMCV report {rid} (session {sample_id}, {reports.path}) is Spanish and has no English translation; "
            "give translations (--translations FILE or a translator callable) or pass --keep-spanish to knowingly "
            "train on Spanish text"
        )
    if not text or count_sentences(text) < MIN_REPORT_SENTENCES:
        reason = "report_empty" if not text else "report_too_short"
        log.drop(Drop(sample_id, reason, str(reports.path), f"report {rid}"))
        return None
    metadata = {
        "subject_id": subject.name,
        "session_id": session.name,
        "report_id": rid,
        "language": language,
        "series_candidates": len(series),
    }
    return CTCandidate(sample_id, split, SOURCE, chosen, text, metadata)


def _training_text(report: str, to_text: Callable[[str], str]) -> str:
    """Training text of a report, "" when nothing is left (an empty report is a drop, not an error)."""
    try:
        return to_text(report)
    except ValueError:
        return ""


def _largest_volume(series: list[Path], sample_id: str, log: PrepareLog) -> Path | None:
    """The session's series with the most voxels among true volumes, read from the NIfTI headers only.

    A session often holds scouts and several reconstructions; the largest volume is the thinnest-slice one.
    """
    volumes = {}
    for path in series:
        try:
            shape = nib.load(path).shape
        except FileNotFoundError as error:
            log.drop(Drop(sample_id, MISSING_FILE, str(path), str(error)))
            continue
        except Exception as error:  # noqa: BLE001 - a corrupt header is reported and the series skipped
            log.drop(Drop(sample_id, UNREADABLE_FILE, str(path), f"{type(error).__name__}: {error}"))
            continue
        if len(shape) < 3 or any(size != 1 for size in shape[3:]) or min(shape[:3]) < MIN_CT_SLICES:
            log.drop(Drop(sample_id, "ct_series_not_a_volume", str(path), f"shape {tuple(shape)}"))
            continue
        volumes[path] = int(shape[0]) * int(shape[1]) * int(shape[2])
    return max(volumes, key=volumes.get) if volumes else None


class _SessionReports:
    """The Spanish report of each session of one subject, from ``sub-XXX/sub-XXX_sessions.tsv`` (read once)."""

    def __init__(self, subject: Path):
        self.path = subject / f"{subject.name}_sessions.tsv"
        self._reports = None
        self._error = None

    def get(self, session_id: str, sample_id: str) -> tuple[str | None, Drop | None]:
        if self._reports is None and self._error is None:
            self._load()
        if self._error is not None:
            return None, Drop(sample_id, *self._error)
        text = self._reports.get(session_id, "")
        if not text:
            return None, Drop(sample_id, "report_missing", str(self.path), f"no medical_evaluation for {session_id}")
        return text, None

    def _load(self) -> None:
        try:
            rows = read_table(self.path, SESSIONS_COLUMNS, sep="\t")
        except FileNotFoundError:
            self._error = (MISSING_FILE, str(self.path), "sessions file not found")
            return
        except Exception as error:  # noqa: BLE001 - a malformed TSV is reported for each of its sessions
            self._error = (UNREADABLE_FILE, str(self.path), f"{type(error).__name__}: {error}")
            return
        self._reports = {
            session_id.strip(): evaluation_text(cell)
            for session_id, cell in zip(rows["session_id"], rows["medical_evaluation"])
        }


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--translations", type=Path, help="English reports keyed by report id (.json, .csv or .tsv)")
    parser.add_argument(
        "--keep-spanish", action="store_true", help="keep reports without a translation in Spanish (opt-in)"
    )
    parser.add_argument("--validation-fraction", type=float, default=0.05, help="share of subjects for validation")
    parser.add_argument("--test-fraction", type=float, default=0.0, help="share of subjects for test")


def _open_reader(args: argparse.Namespace):
    translator = translations_from_file(args.translations) if args.translations else None
    options = {
        "num_proc": args.num_proc,
        "keep_spanish": args.keep_spanish,
        "validation_fraction": args.validation_fraction,
        "test_fraction": args.test_fraction,
    }
    return options, lambda split, log: read_bimcv(args.root, split, translator=translator, log=log, **options)


COMMAND = DatasetCommand(
    name="bimcv",
    help="BIMCV-COVID19+ chest CTs with their (translated) reports",
    splits=SPLITS,
    records_per_shard=32,
    add_arguments=_add_arguments,
    open_reader=_open_reader,
    input_files=("translations",),
)
