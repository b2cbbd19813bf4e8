"""Per-step time and peak memory of a UniMedIForPreTraining step on CPU, with and without attention-guided masking,
and the share of the step spent in attentive slice selection.

    python benchmarks/pretrain_step.py [--size tiny|vitb] [--images 4] [--volumes 2] [--steps 3] [--smoke]

Each setting runs in its own subprocess so that peak resident memory (ru_maxrss) belongs to that setting alone. A step
is forward (teacher scoring passes, student pass, text encoder, all losses) + backward + AdamW + EMA update.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

SIZES = {
    "tiny": dict(
        vision_config=dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768),
        text_config=dict(
            model_type="bert", hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512
        ),
        dino_out_dim=1024,
        dino_hidden_dim=512,
        dino_bottleneck_dim=128,
    ),
    "smoke": dict(  # the test suite's tiny model: proves the code path in seconds
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=32,
            volume_size=(8, 32, 32),
            volume_patch_size=(4, 16, 16),
        ),
        text_config=dict(
            model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
        ),
        dino_out_dim=64,
        dino_hidden_dim=32,
        dino_bottleneck_dim=16,
    ),
    "vitb": dict(),  # ViT-B/16 + BERT-base (BioClinicalBERT architecture), the paper's heads
}


def run_setting(size: str, masking: str, images: int, volumes: int, steps: int) -> dict:
    import torch

    from modeling_unimedi import UniMedIConfig, UniMedIForPreTraining

    torch.manual_seed(0)
    config = UniMedIConfig.for_ablation("vl+sd+attn", token_masking=masking, **SIZES[size])
    model = UniMedIForPreTraining(config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    vision = config.vision_config
    inputs = {
        "input_ids": torch.randint(1000, 2000, (images + volumes, 128)),
        "attention_mask": torch.ones(images + volumes, 128, dtype=torch.long),
        "pixel_values": torch.rand(images, 3, vision.image_size, vision.image_size),
        "volume_values": torch.rand(volumes, 1, *vision.volume_size),
    }
    selection_time = [0.0]
    select = model.select_slabs

    def timed_select(*args, **kwargs):
        start = time.perf_counter()
        result = select(*args, **kwargs)
        selection_time[0] += time.perf_counter() - start
        return result

    model.select_slabs = timed_select
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, selection = [], []
    for step in range(steps + 1):  # the first step warms up and is not timed
        selection_time[0] = 0.0
        start = time.perf_counter()
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.update_teacher(total_steps=1000)
        if step:
            times.append(time.perf_counter() - start)
            selection.append(selection_time[0])
    step_time = statistics.median(times)
    return {
        "size": size,
        "masking": masking,
        "batch": f"{images} X-rays + {volumes} CTs",
        "step_s": round(step_time, 3),
        "slice_selection_share": round(statistics.median(selection) / step_time, 4),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "rss_growth_during_steps_gib": round(
            (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_rss) / 2**20, 2
        ),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), nargs="+", default=["tiny", "vitb"])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--volumes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="the tiny test model, 1 X-ray + 1 CT, one step (CI)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.size, args.images, args.volumes, args.steps = ["smoke"], 1, 1, 1
    if args.worker:
        size, masking = args.worker.split(":")
        print(json.dumps(run_setting(size, masking, args.images, args.volumes, args.steps)))
        return
    rows = []
    for size in args.size:
        for masking in ("attentive", "none"):
            command = [
                sys.executable,
                __file__,
                "--worker",
                f"{size}:{masking}",
                "--images",
                str(args.images),
                "--volumes",
                str(args.volumes),
                "--steps",
                str(args.steps),
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("| size | student masking | batch | step (s) | slice selection share | peak RSS (GiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} | {r['masking']} | {r['batch']} | {r['step_s']} | {100 * r['slice_selection_share']:.1f} % "
            f"| {r['peak_rss_gib']} |"
        )


if __name__ == "__main__":
    main()
