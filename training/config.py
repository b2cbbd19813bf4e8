"""Pretraining settings: one dataclass whose defaults are the paper's (§4.1), a YAML/JSON file, and CLI overrides."""

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


@dataclass
class PretrainConfig:
    # data
    train_data: str | list[str] = "data/groundtruth"  # folder(s) of `train-*.parquet` shards, or a Hub dataset id
    train_split: str = "train"
    ct_fraction: float = 0.125  # share of CTs in every batch; CTs are ~25x scarcer than X-rays, so they repeat more
    shuffle_buffer: int = 1000
    generate_default_data: bool = True  # build the ground-truth benchmark data if `train_data` is missing
    # model
    model_config: dict = field(default_factory=dict)  # UniMedIConfig overrides (sizes, ablation switches, ...)
    ablation: str = "vl+sd+attn"  # a row of Table 7: "vl", "vl+sd", "vl+sd+attn" (or "vl+sd(random-mask)")
    vision_checkpoint: str | None = None  # timm ViT name or state-dict file (ImageNet init in the paper)
    text_checkpoint: str | None = "emilyalsentzer/Bio_ClinicalBERT"  # BERT-family folder or Hub id
    tokenizer: str | None = None  # defaults to text_checkpoint
    max_length: int = 256
    freeze_text_layers: int | str = (
        0  # freeze the text embeddings and this many bottom layers, or "all" (ConVIRT: 6/12)
    )
    # start the text projection with the report encoder's mean [CLS] direction projected out (training/text_projection.py)
    center_text_projection: bool = False
    # optimisation (paper: AdamW, lr 2e-5, weight decay 0.05, 20 warm-up epochs then cosine, batch 144, 50 epochs)
    learning_rate: float = 2e-5
    text_learning_rate: float | None = None  # the text encoder's own rate; None: learning_rate
    text_projection_learning_rate: float | None = None  # the text projection's own rate (0: kept as initialised)
    weight_decay: float = 0.05
    batch_size: int = 144  # global, across processes and accumulation steps
    num_epochs: float = 50.0
    warmup_epochs: float = 20.0
    max_steps: int | None = None  # overrides num_epochs when set
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 3.0  # DINO's clip value; the paper gives none
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    gradient_checkpointing: bool = False
    seed: int = 0
    # checkpoints and logs
    output_dir: str = "outputs/pretrain"
    save_every_steps: int = 500
    keep_checkpoints: int = 2
    resume: bool | str = False  # True: the newest complete checkpoint of output_dir; or a checkpoint folder
    overwrite_output_dir: bool = False  # start over in an output_dir that holds an earlier run's checkpoints
    stop_after_step: int | None = None  # end this run cleanly after this step's checkpoint (preemptible jobs)
    log_every_steps: int = 10
    report_to: str = "auto"  # "auto" (tensorboard if installed), "none", or an Accelerate tracker name

    def to_dict(self) -> dict:
        """The settings as JSON values (tuples become lists), as stored in `pretrain_config.json` and checkpoints."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def __post_init__(self):
        for spec in dataclasses.fields(self):  # YAML reads "5e-5" as a string: coerce numbers, reject the rest
            value = getattr(self, spec.name)
            annotation = spec.type.__name__ if isinstance(spec.type, type) else str(spec.type)
            number_type = {"float": float, "int": int, "float | None": float, "int | None": int}.get(annotation)
            if number_type is not None and isinstance(value, str):
                try:
                    setattr(self, spec.name, number_type(float(value)) if number_type is int else float(value))
                except ValueError:
                    raise ValueError(f"setting {spec.name!r} must be a number, got {value!r}") from None
        if not 0.0 <= self.ct_fraction <= 1.0:
            raise ValueError(f"ct_fraction must be in [0, 1], got {self.ct_fraction}")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("batch_size and gradient_accumulation_steps must be >= 1")


# Settings a resumed run may change: where and how often it logs and saves, and when it ends. Every other setting
# (learning rate, batch size, seed, data, shuffle buffer, ablation, model...) and the number of processes must match
# the checkpoint's, or the run would silently continue as a different experiment.
RESUMABLE_OVERRIDES = frozenset(
    {
        "max_steps",
        "num_epochs",
        "stop_after_step",
        "output_dir",
        "resume",
        "overwrite_output_dir",
        "generate_default_data",
        "save_every_steps",
        "keep_checkpoints",
        "log_every_steps",
        "report_to",
    }
)


def settings_changed_on_resume(saved: dict, current: dict) -> list[str]:
    """`name: checkpoint value -> current value` for every setting that differs and may not be overridden."""
    names = sorted((set(saved) | set(current)) - RESUMABLE_OVERRIDES)
    return [
        f"{name}: {saved.get(name)!r} -> {current.get(name)!r}"
        for name in names
        if saved.get(name) != current.get(name)
    ]


def load_config(path: str | Path | None, overrides: list[str]) -> PretrainConfig:
    """Settings from a YAML/JSON file (default: the CPU demo), then `key=value` overrides parsed as YAML values."""
    values = {}
    path = DEMO_CONFIG if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    values.update(yaml.safe_load(path.read_text()) or {})
    known = {f.name for f in dataclasses.fields(PretrainConfig)}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.lstrip("-").replace("-", "_")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key=value")
        if key.startswith("model_config."):
            values.setdefault("model_config", {})[key.split(".", 1)[1]] = yaml.safe_load(raw)
            continue
        if key not in known:
            raise ValueError(f"unknown setting {key!r}; known: {', '.join(sorted(known))}")
        values[key] = yaml.safe_load(raw)
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {sorted(unknown)}")
    return PretrainConfig(**values)


def parse_args(argv=None) -> PretrainConfig:
    parser = argparse.ArgumentParser(
        description="UniMedI pretraining (run with `accelerate launch`). Without --config, the CPU demo settings.",
        epilog="Overrides: key=value, e.g. max_steps=100 model_config.mask_ratio=0.75 ablation=vl",
    )
    parser.add_argument("--config", help="YAML/JSON settings file (see training/configs/)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        metavar="CHECKPOINT",
        help="continue from the newest complete checkpoint of output_dir, or from the given checkpoint folder",
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        args.overrides.insert(0, args.resume)  # `--resume max_steps=200`: an override, not a checkpoint
        args.resume = True
    config = load_config(args.config, args.overrides)
    if args.resume:
        config.resume = args.resume
    return config


def to_json(config: PretrainConfig) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)
