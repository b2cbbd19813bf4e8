"""Supervised control for the ground-truth benchmark: can the demo's vision encoder learn the findings at all?

    python benchmarks/supervised_probe.py                                   # processor defaults ([-1, 1] input)
    python benchmarks/supervised_probe.py --image-mean 0 --image-std 1      # the [0, 1] input of earlier versions
    python benchmarks/supervised_probe.py --reports                         # the frozen text encoder instead
    python benchmarks/supervised_probe.py --modality ct                     # the 3D tokenizer on the CTs

Trains the demo configuration's UniMedIVisionModel from scratch with a linear head and per-finding binary
cross-entropy on the train-split X-rays (labels, not reports; the pretraining X-ray processor with its random crops,
AdamW with warm-up and cosine decay as in pretraining), then prints the test-split AUROC per finding every
`--eval-every` steps. If this control cannot learn a finding, a contrastive model with the same encoder and budget
cannot either: the problem is the encoder, its input or the data, not the CLIP/DINO objective.

`--modality ct` trains the 3D tokenizer on the CTs instead (the pretraining windowing and flips) and also prints the
attentive slab selection's nodule hit rate (Eq. 1-2 on the supervised encoder, the configured k) against random and
the train split's best constant slab: whether an encoder that does detect nodules attends to their slab, the
control for the benchmark's slice-selection target.

`--reports` checks the other side: logistic regression on the config's pretrained text encoder's [CLS] states of the
X-ray and CT reports (frozen, at the config's `max_length`), AUROC per finding on the test reports. A text encoder
whose [CLS] separates the findings gives the vision tower a target it can learn against even when frozen.
"""

import argparse
import json
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from transformers import AutoModel, AutoTokenizer, get_cosine_schedule_with_warmup

from modeling_unimedi import UniMedIConfig, UniMedIVisionConfig, UniMedIVisionModel, UniMedIVolumeProcessor
from modeling_unimedi.configuration_unimedi import PATCH_EMBEDDINGS
from processing.groundtruth.reports import FINDING_NAMES
from processing.samples import resolve
from processing.schema import CT, XRAY, decode_volume
from processing.shards import stream_split
from training.config import load_config
from training.evaluation.slice_selection import slice_selection
from training.pretrain import xray_processor


@dataclass
class Split:
    """One modality's samples of a split: decoded X-rays or (D, H, W) HU grids, (N, findings) labels, CT metadata."""

    inputs: list
    labels: torch.Tensor
    metadata: list[dict]


def load_split(data: str, split: str, modality: str) -> Split:
    """All of a split's samples of one modality, decoded and held in memory (at most a few hundred MiB of CTs)."""
    samples, labels, metadata = [], [], []
    for record in stream_split(data, split):
        if record["modality"] == modality:
            samples.append(record["image"] if modality == XRAY else decode_volume(record))
            labels.append([name in record["labels"] for name in FINDING_NAMES])
            metadata.append(json.loads(record["metadata"] or "{}"))
    return Split(samples, torch.tensor(labels, dtype=torch.float32), metadata)


def model_inputs(processor, samples: list, training: bool = False) -> dict:
    """X-rays through the X-ray processor, CT grids through the volume processor's windowing (as in pretraining)."""
    if isinstance(processor, UniMedIVolumeProcessor):
        return processor.window_grid(samples, training=training)
    return processor(samples, training=training)


@torch.no_grad()
def evaluate(encoder, head, test: Split, processor, train_metadata: list[dict], num_selected: int):
    """Test AUROC per finding (centre crops, unflipped CTs) and, for CTs, the nodule row of the slab selection
    (hit rate, random rate, p-value, the train split's best constant slab's rate); None for X-rays."""
    encoder.eval()
    batches = [model_inputs(processor, test.inputs[i : i + 32]) for i in range(0, len(test.inputs), 32)]
    scores = torch.cat([head(encoder(**inputs).pooler_output) for inputs in batches])
    aurocs = [roc_auc_score(test.labels[:, j], scores[:, j]) for j in range(test.labels.shape[1])]
    selection = None
    if isinstance(processor, UniMedIVolumeProcessor):
        slabs = torch.cat([encoder.slab_scores(inputs["volume_values"]) for inputs in batches])
        rows = slice_selection(slabs, test.metadata, num_selected, train_metadata)["rows"]
        row = next(row for row in rows if row["lesion"] == "nodule" and row["k"] == num_selected)
        selection = {**row, "train_constant": row["train_constant"]["hit_rate"]}
    encoder.train()
    return aurocs, selection


def report_probe(data: str, checkpoint: str, max_length: int) -> list[float]:
    """Test AUROC per finding of a logistic regression on the frozen text encoder's report [CLS] states."""
    tokenizer, encoder = AutoTokenizer.from_pretrained(checkpoint), AutoModel.from_pretrained(checkpoint).eval()

    def features(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        records = list(stream_split(data, split).select_columns(["report", "labels"]))
        states = []
        with torch.no_grad():
            for start in range(0, len(records), 64):
                text = [record["report"] for record in records[start : start + 64]]
                tokens = tokenizer(text, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                states.append(encoder(**tokens).last_hidden_state[:, 0])
        labels = torch.tensor([[name in r["labels"] for name in FINDING_NAMES] for r in records], dtype=torch.float32)
        return torch.cat(states), labels

    (train_x, train_y), (test_x, test_y) = features("train"), features("test")
    return [
        roc_auc_score(
            test_y[:, j], LogisticRegression(max_iter=2000).fit(train_x, train_y[:, j]).predict_proba(test_x)[:, 1]
        )
        for j in range(len(FINDING_NAMES))
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/groundtruth")
    parser.add_argument("--config", default=None, help="pretraining config whose vision settings to use (demo)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--image-mean", type=float, default=None, help="default: the X-ray processor's")
    parser.add_argument("--image-std", type=float, default=None, help="default: the X-ray processor's")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reports", action="store_true", help="probe the frozen text encoder on the reports instead")
    parser.add_argument("--patch-embedding", choices=PATCH_EMBEDDINGS, default=None, help="default: the config's")
    parser.add_argument("--modality", choices=(XRAY, CT), default=XRAY, help="X-rays (2D tokenizer) or CTs (3D)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    config = load_config(args.config, [])
    if args.reports:
        aurocs = report_probe(args.data, resolve(config.text_checkpoint), config.max_length)
        print(f"report probe ({config.text_checkpoint}, max_length {config.max_length}), test AUROC %:")
        print(" | ".join(f"{name} {100 * a:.1f}" for name, a in zip(FINDING_NAMES, aurocs)))
        return
    vision_settings = dict(config.model_config.get("vision_config", {}))
    if args.patch_embedding:
        vision_settings["patch_embedding"] = args.patch_embedding
    vision_config = UniMedIVisionConfig(**vision_settings)
    num_selected = config.model_config.get("num_selected_slices", UniMedIConfig.num_selected_slices)
    if args.modality == CT:
        processor = UniMedIVolumeProcessor(volume_size=tuple(vision_config.volume_size))
        described = f"HU window {processor.hu_window}"
    else:
        normalisation = {
            key: value
            for key, value in (("image_mean", args.image_mean), ("image_std", args.image_std))
            if value is not None
        }
        processor = xray_processor(vision_config, **normalisation)
        described = f"input mean {processor.image_mean[0]} std {processor.image_std[0]}"
    train, test = load_split(args.data, "train", args.modality), load_split(args.data, "test", args.modality)
    for name, found in (("train", train), ("test", test)):
        if not len(found.inputs):
            raise ValueError(f"{args.data}: the {name!r} split holds no {args.modality} samples")
        if args.modality == CT and not found.labels[:, FINDING_NAMES.index("nodule")].any():
            raise ValueError(f"{args.data}: no {name!r} CT holds a nodule, so the slab selection cannot be scored")

    encoder = UniMedIVisionModel(vision_config)
    head = torch.nn.Linear(vision_config.hidden_size, len(FINDING_NAMES))
    parameters = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.steps // 10, args.steps)
    print(
        f"supervised probe: {len(train.inputs)} train / {len(test.inputs)} test {args.modality}s, "
        f"{vision_config.patch_embedding} patch embedding, {described}, lr {args.learning_rate}, batch {args.batch_size}"
    )
    columns = [f"{name} AUROC" for name in FINDING_NAMES]
    if args.modality == CT:
        columns += [f"nodule slab hit (k = {num_selected})", "random", "train-best constant slab", "p vs random"]
    print("| step | train BCE | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        index = torch.randint(0, len(train.inputs), (args.batch_size,))
        inputs = model_inputs(processor, [train.inputs[i] for i in index], training=True)
        logits = head(encoder(**inputs).pooler_output)
        loss = F.binary_cross_entropy_with_logits(logits, train.labels[index])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        if step % args.eval_every == 0 or step == args.steps:
            aurocs, selection = evaluate(encoder, head, test, processor, train.metadata, num_selected)
            cells = [f"{100 * a:.1f}" for a in aurocs]
            if selection is not None:
                cells += [f"{100 * selection[key]:.1f}" for key in ("hit_rate", "random_hit_rate", "train_constant")]
                cells.append(f"{selection['p_value']:.2g}")
            print(f"| {step} | {loss.item():.3f} | " + " | ".join(cells) + " |")
    print(f"{time.perf_counter() - started:.0f} s, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
