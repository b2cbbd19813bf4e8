"""Supervised control for the ground-truth benchmark: can the demo's vision encoder learn the findings at all?

    python benchmarks/supervised_probe.py                                   # processor defaults ([-1, 1] input)
    python benchmarks/supervised_probe.py --image-mean 0 --image-std 1      # the [0, 1] input of earlier versions
    python benchmarks/supervised_probe.py --reports                         # the frozen text encoder instead

Trains the demo configuration's UniMedIVisionModel from scratch with a linear head and per-finding binary
cross-entropy on the train-split X-rays (labels, not reports; the pretraining X-ray processor with its random crops,
AdamW with warm-up and cosine decay as in pretraining), then prints the test-split AUROC per finding every
`--eval-every` steps. If this control cannot learn a finding, a contrastive model with the same encoder and budget
cannot either: the problem is the encoder, its input or the data, not the CLIP/DINO objective.

`--reports` checks the other side: logistic regression on the config's pretrained text encoder's [CLS] states of the
X-ray and CT reports (frozen, at the config's `max_length`), AUROC per finding on the test reports. A text encoder
whose [CLS] separates the findings gives the vision tower a target it can learn against even when frozen.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from transformers import AutoModel, AutoTokenizer, get_cosine_schedule_with_warmup

from modeling_unimedi import UniMedIVisionConfig, UniMedIVisionModel
from modeling_unimedi.configuration_unimedi import PATCH_EMBEDDINGS
from processing.groundtruth.reports import FINDING_NAMES
from processing.samples import resolve
from processing.schema import XRAY
from processing.shards import stream_split
from training.config import load_config
from training.pretrain import xray_processor


def load_xrays(data: str, split: str) -> tuple[list, torch.Tensor]:
    """The split's decoded X-rays and their (N, findings) labels."""
    images, labels = [], []
    for record in stream_split(data, split):
        if record["modality"] == XRAY:
            images.append(record["image"])
            labels.append([name in record["labels"] for name in FINDING_NAMES])
    return images, torch.tensor(labels, dtype=torch.float32)


def evaluate_auroc(encoder, head, images: list, labels: torch.Tensor, processor) -> list[float]:
    """Test AUROC per finding (centre crops)."""
    encoder.eval()
    with torch.no_grad():
        scores = torch.cat(
            [head(encoder(**processor(images[i : i + 32])).pooler_output) for i in range(0, len(images), 32)]
        )
    encoder.train()
    return [roc_auc_score(labels[:, j], scores[:, j]) for j in range(labels.shape[1])]


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


def main():
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
    args = parser.parse_args()
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
    normalisation = {
        key: value
        for key, value in (("image_mean", args.image_mean), ("image_std", args.image_std))
        if value is not None
    }
    processor = xray_processor(vision_config, **normalisation)
    train_images, train_labels = load_xrays(args.data, "train")
    test_images, test_labels = load_xrays(args.data, "test")

    encoder = UniMedIVisionModel(vision_config)
    head = torch.nn.Linear(vision_config.hidden_size, len(FINDING_NAMES))
    parameters = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.steps // 10, args.steps)
    print(
        f"supervised probe: {len(train_images)} train / {len(test_images)} test X-rays, "
        f"{vision_config.patch_embedding} patch embedding, input mean "
        f"{processor.image_mean[0]} std {processor.image_std[0]}, lr {args.learning_rate}, batch {args.batch_size}"
    )
    print("| step | train BCE | " + " | ".join(f"{name} AUROC" for name in FINDING_NAMES) + " |")
    print("|---" * (len(FINDING_NAMES) + 2) + "|")
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        index = torch.randint(0, len(train_images), (args.batch_size,))
        inputs = processor([train_images[i] for i in index], training=True)
        logits = head(encoder(**inputs).pooler_output)
        loss = F.binary_cross_entropy_with_logits(logits, train_labels[index])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        if step % args.eval_every == 0 or step == args.steps:
            aurocs = evaluate_auroc(encoder, head, test_images, test_labels, processor)
            print(f"| {step} | {loss.item():.3f} | " + " | ".join(f"{100 * a:.1f}" for a in aurocs) + " |")
    print(f"{time.perf_counter() - started:.0f} s, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
