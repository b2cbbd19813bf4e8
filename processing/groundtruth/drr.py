"""Geometry and digitally reconstructed radiographs (DRRs) for the ground-truth benchmark.

A ``Pose`` places the patient (small rotations, isotropic scale, shift) and ``resample_affine`` applies it to a 2D or
3D array in millimetres about the array's centre. A DRR is the parallel projection of linear attenuation along the
anterior-posterior axis H: mu = mu_water * (1 + HU / 1000) (air clipped to 0), line integral L = sum(mu * dH),
transmitted fraction I = exp(-L), shown as attenuation 1 - I**k (bone and mediastinum bright, lungs dark, air black)
with a percentile window, gamma and detector noise, as a PA image: the patient's right on the viewer's left (W runs
right->left) and superior at the top (D runs inferior->superior, so rows are flipped).
"""

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

MU_WATER_PER_MM = 0.02  # linear attenuation of water near 60 keV, a chest radiograph's effective energy
BODY_LINE_INTEGRAL = 0.2  # rays with more attenuation than ~1 cm of water cross the body


@dataclass(frozen=True)
class Pose:
    """Patient placement: rotations (degrees) about the H axis (in the coronal D-W plane: a radiograph's in-plane
    tilt), the D axis (axial plane) and the W axis (sagittal plane); isotropic ``scale``; ``shift_mm`` along D/H/W."""

    coronal_deg: float = 0.0
    axial_deg: float = 0.0
    sagittal_deg: float = 0.0
    scale: float = 1.0
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def matrix(self) -> np.ndarray:
        """The forward map in (D, H, W) millimetres: posed = matrix @ original + shift."""
        return self.scale * _rotation(self.axial_deg, 1, 2) @ _rotation(self.sagittal_deg, 0, 1) @ self.coronal()

    def inverse(self) -> tuple[np.ndarray, np.ndarray]:
        """``(matrix, offset)`` with original = matrix @ posed + offset: what ``resample_affine`` reads."""
        inverse = np.linalg.inv(self.matrix())
        return inverse, -inverse @ np.asarray(self.shift_mm, dtype=np.float64)

    def coronal(self) -> np.ndarray:
        return _rotation(self.coronal_deg, 0, 2)

    def as_dict(self) -> dict:
        return {key: (round(value, 3) if isinstance(value, float) else [round(v, 3) for v in value])
                for key, value in asdict(self).items()}  # fmt: skip


def _rotation(degrees: float, first: int, second: int) -> np.ndarray:
    """Rotation of the (first, second) axis plane of (D, H, W) space."""
    angle = np.deg2rad(degrees)
    rotation = np.eye(3)
    rotation[[first, first, second, second], [first, second, first, second]] = [
        np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle)
    ]  # fmt: skip
    return rotation


def resample_affine(
    channels: np.ndarray, in_spacing, out_shape, out_spacing, matrix, offset_mm, mode: str = "bilinear"
) -> np.ndarray:
    """Sample ``channels`` (C, *spatial), 2D or 3D, on a grid of ``out_shape`` x ``out_spacing``: the output point p
    (mm from the output centre) reads the input at ``matrix @ p + offset_mm`` (mm from the input centre), trilinearly
    (``mode="nearest"``: the nearest voxel, for label maps); outside the input is 0."""
    grid = sampling_grid(channels.shape[1:], in_spacing, out_shape, out_spacing, matrix, offset_mm)
    return sample_grid(channels, grid, mode)


def sampling_grid(in_shape, in_spacing, out_shape, out_spacing, matrix, offset_mm) -> torch.Tensor:
    """Where each output voxel of ``resample_affine`` reads its input, in ``grid_sample``'s normalised coordinates
    (-1 and 1 at the outer voxel edges): built once, it samples several inputs of ``in_shape`` alike."""
    in_half = np.asarray(in_shape) * np.asarray(in_spacing, dtype=np.float64) / 2
    out_half = np.asarray(out_shape) * np.asarray(out_spacing, dtype=np.float64) / 2
    normalised = np.diag(1 / in_half) @ np.asarray(matrix) @ np.diag(out_half)
    translation = np.asarray(offset_mm) / in_half
    out_axes = np.meshgrid(
        *[np.float32((2 * np.arange(n) + 1) / n - 1) for n in out_shape], indexing="ij", sparse=True
    )
    grid = np.empty((*out_shape, len(out_shape)), dtype=np.float32)
    for axis in range(len(out_shape)):  # grid_sample wants the last axis first (x, y, z)
        terms = (np.float32(normalised[axis, j]) * out_axes[j] for j in range(len(out_shape)))
        grid[..., len(out_shape) - 1 - axis] = sum(terms) + np.float32(translation[axis])
    return torch.from_numpy(grid)[None]


def sample_grid(channels: np.ndarray, grid: torch.Tensor, mode: str = "bilinear") -> np.ndarray:
    """``channels`` (C, *spatial) read at a ``sampling_grid`` (zeros outside)."""
    inputs = torch.from_numpy(np.ascontiguousarray(channels, dtype=np.float32))[None]
    return F.grid_sample(inputs, grid, mode=mode, padding_mode="zeros", align_corners=False)[0].numpy()


def line_integral(hu: np.ndarray, spacing) -> np.ndarray:
    """Attenuation line integrals (D, W) through a (D, H, W) HU volume along H."""
    mu = np.float32(MU_WATER_PER_MM) * (1 + np.maximum(hu, np.float32(-1000.0)) / np.float32(1000.0))
    return mu.sum(axis=1, dtype=np.float32) * np.float32(spacing[1])


@dataclass(frozen=True)
class XrayLook:
    """Exposure and display of one radiograph: the window maps the ``black_percentile`` of the body's line integrals
    to black and their 99.5th percentile to white, then ``gamma``; Gaussian ``noise`` (fraction of full scale) is drawn
    from ``noise_seed``."""

    black_percentile: float = 2.0
    gamma: float = 1.0
    noise: float = 0.0
    noise_seed: int = 0


def radiograph(line_integrals: np.ndarray, spacing, pose: Pose, look: XrayLook, size: int) -> np.ndarray:
    """A PA display image in [0, 1], ``size`` x ``size``, of a patient placed by ``pose`` (its coronal rotation, scale
    and D/W shift: the part of a pose that a parallel projection along H sees; ``project_to_display``)."""
    displayed = project_to_display(line_integrals[None], spacing, pose, size)[0]
    body = displayed[displayed > BODY_LINE_INTEGRAL]
    black, white = np.percentile(body, [look.black_percentile, 99.5]) if body.size else (0.0, 1.0)
    image = np.clip((displayed - np.float32(black)) / np.float32(max(white - black, 1e-6)), 0, 1) ** np.float32(
        look.gamma
    )
    noise = np.random.default_rng(look.noise_seed).standard_normal(image.shape).astype(np.float32)
    return np.clip(image + np.float32(look.noise) * noise, 0, 1)


def project_to_display(channels: np.ndarray, spacing, pose: Pose, size: int) -> np.ndarray:
    """(C, D, W) projections along H (line integrals, lesion thicknesses in mm) placed as a PA radiograph shows them:
    ``size`` x ``size`` display pixels, rows superior->inferior, the patient placed by ``pose`` (its coronal rotation,
    scale and D/W shift), values scaled with the patient (a scaled patient is as much thicker). The square field of
    view spans the longer of the volume's D and W extents, centred on the volume."""
    spacing = np.asarray(spacing, dtype=np.float64)[[0, 2]]
    fov_mm = float(np.max(np.asarray(channels.shape[1:]) * spacing))
    inverse = np.linalg.inv(pose.scale * pose.coronal()[np.ix_([0, 2], [0, 2])])
    to_patient = np.diag([-1.0, 1.0])  # display rows run superior->inferior
    shift = np.asarray(pose.shift_mm, dtype=np.float64)[[0, 2]]
    displayed = resample_affine(
        channels, spacing, (size, size), (fov_mm / size,) * 2, inverse @ to_patient, -inverse @ shift
    )
    return displayed * np.float32(pose.scale)


def quantise(image: np.ndarray, bits: int) -> np.ndarray:
    """A [0, 1] image as unsigned 8- or 16-bit integers (full scale)."""
    if bits not in (8, 16):
        raise ValueError(f"X-ray bit depth must be 8 or 16, got {bits}")
    dtype = np.uint8 if bits == 8 else np.uint16
    return np.rint(image * np.iinfo(dtype).max).astype(dtype)
