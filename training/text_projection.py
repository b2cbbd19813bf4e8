"""Start the text projection without the frozen report encoder's common direction (`center_text_projection`).

A sentence encoder's [CLS] states share one large common component: the demo's MiniLM [CLS] vectors of the benchmark
reports have norm ~7.5, of which ~7.0 is their mean, so after a random projection two reports of the same modality
have cosine ~0.92 whatever their findings (0.94 with the same findings, 0.91 without). The vision tower then learns
against targets that differ by little but modality, and the CLIP loss sits on its plateau for hundreds of steps.
Projecting the mean direction out of the initial projection (W <- W (I - u u^T), u the normalised mean [CLS] state of
the training reports) leaves the differences between reports: cosine 0.25 within a modality, 0.46 with the same
findings against 0.21 without. The projection stays trainable; only its starting point changes.
"""

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from training.data import shard_files


def training_reports(data: str | list[str], split: str, limit: int) -> list[str]:
    """Up to `limit` report texts from the local shards of `split`, read from their `report` column, spread evenly
    over the shards (X-ray and CT shards alike)."""
    files = shard_files(data, split)
    if files is None:
        raise ValueError(f"center_text_projection reads the reports of local shards; {data} is not a local folder")
    per_file = max(1, -(-limit // len(files)))
    reports = []
    for file in files:
        column = pq.ParquetFile(file).read(columns=["report"]).column("report").to_pylist()
        reports += [text for text in column[:per_file] if text]
    if not reports:
        raise ValueError(f"no report text in the {split!r} shards of {data}")
    return reports[:limit]


@torch.no_grad()
def mean_text_direction(text_model: torch.nn.Module, tokenizer, reports: list[str], max_length: int) -> torch.Tensor:
    """The unit vector along the mean [CLS] state of `reports` (dropout off for the pass)."""
    was_training = text_model.training
    text_model.eval()
    try:
        states = []
        for start in range(0, len(reports), 32):
            tokens = tokenizer(
                reports[start : start + 32], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            states.append(text_model(**tokens.to(next(text_model.parameters()).device)).last_hidden_state[:, 0])
    finally:
        text_model.train(was_training)
    return F.normalize(torch.cat(states).float().mean(dim=0), dim=0)


@torch.no_grad()
def remove_direction(projection: torch.nn.Linear, direction: torch.Tensor) -> None:
    """W <- W (I - u u^T): the projection maps `direction` (unit, in its input space) to zero."""
    weight = projection.weight
    weight -= (weight @ direction.to(weight))[:, None] * direction.to(weight)[None, :]
