"""A model card for a finished pretraining run: the project's card plus this run's data, steps and settings."""

import json
from pathlib import Path

PROJECT_CARD = Path(__file__).resolve().parents[1] / "model_card.md"


def _data_summary(train_data: str | list[str]) -> str:
    """Each data folder's manifest (generated data) or preparation summary (public datasets), when present."""
    parts = []
    for folder in [train_data] if isinstance(train_data, str) else train_data:
        for name in ("manifest.json", "prepare_summary.json"):
            path = Path(folder) / name
            if path.is_file():
                summary = json.loads(path.read_text())
                summary.pop("file_errors", None)
                parts.append(f"`{folder}/{name}`:\n```json\n{json.dumps(summary, indent=2)[:3000]}\n```")
                break
        else:
            parts.append(f"`{folder}` (no manifest.json or prepare_summary.json)")
    return "\n\n".join(parts)


def write_model_card(path: Path, config, total_steps: int, log_file: Path) -> None:
    last = {}
    if log_file.is_file():
        lines = log_file.read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
    project = PROJECT_CARD.read_text() if PROJECT_CARD.is_file() else "# UniMedI\n"
    run = f"""
## This checkpoint

- Data: `{config.train_data}` (split `{config.train_split}`), {config.ct_fraction:.3f} of every batch CT.
- Objective: `{config.ablation}` (Table 7 row); model overrides: `{json.dumps(config.model_config)}`.
- Initialisation: vision `{config.vision_checkpoint or "random"}`, text `{config.text_checkpoint}`.
- Optimisation: AdamW lr {config.learning_rate}, weight decay {config.weight_decay}, global batch {config.batch_size},
  {total_steps} steps, warm-up {config.warmup_epochs} epoch(s) then cosine, precision `{config.mixed_precision}`,
  seed {config.seed}.
- Last logged step: `{json.dumps(last)}`

Data summary:

{_data_summary(config.train_data)}
"""
    path.write_text(project.rstrip() + "\n" + run)
