"""Downstream classification readers on miniature fake layouts: labels, splits, records, shards, clear errors."""

import io
import json
import shutil
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from processing import cc_ccii, chexpert, covidx, luna16, rsna
from processing.downstream import seeded_split
from processing.pipeline import PrepareLog
from processing.schema import CT, XRAY, decode_volume
from processing.shards import stream_split, write_shards


def write_image(path, size=(40, 32), seed=0, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0]), dtype=np.uint8)
    Image.fromarray(pixels, mode="L").convert(mode).save(path)


def records_by_split(module, root, **options) -> dict[str, list[dict]]:
    return {split: list(module.read_split(root, split, **options)) for split in module.SPLITS}


def assert_disjoint_and_complete(by_split: dict, expected_ids: set):
    ids = [record["sample_id"] for records in by_split.values() for record in records]
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids


def test_readers_share_one_surface_for_the_cli():
    for module in (chexpert, rsna, covidx, cc_ccii, luna16):
        assert {"SOURCE", "DESCRIPTION", "SPLITS", "CLASSES", "RECORDS_PER_SHARD", "read_split"} <= set(vars(module))


# --- CheXpert --------------------------------------------------------------------------------------------------------

CHEXPERT_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Atelectasis,Cardiomegaly,Consolidation,Edema,Pleural Effusion"
)


def fake_chexpert(tmp_path, num_patients=8):
    root = tmp_path / "CheXpert-v1.0-small"
    lines = [CHEXPERT_HEADER]
    rows = [  # Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion
        ("1.0", "-1.0", "", "0.0", "-1.0"),  # -> Atelectasis, Pleural Effusion (uncertain Cardiomegaly -> 0)
        ("-1.0", "", "-1.0", "-1.0", "0.0"),  # -> Atelectasis, Edema (uncertain Consolidation -> 0)
    ]
    for patient in range(num_patients):
        for view, kind in (("view1_frontal", "Frontal"), ("view2_lateral", "Lateral")):
            relative = f"CheXpert-v1.0-small/train/patient{patient:05d}/study1/{view}.jpg"
            write_image(tmp_path / relative, seed=patient)
            lines.append(f"{relative},Female,50,{kind},PA,,{','.join(rows[patient % 2])}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    valid = [CHEXPERT_HEADER]
    for patient in range(3):
        relative = f"CheXpert-v1.0-small/valid/patient{64541 + patient}/study1/view1_frontal.jpg"
        write_image(tmp_path / relative, seed=100 + patient)
        valid.append(f"{relative},Male,60,Frontal,AP,0.0,0.0,1.0,0.0,0.0,0.0")
    (root / "valid.csv").write_text("\n".join(valid) + "\n")
    return root


def test_chexpert_labels_splits_and_uncertain_policy(tmp_path):
    root = fake_chexpert(tmp_path)
    by_split = records_by_split(chexpert, root, validation_size=2)
    assert {split: len(records) for split, records in by_split.items()} == {"validation": 2, "test": 3, "train": 6}
    assert all("lateral" not in record["sample_id"] for records in by_split.values() for record in records)
    labels = {
        record["sample_id"].split("/")[2]: record["labels"] for record in by_split["train"] + by_split["validation"]
    }
    assert labels["patient00000"] == ["Atelectasis", "Pleural Effusion"]
    assert labels["patient00001"] == ["Atelectasis", "Edema"]
    assert all(record["labels"] == ["Cardiomegaly"] for record in by_split["test"])
    assert all(record["split"] == "test" for record in by_split["test"])
    assert by_split == records_by_split(chexpert, root, validation_size=2)  # the seeded hold-out is stable


def test_chexpert_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        list(chexpert.read_split(tmp_path / "nowhere", "train"))
    with pytest.raises(FileNotFoundError, match="train.csv not found"):
        list(chexpert.read_split(tmp_path, "train"))
    with pytest.raises(ValueError, match="unknown CheXpert split"):
        list(chexpert.read_split(tmp_path, "val"))
    root = fake_chexpert(tmp_path)
    (root / "valid.csv").write_text(
        CHEXPERT_HEADER + "\nCheXpert-v1.0-small/valid/p/s/v.jpg,F,1,Frontal,AP,,2.0,,,,\n"
    )
    with pytest.raises(ValueError, match=r"valid.csv.*Atelectasis = '2.0'"):
        list(chexpert.read_split(root, "test"))


def test_missing_image_is_logged_and_skipped(tmp_path):
    root = fake_chexpert(tmp_path)
    (tmp_path / "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg").unlink()
    log = PrepareLog()
    records = list(chexpert.read_split(root, "test", log=log))
    assert len(records) == 2 and log.dropped == Counter({"missing_file": 1})


# --- RSNA ------------------------------------------------------------------------------------------------------------


def test_rsna_binary_labels_and_70_15_15_patient_split(tmp_path, dicom_monochrome1_path):
    root = tmp_path / "rsna"
    (root / rsna.IMAGES_DIR).mkdir(parents=True)
    lines = ["patientId,x,y,width,height,Target"]
    for i in range(20):
        patient = f"p{i:03d}"
        shutil.copy(dicom_monochrome1_path, root / rsna.IMAGES_DIR / f"{patient}.dcm")
        if i % 4 == 0:  # two boxes of one positive image
            lines += [f"{patient},1,2,3,4,1", f"{patient},5,6,7,8,1"]
        else:
            lines.append(f"{patient},,,,,0")
    (root / rsna.LABELS_CSV).write_text("\n".join(lines) + "\n")
    by_split = records_by_split(rsna, root)
    assert {split: len(records) for split, records in by_split.items()} == {"validation": 3, "test": 3, "train": 14}
    assert_disjoint_and_complete(by_split, {f"p{i:03d}" for i in range(20)})
    for record in (r for records in by_split.values() for r in records):
        assert record["labels"] == (["pneumonia"] if int(record["sample_id"][1:]) % 4 == 0 else [])
        image = Image.open(io.BytesIO(record["image"]["bytes"]))
        assert image.format == "PNG" and image.mode == "L"
    (root / rsna.LABELS_CSV).write_text("patientId,x,y,width,height,Target\np000,,,,,yes\n")
    with pytest.raises(ValueError, match="Target values"):
        list(rsna.read_split(root, "train"))


# --- COVIDx ----------------------------------------------------------------------------------------------------------


def fake_covidx(tmp_path):
    root = tmp_path / "covidx"
    classes = covidx.CLASSES
    train = []
    for i in range(30):
        name = f"img{i}.png"
        write_image(root / "train" / name, seed=i)
        train.append(f"patient{i // 2} {name} {classes[i % 3]} cohen")
    (root / "train_COVIDx6.txt").write_text("\n".join(train) + "\n")
    test = []
    for i in range(4):
        write_image(root / "test" / f"t{i}.jpg", seed=50 + i, mode="RGB")
        test.append(f"tp{i} t{i}.jpg {classes[i % 3]} rsna")
    (root / "test_COVIDx6.txt").write_text("\n".join(test) + "\n")
    return root


def test_covidx_classes_and_a_patient_level_validation_split(tmp_path):
    root = fake_covidx(tmp_path)
    by_split = records_by_split(covidx, root)
    assert len(by_split["test"]) == 4 and len(by_split["validation"]) == 4  # 10 % of 15 patients, 2 images each
    assert_disjoint_and_complete({k: v for k, v in by_split.items() if k != "test"}, {f"img{i}" for i in range(30)})
    patients = {split: {json.loads(r["metadata"])["patient_id"] for r in rs} for split, rs in by_split.items()}
    assert not patients["train"] & patients["validation"]
    train_labels = Counter(label for r in by_split["train"] + by_split["validation"] for label in r["labels"])
    assert train_labels == Counter({name: 10 for name in covidx.CLASSES})
    (root / "test_COVIDx6.txt").write_text("tp0 t0.jpg covid rsna\n")
    with pytest.raises(ValueError, match=r"test_COVIDx6.txt:1: expected"):
        list(covidx.read_split(root, "test"))
    (root / "test_extra.txt").write_text("")
    with pytest.raises(FileNotFoundError, match="exactly one test"):
        list(covidx.read_split(root, "test"))


# --- CC-CCII ---------------------------------------------------------------------------------------------------------


def fake_cc_ccii(tmp_path, slices=6):
    root = tmp_path / "cc-ccii"
    for c, label in enumerate(cc_ccii.CLASSES):
        for patient in range(4):
            for scan in range(2 if patient == 0 else 1):
                for index in range(slices):
                    write_image(root / label / f"{patient}" / f"{1000 + scan}" / f"{index}.png", (24, 24), seed=index)
    return root


def test_cc_ccii_stacks_slices_into_grid_volumes_with_the_class(tmp_path):
    root = fake_cc_ccii(tmp_path)
    (root / "CP" / "3" / "1000" / "10.png").write_bytes((root / "CP" / "3" / "1000" / "1.png").read_bytes())
    by_split = records_by_split(cc_ccii, root)
    records = [r for records in by_split.values() for r in records]
    assert len(records) == 15  # 4 patients x 3 classes, one patient per class with 2 scans
    counts = {split: len({r["sample_id"].rsplit("/", 1)[0] for r in rs}) for split, rs in by_split.items()}
    assert counts == {"validation": 2, "test": 2, "train": 8}  # 15 % / 15 % / 70 % of the 12 patients
    record = next(r for r in records if r["sample_id"] == "CP/3/1000")
    assert record["modality"] == CT and record["labels"] == ["CP"]
    assert decode_volume(record).shape == (32, 128, 128)
    assert record["metadata"] and '"num_slices": 7' in record["metadata"]
    grey = np.asarray(Image.open(root / "NCP/1/1000/0.png"), dtype=np.float32)
    volume = decode_volume(next(r for r in records if r["sample_id"] == "NCP/1/1000")).astype(np.float32)
    assert volume.min() >= -1000 and volume.max() <= 1000
    assert abs(volume.mean() - (-1000 + grey.mean() / 255 * 2000)) < 40  # grey maps linearly onto the HU window
    shutil.rmtree(root / "Normal")
    with pytest.raises(FileNotFoundError, match=r"lacks the class folder\(s\) \['Normal'\]"):
        list(cc_ccii.read_split(root, "train"))


def test_cc_ccii_single_slice_scans_are_dropped_with_a_reason(tmp_path):
    root = fake_cc_ccii(tmp_path, slices=1)
    log = PrepareLog()
    assert [r for split in cc_ccii.SPLITS for r in cc_ccii.read_split(root, split, log=log)] == []
    assert log.dropped == Counter({"ct_series_not_a_volume": 15})


# --- LUNA16 ----------------------------------------------------------------------------------------------------------


def test_luna16_labels_scans_by_annotations_and_keeps_folds(tmp_path):
    import SimpleITK as sitk
    root = tmp_path / "luna16"
    rng = np.random.default_rng(0)
    uids = []
    for fold in range(10):
        (root / f"subset{fold}").mkdir(parents=True)
        uid = f"1.3.6.1.4.1.14519.5.2.1.{fold}"
        hu = rng.integers(-1000, 400, (20, 24, 28)).astype(np.int16)  # (z, y, x)
        hu[:, :, :14] = -1000  # patient right (low x in LPS) is air: the orientation check below sees it
        image = sitk.GetImageFromArray(hu)
        image.SetSpacing((0.7, 0.7, 2.5))
        sitk.WriteImage(image, str(root / f"subset{fold}" / f"{uid}.mhd"))
        uids.append(uid)
    (root / "annotations.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm\n" + "".join(f"{u},1,2,3,5\n" for u in uids[::2])
    )
    by_split = records_by_split(luna16, root)
    assert {split: len(r) for split, r in by_split.items()} == {"validation": 1, "test": 1, "train": 8}
    assert by_split["test"][0]["sample_id"] == uids[9] and by_split["validation"][0]["sample_id"] == uids[8]
    for record in (r for records in by_split.values() for r in records):
        fold = int(record["sample_id"].rsplit(".", 1)[1])
        assert record["labels"] == (["nodule"] if fold % 2 == 0 else ["normal"])
        volume = decode_volume(record)
        assert volume.shape == (32, 128, 128)
        # canonical W runs patient right -> left: the air half (patient right) comes first
        assert volume[:, :, :60].mean() < volume[:, :, 68:].mean() - 300
    shutil.rmtree(root / "subset9")
    with pytest.raises(FileNotFoundError, match="subset9 is missing"):
        list(luna16.read_split(root, "test"))


def test_records_write_streamable_shards(tmp_path):
    root = fake_covidx(tmp_path)
    out = tmp_path / "shards"
    write_shards(covidx.read_split(root, "test"), out, "test", records_per_shard=3)
    streamed = list(stream_split(out, "test"))
    assert len(streamed) == 4 and {r["modality"] for r in streamed} == {XRAY}
    assert [r["labels"] for r in streamed] == [[covidx.CLASSES[i % 3]] for i in range(4)]


def test_seeded_split_takes_exact_counts():
    assignment = seeded_split([f"k{i}" for i in range(100)] * 2, {"test": 15, "validation": 15})
    assert Counter(assignment.values()) == Counter({"train": 70, "test": 15, "validation": 15})
    assert assignment == seeded_split([f"k{i}" for i in reversed(range(100))], {"test": 15, "validation": 15})
