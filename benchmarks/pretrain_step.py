"""A UniMedIForPreTraining step on CPU, UniMedI's path against a naive implementation of the same method and model.

    python benchmarks/pretrain_step.py [--size demo vitb] [--steps 3] [--threads 1] [--profile] [--smoke]

Same model, same batch, same run (each setting in its own subprocess, so that peak resident memory, ru_maxrss, belongs
to that setting alone). A step is forward (teacher scoring passes, student passes, text encoder, every loss) +
backward + AdamW + EMA teacher update: the full objective (``vl+sd+attn``).

- naive: Eq. 1 from full attention maps: eager attention, which materialises every layer's N x N softmax (what
  ``output_attentions`` needs); a full-length student (``token_masking="none"``); the text encoder trained, so it
  runs forward and backward every step.
- UniMedI: the project's path: SDPA attention with Eq. 1 computed from the [CLS] query row only (O(N) per layer),
  attention-guided masking (the student sees ``1 - mask_ratio`` of the tokens), and the text encoder frozen as the
  demo trains it (``training.pretrain.freeze_text_layers(..., "all")``, eval mode): forward only, no backward, no
  optimizer state. The project has no cache of the frozen encoder's outputs; it still runs every step.

Sizes: ``demo`` is training/configs/demo.yaml's model (width-192 4-layer ViT with 32-pixel patches, MiniLM-L6 BERT
architecture, text length 128) at the demo's batch (12 X-rays + 4 CTs); ``vitb`` is ViT-B/16 + BERT-base with the
paper's heads at 2 X-rays + 1 CT (a CPU step at the paper's 18 per GPU takes minutes; benchmarks/gpu_pretrain.py
measures that on a GPU). Weights are random: they do not change speed.

``--profile`` adds, for UniMedI's path at the first size, where the step's time goes: forward time of each module
(teacher scoring of the CTs for slice selection, teacher passes, student passes, text encoder, DINO heads), taken
with forward hooks; backward; optimizer; EMA update. ``--smoke`` (CI): the test suite's tiny model, one step, with
the profile.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python benchmarks/pretrain_step.py` from a fresh clone

SIZES = {
    "smoke": dict(  # the test suite's tiny model: proves the code path in seconds
        model=dict(
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
        images=2,
        volumes=1,
        text_length=16,
    ),
    "demo": dict(model="training/configs/demo.yaml", images=12, volumes=4, text_length=128),
    "vitb": dict(model={}, images=2, volumes=1, text_length=128),
}
VARIANTS = ("naive", "unimedi")


def model_kwargs(size: str) -> dict:
    """UniMedIConfig kwargs of a size; the demo's come from its YAML with MiniLM's text architecture."""
    spec = SIZES[size]["model"]
    if isinstance(spec, dict):
        return dict(spec)
    import yaml
    from transformers import AutoConfig

    from processing.samples import resolve

    demo = yaml.safe_load((ROOT / spec).read_text())
    text_config = AutoConfig.from_pretrained(resolve(demo["text_checkpoint"])).to_dict()
    return {**demo["model_config"], "text_config": text_config}


def build(size: str, variant: str, images: int | None = None, volumes: int | None = None, device: str = "cpu"):
    """Model, optimizer and one batch for a size and variant (``images``/``volumes`` override the size's batch)."""
    import torch

    from modeling_unimedi import UniMedIConfig, UniMedIForPreTraining
    from training.pretrain import freeze_text_layers

    torch.manual_seed(0)
    naive = variant == "naive"
    config = UniMedIConfig.for_ablation(
        "vl+sd+attn", **model_kwargs(size), **({"token_masking": "none"} if naive else {})
    )
    model = UniMedIForPreTraining._from_config(config, attn_implementation="eager" if naive else "sdpa")
    model = model.to(device).train()
    if not naive:
        for module in freeze_text_layers(model.unimedi.text_model, "all"):
            module.eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    vision, spec = config.vision_config, SIZES[size]
    images = spec["images"] if images is None else images
    volumes = spec["volumes"] if volumes is None else volumes
    samples, length = images + volumes, spec["text_length"]
    batch = {
        "input_ids": torch.randint(1000, config.text_config.vocab_size, (samples, length)),
        "attention_mask": torch.ones(samples, length, dtype=torch.long),
        "pixel_values": torch.rand(images, 3, vision.image_size, vision.image_size) * 2 - 1,
        "volume_values": torch.rand(volumes, 1, *vision.volume_size) * 2 - 1,
    }
    return model, optimizer, {name: tensor.to(device) for name, tensor in batch.items()}


def train_step(model, optimizer, batch, timings=None) -> None:
    """Forward, backward, AdamW, EMA; ``timings`` (a dict) gets the wall time of each part when given."""
    from training import schedules

    marks = [time.perf_counter()]
    loss = model(**batch).loss
    marks.append(time.perf_counter())
    optimizer.zero_grad()
    loss.backward()
    marks.append(time.perf_counter())
    optimizer.step()
    marks.append(time.perf_counter())
    model.update_teacher(schedules.ema_momentum(model.config, int(model.num_teacher_updates), 1000))
    marks.append(time.perf_counter())
    if timings is not None:
        for name, start, end in zip(("forward", "backward", "optimizer", "EMA update"), marks, marks[1:]):
            timings[name] += end - start


def forward_hooks(model, timings: dict) -> None:
    """Accumulate the forward wall time of the step's parts into ``timings`` with forward hooks (no patching)."""
    parts = {
        "student vision passes": model.unimedi.vision_model,
        "text encoder": model.unimedi.text_model,
        "DINO heads (student + teacher)": [
            model.student.cls_head,
            model.student.patch_head,
            model.teacher.cls_head,
            model.teacher.patch_head,
        ],
    }

    def timed(module, name_of_call):
        started = []

        def before(_module, args, kwargs):
            started.append(time.perf_counter())

        def after(_module, args, kwargs, output):
            timings[name_of_call(kwargs)] += time.perf_counter() - started.pop()

        module.register_forward_pre_hook(before, with_kwargs=True)
        module.register_forward_hook(after, with_kwargs=True)

    for name, modules in parts.items():
        for module in modules if isinstance(modules, list) else [modules]:
            timed(module, lambda kwargs, name=name: name)

    def teacher_part(kwargs) -> str:
        # slice selection scores the CTs alone; the branch passes see X-rays, or CTs with their selected slices
        if kwargs.get("pixel_values") is None and kwargs.get("volume_values") is not None:
            return "teacher: CT scoring for slice selection (Eq. 1-2)"
        return "teacher passes (Eq. 1 scores + DINO targets)"

    timed(model.teacher.backbone, teacher_part)


def run_setting(size: str, variant: str, steps: int, profile: bool) -> dict:
    import torch

    model, optimizer, batch = build(size, variant)
    timings = defaultdict(float)
    times = []
    for step in range(steps + 1):  # the first step warms up and is not timed
        if profile and step == 1:
            forward_hooks(model, timings)
        start = time.perf_counter()
        train_step(model, optimizer, batch, timings if profile and step else None)
        if step:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    spec = SIZES[size]
    result = {
        "size": size,
        "variant": variant,
        "batch": f"{spec['images']} X-rays + {spec['volumes']} CTs",
        "step_s": step_s,
        "samples_per_s": (spec["images"] + spec["volumes"]) / step_s,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "threads": torch.get_num_threads(),
    }
    if profile:
        result["profile_s"] = {name: seconds / steps for name, seconds in timings.items()}
    return result


def print_profile(result: dict) -> None:
    profile = result["profile_s"]
    step = sum(profile[name] for name in ("forward", "backward", "optimizer", "EMA update"))
    print(f"\n### Where UniMedI's {result['size']} step goes ({result['batch']}, {step:.3f} s per step)\n")
    print("| part | s per step | share of step |\n|---|---:|---:|")
    forward_parts = [name for name in profile if name not in ("forward", "backward", "optimizer", "EMA update")]
    for name in sorted(forward_parts, key=profile.get, reverse=True):
        print(f"| forward: {name} | {profile[name]:.3f} | {100 * profile[name] / step:.1f} % |")
    rest = profile["forward"] - sum(profile[name] for name in forward_parts)
    print(f"| forward: rest (losses, slicing, projections) | {rest:.3f} | {100 * rest / step:.1f} % |")
    for name in ("backward", "optimizer", "EMA update"):
        print(f"| {name} | {profile[name]:.3f} | {100 * profile[name] / step:.1f} % |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), nargs="+", default=["demo", "vitb"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--profile", action="store_true", help="also break UniMedI's step at the first size down")
    parser.add_argument("--smoke", action="store_true", help="the tiny test model, one step, with the profile (CI)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.size, args.steps, args.profile = ["smoke"], 1, True
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        size, variant, profile = args.worker.split(":")
        print(json.dumps(run_setting(size, variant, args.steps, profile == "profile")))
        return
    rows = []
    for index, size in enumerate(args.size):
        for variant in VARIANTS:
            profile = "profile" if args.profile and index == 0 and variant == "unimedi" else "plain"
            command = [sys.executable, __file__, "--worker", f"{size}:{variant}:{profile}"]
            command += ["--steps", str(args.steps), "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"{size}/{variant} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"CPU, {args.threads} thread(s), median of {args.steps} step(s) after a warm-up step")
    print("\n| size | batch | path | step (s) | samples/s | peak RSS (GiB) | UniMedI / naive samples/s | memory |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for naive, ours in zip(rows[::2], rows[1::2]):
        for row in (naive, ours):
            speedup = f"{ours['samples_per_s'] / naive['samples_per_s']:.2f}x" if row is ours else ""
            memory = f"{ours['peak_rss_gib'] / naive['peak_rss_gib']:.2f}x" if row is ours else ""
            print(
                f"| {row['size']} | {row['batch']} | {row['variant']} | {row['step_s']:.3f} | "
                f"{row['samples_per_s']:.2f} | {row['peak_rss_gib']:.2f} | {speedup} | {memory} |"
            )
    for row in rows:
        if "profile_s" in row:
            print_profile(row)


if __name__ == "__main__":
    main()
