"""CT records as self-decoding `datasets.Nifti` cells: the grid round trip, what a `datasets` user gets and hands to
the processor, old-layout shards, and the dataset card next to the shards."""

import gzip

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset, Features, load_dataset
from huggingface_hub import DatasetCard

from modeling_unimedi import UniMedIImageProcessor, UniMedIProcessor, UniMedIVolumeProcessor
from modeling_unimedi.loading_unimedi import load_ct
from processing.pipeline import CTCandidate, load_ct_record
from processing.schema import (
    FEATURES,
    ct_record,
    decode_grid,
    decode_slab_images,
    decode_volume,
    encode_grid,
    xray_record,
)
from processing.shards import CARD_FILE, COLUMN_DESCRIPTIONS, stream_split, write_dataset_card, write_shards
from training.data import MixedBatches, shard_files

SHAPE = (6, 10, 12)  # (D, H, W), small and with three different sizes so that a transposition shows


def _ct(sample_id="ct0", split="train", seed=0, slab_images=None):
    volume = np.random.default_rng(seed).integers(-1000, 1500, SHAPE).astype(np.int16)
    return ct_record(sample_id=sample_id, source="test", split=split, report=f"report {sample_id}", volume=volume,
                     spacing=(2.5, 0.8, 0.7), labels=["nodule"], slab_images=slab_images)  # fmt: skip


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_a_grid_round_trips_with_its_dtype_and_spacing_undecoded_and_decoded(dtype):
    array = (np.arange(np.prod(SHAPE)) % 200).reshape(SHAPE).astype(dtype)
    cell = encode_grid(array, (2.5, 0.8, 0.7))
    decoded = Dataset.from_dict({"grid": [cell]}, features=Features({"grid": FEATURES["volume"]}))[0]["grid"]
    for value in (cell, decoded):
        grid = decode_grid(value, "grid")
        assert grid.array.dtype == dtype and grid.array.shape == SHAPE and grid.array.flags.c_contiguous
        np.testing.assert_array_equal(grid.array, array)
        np.testing.assert_allclose(grid.spacing, (2.5, 0.8, 0.7), rtol=1e-6)


def test_the_nifti_is_a_usual_ct_file_whose_affine_holds_spacing_and_orientation():
    """Voxel axes (i, j, k) = (W, H, D) pointing to the patient's left, posterior and superior: axial slices along k,
    as a CT NIfTI usually is; the native slab images span the volume's extent, slab i centred on the grid's slab i."""
    record = _ct(slab_images=np.zeros((3, 16, 16), np.int16))
    row = Dataset.from_list([record], features=FEATURES)[0]
    volume, slabs = row["volume"], row["slab_images"]
    assert isinstance(volume, nib.Nifti1Image) and volume.shape == SHAPE[::-1]
    assert nib.aff2axcodes(volume.affine) == ("L", "P", "S")
    np.testing.assert_allclose(volume.header.get_zooms(), (0.7, 0.8, 2.5), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(volume.dataobj)[:, :, 2].T, decode_volume(record)[2])  # axial slice 2
    np.testing.assert_allclose(decode_grid(record["slab_images"], "slabs").spacing, (5.0, 0.5, 0.525), rtol=1e-6)
    corners = [(-0.5, -0.5, -0.5), np.asarray(SHAPE[::-1]) - 0.5]  # outer voxel faces, in (i, j, k)
    slab_corners = [(-0.5, -0.5, -0.5), np.asarray(slabs.shape) - 0.5]
    for voxel, slab_voxel in zip(corners, slab_corners):
        np.testing.assert_allclose(nib.affines.apply_affine(volume.affine, voxel),
                                   nib.affines.apply_affine(slabs.affine, slab_voxel), atol=1e-4)  # fmt: skip


def test_processor_reads_a_decoded_record_as_the_stored_training_path_does(ct_nifti_path, text_tokenizer):
    """A real CT prepared into a record: `processor(volumes=[row["volume"]])` (the nibabel image `datasets` decodes)
    is already on the grid, so it gives exactly the training path's values (`window_grid` of the int16 voxels); the
    undecoded cell gives the same, and both match processing the original file up to int16 rounding."""
    record = load_ct_record(CTCandidate("cxr", "train", "test", ct_nifti_path, "report", {}))
    row = Dataset.from_list([record], features=FEATURES)[0]
    processor = UniMedIVolumeProcessor()
    stored = processor.window_grid([decode_volume(record)])["volume_values"]
    assert torch.equal(processor(volumes=[row["volume"]])["volume_values"], stored)
    combined = UniMedIProcessor(UniMedIImageProcessor(), text_tokenizer, volume_processor=processor)
    assert torch.equal(combined(volumes=[row["volume"]])["volume_values"], stored)
    assert torch.equal(processor(volumes=[record["volume"]])["volume_values"], stored)  # {"bytes": ...} cell
    original = processor(volumes=[ct_nifti_path])["volume_values"]
    assert (original - stored).abs().max() <= 0.5 / 1000 + 1e-6  # 0.5 HU rounding over the 2000 HU window, x2
    np.testing.assert_allclose(decode_grid(row["volume"], "cxr").spacing,
                               processor.grid_spacing(load_ct(ct_nifti_path)), rtol=1e-6)  # fmt: skip
    smaller = UniMedIVolumeProcessor(volume_size=(16, 64, 64))(volumes=[row["volume"]])["volume_values"]
    assert smaller.shape == (1, 1, 16, 64, 64)  # another grid: the stored one is resampled, not refused


def test_training_streams_read_the_voxels_without_decoding(tmp_path):
    records = [_ct(f"ct{i}", seed=i, slab_images=np.full((3, 4, 4), i, np.int16)) for i in range(3)]
    write_shards(records, tmp_path, "train", records_per_shard=2)
    batches = MixedBatches(str(tmp_path), "train", batch_size=3, ct_fraction=1.0, buffer=1)
    _, cts = batches.next_batch()
    batches.close()
    assert all(isinstance(record["volume"], dict) for record in cts)  # Nifti(decode=False): the bytes
    by_id = {record["sample_id"]: record for record in records}
    for record in cts:
        np.testing.assert_array_equal(decode_volume(record), decode_volume(by_id[record["sample_id"]]))
        assert decode_slab_images(record).max() == int(record["sample_id"][2:])


def test_bad_cells_are_refused_by_name():
    record = _ct()
    with pytest.raises(ValueError, match="record 'x1' volume: no grid stored"):
        decode_volume(xray_record(sample_id="x1", source="t", split="train", report="r", image=None))
    data = record["volume"]["bytes"]
    with pytest.raises(ValueError, match="stored uncompressed"):
        decode_grid({"bytes": gzip.compress(data), "path": None}, "v")
    with pytest.raises(ValueError, match="cannot hold"):
        decode_grid({"bytes": data[:-10], "path": None}, "v")
    ras = nib.Nifti1Image(np.zeros(SHAPE, np.int16), np.diag([0.7, 0.8, 2.5, 1.0]))
    with pytest.raises(ValueError, match="not a grid in the canonical orientation.*RAS"):
        decode_grid({"bytes": ras.to_bytes(), "path": None}, "v")
    with pytest.raises(ValueError, match="int16"):
        decode_volume({"sample_id": "m", "volume": encode_grid(np.zeros(SHAPE, np.uint8), (1, 1, 1))})


def _old_layout_shard(path):
    """A shard as written before CT records were NIfTI: raw int16 bytes and a shape column."""
    table = pa.table({"sample_id": ["ct0"], "modality": ["ct"], "volume": [np.zeros(SHAPE, "<i2").tobytes()],
                      "volume_shape": [list(SHAPE)]})  # fmt: skip
    pq.write_table(table, path)


def test_old_layout_shards_say_how_to_regenerate(tmp_path):
    _old_layout_shard(tmp_path / "train-ct-00000.parquet")
    regenerate = r"old layout .*python -m processing.groundtruth --out <folder> --overwrite"
    with pytest.raises(ValueError, match=regenerate):
        shard_files(str(tmp_path), "train")  # pretraining, fine-tuning
    with pytest.raises(ValueError, match=regenerate):
        stream_split(tmp_path, "train")  # evaluation
    with pytest.raises(ValueError, match="old layout"):
        decode_volume({"sample_id": "ct0", "volume": np.zeros(SHAPE, "<i2").tobytes(), "volume_shape": list(SHAPE)})


def test_the_dataset_card_loads_the_folder_with_its_splits_and_decoded_cts(tmp_path, xray_jpeg_paths):
    xray = xray_record(sample_id="x0", source="test", split="train", report="clear", image=str(xray_jpeg_paths[0]))
    write_shards([xray, _ct("ct0")], tmp_path, "train")
    write_shards([_ct("ct1", split="test", seed=1)], tmp_path, "test")
    write_dataset_card(tmp_path, license="cc-by-4.0", description="Two fabricated CTs.")
    card = DatasetCard.load(tmp_path / CARD_FILE)
    data = card.data
    assert data.license == "cc-by-4.0" and data.task_categories == ["zero-shot-image-classification",
                                                                     "image-feature-extraction"]  # fmt: skip
    assert data.source_datasets == ["test"] and data.size_categories == ["n<1K"] and data.language == ["en"]
    assert data.configs == [{"config_name": "default", "data_files": [
        {"split": "train", "path": "train-*.parquet"}, {"split": "test", "path": "test-*.parquet"}]}]  # fmt: skip
    assert DatasetCard(str(card)).data.to_dict() == data.to_dict()
    assert all(f"| `{name}` |" in card.text for name in FEATURES) and "Two fabricated CTs." in card.text
    loaded = load_dataset(str(tmp_path))
    assert set(loaded) == {"train", "test"} and loaded["train"].features == FEATURES
    test_ct = loaded["test"][0]
    assert isinstance(test_ct["volume"], nib.Nifti1Image) and test_ct["labels"] == ["nodule"]
    np.testing.assert_array_equal(decode_volume(test_ct), decode_volume(_ct("ct1", split="test", seed=1)))


def test_every_column_is_described_on_the_card():
    """A new column of processing.schema must say on the dataset card what it holds."""
    assert set(COLUMN_DESCRIPTIONS) == set(FEATURES)
