"""A pretraining step on one GPU at the paper's scale: ViT-B/16 + BERT-base, per-GPU batch 18, bf16 autocast.

    python benchmarks/gpu_pretrain.py [--batch 18] [--ct-fraction 0.125] [--steps 10] [--peak-tflops N] [--smoke]

The paper trains with batch 144 on 8 GPUs: 18 samples per GPU, here 16 X-rays + 2 CTs (``ct_fraction`` 0.125, the
training default), text length 128, random inputs (the input pipeline is measured by data_throughput.py). For
UniMedI's path and the naive one of benchmarks/pretrain_step.py (eager N x N attention, full-length student, trained
text encoder), each with gradient checkpointing off and on, it reports:

- samples/s: median step time over ``--steps`` steps after 3 warm-up steps (forward + backward + AdamW + EMA
  update, bf16 autocast, float32 weights and optimizer state, CUDA synchronised around each step);
- peak memory: ``torch.cuda.max_memory_allocated`` over the timed steps (weights, optimizer state and activations);
- MFU (model FLOPs utilisation): FLOPs of one step's forward + backward counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention kernels as dispatched, so the
  naive path's N x N attention and unmasked student count as the FLOPs they really cost; recomputation under
  gradient checkpointing is counted too; the optimizer and EMA are not), divided by the step time and by the GPU's
  dense bf16 peak (``--peak-tflops``, or a table of known GPUs).

Without CUDA it prints why and exits 0; nothing is measured. ``--smoke`` runs the same code on CPU with the test
suite's tiny model and no peak (proves the code path in CI).
"""

import argparse
import statistics
import sys
import time

import torch
from pretrain_step import VARIANTS, build, train_step  # benchmarks/ is the script's folder, first on sys.path
from torch.utils.flop_counter import FlopCounterMode

from training.data import cts_in_batch

# Dense bf16 tensor-core peak (TFLOP/s, without sparsity) of the SXM parts, from NVIDIA's data sheets.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def peak_tflops(device_name: str) -> float | None:
    return next((peak for name, peak in PEAK_BF16_TFLOPS.items() if name in device_name), None)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(size: str, variant: str, checkpointing: bool, images: int, volumes: int, steps: int, device: str):
    """(samples/s, peak GiB or None, FLOPs per step) of one setting."""
    model, optimizer, batch = build(size, variant, images=images, volumes=volumes, device=device)
    if checkpointing:
        model.activation_checkpointing_enable()  # as training/pretrain.py does
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16)
    with autocast:
        for _ in range(3):
            train_step(model, optimizer, batch)
        with FlopCounterMode(display=False) as counter:
            model(**batch).loss.backward()
        optimizer.zero_grad()
        synchronize(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            train_step(model, optimizer, batch)
            synchronize(device)
            times.append(time.perf_counter() - start)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    del model, optimizer, batch
    if device == "cuda":
        torch.cuda.empty_cache()
    return (images + volumes) / statistics.median(times), peak_gib, counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=18, help="samples per GPU (paper: 144 over 8 GPUs)")
    parser.add_argument("--ct-fraction", type=float, default=0.125)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak; default from a known-GPU table")
    parser.add_argument("--smoke", action="store_true", help="CPU, the test suite's tiny model, one step (CI)")
    args = parser.parse_args()
    if args.smoke:
        size, device, args.batch, args.ct_fraction, args.steps = "smoke", "cpu", 4, 0.25, 1
        torch.set_num_threads(1)
        peak = None
        print("--smoke: CPU, tiny model; the figures below only prove the code path")
    else:
        if not torch.cuda.is_available():
            print("gpu_pretrain.py: no CUDA device on this machine, so nothing was measured; run it on a GPU machine")
            return
        size, device = "vitb", "cuda"
        name = torch.cuda.get_device_name()
        peak = args.peak_tflops or peak_tflops(name)
        print(f"{name}, torch {torch.__version__}, bf16 peak {peak or 'unknown (give --peak-tflops)'} TFLOP/s")
    volumes = cts_in_batch(0, args.batch, args.ct_fraction)
    images = args.batch - volumes
    model_name = "ViT-B/16 + BERT-base" if size == "vitb" else "tiny test model"
    print(f"{model_name}, {images} X-rays + {volumes} CTs per step, bf16 autocast, median of {args.steps} step(s)")
    print("\n| path | gradient checkpointing | samples/s | peak memory (GiB) | GFLOPs per step | MFU |")
    print("|---|---|---:|---:|---:|---:|")
    rates = {}
    for variant in VARIANTS:
        for checkpointing in (False, True):
            rate, peak_gib, flops = measure(size, variant, checkpointing, images, volumes, args.steps, device)
            rates[variant, checkpointing] = rate
            step_flops_per_s = flops * rate / (images + volumes)
            mfu = f"{100 * step_flops_per_s / (peak * 1e12):.1f} %" if peak else "n/a"
            memory = f"{peak_gib:.1f}" if peak_gib is not None else "n/a (CPU)"
            print(
                f"| {variant} | {'on' if checkpointing else 'off'} | {rate:.2f} | {memory} | {flops / 1e9:.3f} | "
                f"{mfu} |"
            )
    for checkpointing in (False, True):
        ratio = rates["unimedi", checkpointing] / rates["naive", checkpointing]
        print(f"UniMedI / naive samples/s, checkpointing {'on' if checkpointing else 'off'}: {ratio:.2f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
