"""How informative are a pretraining run's self-distillation targets? (issue #12: why SD does not help on CPU)

    python benchmarks/dino_targets.py outputs/groundtruth_benchmark/runs/vl_sd_attn/seed-0 --data data/groundtruth

Loads the run's newest complete checkpoint (the pretraining model with its EMA teacher and DINO centres), runs the
teacher on up to `--num` test X-rays and CTs as a training step would (full view, slab selection; BatchNorm with its
running statistics), and prints per modality what L_icl's targets are made of:

- the entropy of the centred, sharpened teacher distribution as a share of ln K (100 % = uniform: nothing to learn),
  and how many distinct prototypes the samples' targets peak on;
- the spread across samples of the centred teacher logits divided by the temperature (the softmax's input: well
  under 1 means every sample gets nearly the same, nearly uniform target);
- the mean pairwise cosine of the teacher's [CLS] states and of the DINO head's L2-normalised bottleneck (where the
  samples' differences are lost).
"""

import argparse
import math
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from modeling_unimedi.pretraining_unimedi import center_prefix
from processing.schema import CT, XRAY
from processing.shards import modality_shards
from training.checkpointing import latest_complete
from training.config import load_config
from training.data import PretrainCollator
from training.evaluation.measures import mean_pairwise_cosine
from training.pretrain import build_model, build_processor


def first_records(data: str, split: str, modality: str, num: int) -> list[dict]:
    """The first `num` records of one modality, with image and NIfTI cells as stored bytes (the collator's input)."""
    records = []
    for file in modality_shards(sorted(str(path) for path in Path(data).glob(f"{split}-*.parquet")), modality):
        records += pq.read_table(file).to_pylist()
        if len(records) >= num:
            break
    if not records:
        raise ValueError(f"{data}: no {modality} records in the {split!r} shards")
    return records[:num]


def target_statistics(model, branch) -> dict:
    """L_icl's teacher targets of one branch, centred with its modality's centre at the final teacher temperature."""
    logits = model.forward_targets([branch]).cls[0].float()
    temperature = model.config.teacher_temperature
    centred = (logits - getattr(model, center_prefix(branch) + "cls_center")) / temperature
    probabilities = F.softmax(centred, dim=-1)
    entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(-1)
    bottleneck = F.normalize(model.teacher["cls_head"].mlp(branch.teacher.pooler_output), dim=-1)
    return {
        "samples": logits.shape[0],
        "entropy_share": (entropy.mean() / math.log(logits.shape[-1])).item(),
        "distinct_peaks": len(set(probabilities.argmax(-1).tolist())),
        "max_probability": probabilities.max(-1).values.mean().item(),
        "spread": centred.std(0).mean().item(),
        "cls_cosine": mean_pairwise_cosine(F.normalize(branch.teacher.pooler_output.float(), dim=-1)),
        "bottleneck_cosine": mean_pairwise_cosine(bottleneck),
    }


@torch.no_grad()
def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a pretraining output folder (pretrain_config.json, checkpoints/)")
    parser.add_argument("--data", required=True, help="benchmark shards to draw the samples from")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num", type=int, default=64, help="samples per modality")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="for the random slabs of runs without attentive selection")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    config = load_config(run / "pretrain_config.json", [])
    checkpoint = latest_complete(run / "checkpoints")
    if checkpoint is None:
        raise FileNotFoundError(f"{run / 'checkpoints'}: no complete checkpoint")
    model = build_model(config)
    model.load_state_dict(load_file(checkpoint / "model.safetensors"))
    model.eval()
    torch.manual_seed(args.seed)
    if not model.config.self_distillation:
        raise ValueError(f"{run}: ablation {config.ablation!r} trains no self-distillation heads")
    collate = PretrainCollator(build_processor(config, model.config), training=False)
    lines = [
        f"{checkpoint}, {args.split} split of {args.data}, teacher temperature {model.config.teacher_temperature}",
        "| modality | samples | target entropy (% of ln K) | distinct peaks | mean max probability | "
        "spread of centred logits / T | teacher [CLS] cosine | DINO bottleneck cosine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for modality in (XRAY, CT):
        records = first_records(args.data, args.split, modality, args.num)
        batch = collate(records if modality == XRAY else [], records if modality == CT else [])
        if modality == XRAY:
            branch = model.forward_branch(pixel_values=batch["pixel_values"])
        else:
            branch = model.forward_volumes(batch["volume_values"], batch.get("slab_images"))[0]
        found = target_statistics(model, branch)
        lines.append(
            f"| {modality} | {found['samples']} | {100 * found['entropy_share']:.2f} | {found['distinct_peaks']} | "
            f"{found['max_probability']:.4f} | {found['spread']:.3f} | {found['cls_cosine']:.3f} | "
            f"{found['bottleneck_cosine']:.3f} |"
        )
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
