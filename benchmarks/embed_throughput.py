"""Vision-encoder embedding throughput on CPU: UniMedI 2D and 3D next to timm's ViT-B/16, in the same run.

    python benchmarks/embed_throughput.py [--batch 8] [--repeats 5] [--threads N] [--tiny] [--smoke]

Reports images (or volumes) per second as the median over repeats after warm-up, and UniMedI-2D / timm as a ratio
(target >= 1.0). Both models are ViT-B/16 with random weights in float32 inference mode; weights do not change speed.
"""

import argparse
import statistics
import time

import timm
import torch

from modeling_unimedi import UniMedIVisionConfig, UniMedIVisionModel


def throughputs(cases: dict, repeats: int) -> dict[str, float]:
    """Items per second per case: median of `repeats` timed calls after warm-up, cases interleaved in each round so
    that load from other processes affects them alike."""
    times = {name: [] for name in cases}
    with torch.inference_mode():
        for fn, inputs in cases.values():
            fn(inputs)
            fn(inputs)
        for _ in range(repeats):
            for name, (fn, inputs) in cases.items():
                start = time.perf_counter()
                fn(inputs)
                times[name].append(time.perf_counter() - start)
    return {name: cases[name][1].shape[0] / statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tiny", action="store_true", help="a 2-layer width-192 encoder, for a quick smoke run")
    parser.add_argument("--smoke", action="store_true", help="--tiny, batch 2, one repeat (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.tiny, args.batch, args.repeats = True, 2, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    size = (
        dict(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768) if args.tiny else {}
    )
    config = UniMedIVisionConfig(**size)
    ours = UniMedIVisionModel(config).eval()
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=224,
        patch_size=16,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size,
        num_classes=0,
    ).eval()

    images = torch.rand(args.batch, 3, 224, 224)
    volumes = torch.rand(max(1, args.batch // 2), 1, *config.volume_size)
    cases = {
        "timm ViT-B/16, 224x224 (197 tokens)": (reference.forward_features, images),
        "UniMedI 2D, 224x224 (197 tokens)": (lambda x: ours(pixel_values=x), images),
        "UniMedI 3D, 32x128x128 (513 tokens)": (lambda x: ours(volume_values=x), volumes),
    }
    rates = throughputs(cases, args.repeats)
    print(f"threads={args.threads} batch={args.batch} repeats={args.repeats} torch={torch.__version__}")
    print("| encoder | items/s |\n|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.2f} |")
    names = list(rates)
    print(f"UniMedI 2D / timm ratio: {rates[names[1]] / rates[names[0]]:.3f} (target >= 1.0)")


if __name__ == "__main__":
    main()
