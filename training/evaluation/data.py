"""An evaluation split's samples, the saved model, and what the model makes of them (embeddings, slab scores)."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import torch
import transformers

from modeling_unimedi import UniMedIModel, UniMedIProcessor
from modeling_unimedi.zero_shot_unimedi import UniMedIZeroShot
from processing.schema import CT, XRAY, decode_volume
from processing.shards import modality_shards, stream_split


@dataclass
class Samples:
    """One modality of an evaluation split: model inputs (PIL X-rays or int16 HU CT arrays) with what is known."""

    modality: str
    sample_ids: list[str] = field(default_factory=list)
    inputs: list = field(default_factory=list)
    reports: list[str] = field(default_factory=list)
    labels: list[frozenset[str]] = field(default_factory=list)
    metadata: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sample_ids)


def load_samples(data_dir: str | Path, split: str) -> dict[str, Samples]:
    """X-rays and CTs of a split's shards, decoded; raises ValueError when a record has no labels (not benchmark
    data) or the split holds no sample of either modality."""
    samples = {XRAY: Samples(XRAY), CT: Samples(CT)}
    for record in stream_split(data_dir, split):
        if not record["labels"]:
            raise ValueError(f"{data_dir}: record {record['sample_id']!r} has no labels; evaluate benchmark data")
        target = samples[record["modality"]]
        target.sample_ids.append(record["sample_id"])
        target.inputs.append(record["image"] if record["modality"] == XRAY else decode_volume(record))
        target.reports.append(record["report"])
        target.labels.append(frozenset(record["labels"]))
        target.metadata.append(json.loads(record["metadata"] or "{}"))
    empty = [modality for modality, found in samples.items() if not len(found)]
    if empty:
        raise ValueError(f"{data_dir}: the {split!r} split holds no {' and no '.join(empty)} samples")
    return samples


def load_ct_metadata(data_dir: str | Path, split: str) -> list[dict]:
    """The metadata of a split's CTs, read from the parquet column alone (no volume is decoded); [] when the split
    has no CT shards."""
    files = modality_shards(sorted(str(path) for path in Path(data_dir).glob(f"{split}-*.parquet")), CT)
    return [
        json.loads(text or "{}")
        for file in files
        for text in pq.read_table(file, columns=["metadata"])["metadata"].to_pylist()
    ]


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[UniMedIModel, UniMedIProcessor]:
    """A saved `final/` folder as the inference model (teacher and DINO heads, if saved, are left out) and its
    processor; raises ValueError when model weights are missing from the folder."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} holds no config.json: give a saved model folder such as outputs/demo/final"
        )
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the pretraining-only weights would be listed as unexpected
    try:
        model, info = UniMedIModel.from_pretrained(model_dir, output_loading_info=True)
        processor = UniMedIProcessor.from_pretrained(model_dir)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        raise ValueError(f"{model_dir}: weights missing from the checkpoint: {sorted(info['missing_keys'])[:5]} ...")
    return model.to(device).eval(), processor


@dataclass
class Encoded:
    """Normalised embeddings of one modality's images/volumes and of their reports (row i: sample i)."""

    vision: torch.Tensor
    reports: torch.Tensor


def encode(zero_shot: UniMedIZeroShot, samples: Samples) -> Encoded:
    if samples.modality == XRAY:
        vision = zero_shot.encode_images(samples.inputs)
    else:
        vision = zero_shot.encode_volumes(samples.inputs)
    return Encoded(vision=vision.cpu(), reports=zero_shot.encode_texts(samples.reports).cpu())


@torch.inference_mode()
def slab_scores(model: UniMedIModel, processor: UniMedIProcessor, volumes: list, batch_size: int) -> torch.Tensor:
    """(num_volumes, num_slabs) Eq. 1-2 relevance of each depth slab, from the CT alone (as pretraining selects).

    The encoder is the saved student: `final/` keeps no EMA teacher, whose attention selected slabs in training.
    """
    scores = []
    for start in range(0, len(volumes), batch_size):
        inputs = processor(volumes=volumes[start : start + batch_size]).to(model.device)
        scores.append(model.vision_model.slab_scores(inputs["volume_values"]).float().cpu())
    return torch.cat(scores)
