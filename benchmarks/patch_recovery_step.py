"""Step time of the two L_pcl patch-recovery settings (`patch_recovery="predictor"` vs `"mask_token"`) at the CPU
demo's model size (training/configs/demo.yaml) and batch (12 X-rays + 4 CTs), both in one process, alternating.

    OMP_NUM_THREADS=1 python benchmarks/patch_recovery_step.py [--steps 5] [--threads 1]

A step is forward + backward + AdamW + EMA update; the first step of each setting warms up and is not timed.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import yaml

from modeling_unimedi import UniMedIConfig, UniMedIForPreTraining

DEMO = yaml.safe_load((Path(__file__).parents[1] / "training" / "configs" / "demo.yaml").read_text())
TEXT = dict(model_type="bert", hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)


def build(recovery: str) -> tuple[UniMedIForPreTraining, torch.optim.Optimizer]:
    torch.manual_seed(0)
    config = UniMedIConfig.for_ablation(
        "vl+sd+attn", patch_recovery=recovery, text_config=TEXT, **DEMO["model_config"]
    )
    model = UniMedIForPreTraining(config).train()
    model.unimedi.text_model.requires_grad_(False)  # the demo freezes its text encoder
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def step(model, optimizer, inputs) -> float:
    start = time.perf_counter()
    model(**inputs).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.update_teacher(0.996)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = {name: build(name) for name in ("predictor", "mask_token")}
    vision = settings["predictor"][0].config.vision_config
    inputs = {
        "input_ids": torch.randint(1000, 2000, (16, 128)),
        "attention_mask": torch.ones(16, 128, dtype=torch.long),
        "pixel_values": torch.rand(12, 3, vision.image_size, vision.image_size),
        "volume_values": torch.rand(4, 1, *vision.volume_size),
    }
    times = {name: [] for name in settings}
    for index in range(args.steps + 1):
        for name, (model, optimizer) in settings.items():
            elapsed = step(model, optimizer, inputs)
            if index:
                times[name].append(elapsed)
    print(json.dumps({name: round(statistics.median(t), 3) for name, t in times.items()} | {"threads": args.threads}))


if __name__ == "__main__":
    main()
