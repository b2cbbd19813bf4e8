"""A model card for a finished pretraining run: the project's card plus this run's data, steps and settings."""

import json
from pathlib import Path

PROJECT_CARD = Path(__file__).resolve().parents[1] / "model_card.md"

STEM_WORDS = {"linear": "linear patch tokenizers", "conv_stem": "convolutional-stem tokenizers"}


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


# ---------------------------------------------------------------- release card (training.export)

# The paper (title and authors as in shared/paper/paper.txt, which does not state its arXiv id): arXiv 2311.14851,
# published at ECCV 2024, as copies of the arXiv abstract page and the ECCV 2024 proceedings page (doi below) show.
PAPER_URL = "https://arxiv.org/abs/2311.14851"
BIBTEX = """@inproceedings{he2024unimedi,
  title         = {Unified Medical Image Pre-training in Language-Guided Common Semantic Space},
  author        = {He, Xiaoxuan and Yang, Yifan and Jiang, Xinyang and Luo, Xufang and Hu, Haoji and Zhao, Siyun and
                   Li, Dongsheng and Yang, Yuqing and Qiu, Lili},
  booktitle     = {European Conference on Computer Vision (ECCV)},
  year          = {2024},
  doi           = {10.1007/978-3-031-73004-7_8},
  eprint        = {2311.14851},
  archivePrefix = {arXiv}
}"""
TAGS = ["medical-imaging", "chest-x-ray", "ct", "vision-language", "clip", "zero-shot", "unimedi"]
MODALITY_NAMES = {"xray": "chest X-ray", "ct": "chest CT"}


def _project_card_body() -> str:
    """The project card without its YAML header (the release card writes its own metadata)."""
    text = PROJECT_CARD.read_text() if PROJECT_CARD.is_file() else "# UniMedI\n"
    if text.startswith("---"):
        text = text.split("---", 2)[2]
    return text.strip()


def eval_results(metrics: dict, dataset_name: str):
    """huggingface_hub EvalResults (the card's model-index) for the zero-shot AUROCs of `training.evaluate`."""
    from huggingface_hub import EvalResult

    results = []
    for modality, aurocs in metrics.get("zero_shot_auroc", {}).items():
        for finding, value in aurocs.items():
            if value is None:
                continue
            label = "mean over findings" if finding == "mean" else finding
            results.append(
                EvalResult(
                    task_type="zero-shot-image-classification",
                    dataset_type=dataset_name,
                    dataset_name=f"{dataset_name} ({metrics.get('split', 'test')}, {MODALITY_NAMES.get(modality, modality)})",
                    dataset_config=modality,
                    dataset_split=metrics.get("split"),
                    metric_type="roc_auc",
                    metric_name=f"{MODALITY_NAMES.get(modality, modality)} zero-shot AUROC, {label}",
                    metric_value=round(float(value), 4),
                )
            )
    return results


def _evaluation_section(metrics: dict | None) -> str:
    if not metrics:
        return "## Evaluation\n\nNo evaluation JSON was given with this export (`python -m training.evaluate`).\n"
    rows = ["| Modality | Finding | Zero-shot AUROC |", "|---|---|---|"]
    for modality, aurocs in metrics.get("zero_shot_auroc", {}).items():
        rows += [
            f"| {MODALITY_NAMES.get(modality, modality)} | {finding} | {'n/a' if value is None else f'{value:.3f}'} |"
            for finding, value in aurocs.items()
        ]
    retrieval = ["| Query -> candidates | k | Recall@k (strict) | random |", "|---|---|---|---|"]
    for name, result in metrics.get("retrieval", {}).items():
        for key, recall in result.items():
            if key.startswith("R@"):
                retrieval.append(f"| {name} | {key[2:]} | {recall['strict']:.3f} | {recall['random_strict']:.3f} |")
    note = metrics.get("disclaimer", "")
    return (
        f"## Evaluation\n\nMeasured by `python -m training.evaluate` on `{metrics.get('data')}` (split "
        f"`{metrics.get('split')}`, counts {json.dumps(metrics.get('counts', {}))}). {note}\n\n"
        + "\n".join(rows)
        + "\n\n"
        + "\n".join(retrieval)
        + "\n"
    )


def release_card(config, repo_id: str, metrics: dict | None, datasets: list[str], base_models: list[str]):
    """The Hub model card of an exported UniMedI: YAML metadata (license, library, pipeline tag, tags, datasets,
    base models, language, model-index from `metrics`) and a body with the standard zero-shot call, the model's
    configuration, the evaluation, intended use and limits (the project card) and the citation."""
    from huggingface_hub import ModelCard, ModelCardData

    dataset_name = datasets[0] if datasets else "unimedi-evaluation"
    data = ModelCardData(
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        tags=TAGS,
        datasets=datasets or None,
        base_model=base_models or None,
        language=["en"],
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results(metrics, dataset_name) if metrics else None,
    )
    vision, text = config.vision_config, config.text_config
    body = f"""
# {repo_id.split("/")[-1]}: UniMedI

[UniMedI]({PAPER_URL}) embeds chest X-rays, chest CT volumes and radiology reports into one space. This checkpoint:
a {vision.num_hidden_layers}-layer ViT (hidden size {vision.hidden_size}, {vision.patch_size}px 2D patches on
{vision.image_size}px X-rays, {tuple(vision.volume_patch_size)} 3D patches on {tuple(vision.volume_size)} CTs,
{STEM_WORDS[vision.patch_embedding]}), a
{text.num_hidden_layers}-layer `{text.model_type}` report encoder (hidden size {text.hidden_size}), projection
dimension {config.projection_dim}. The modelling code ships with the checkpoint: load it with `trust_remote_code=True`.

## Zero-shot classification (as CLIP)

```python
from transformers import AutoModel, AutoProcessor, pipeline

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
inputs = processor(text=["pleural effusion", "no effusion"], images=["cxr.jpg"], return_tensors="pt", padding=True)
probs = model(**inputs).logits_per_image.softmax(dim=1)

classifier = pipeline("zero-shot-image-classification", model="{repo_id}", trust_remote_code=True)
classifier("cxr.jpg", candidate_labels=["pleural effusion", "no effusion"], hypothesis_template="{{}}")
ct_classifier = pipeline("zero-shot-volume-classification", model="{repo_id}", trust_remote_code=True)
ct_classifier("chest_ct.nii.gz", candidate_labels=["pleural effusion", "no effusion"])  # or a DICOM folder
```

CT embeddings: `pipeline("volume-feature-extraction", model=..., trust_remote_code=True)`; the towers
`UniMedIVisionModelWithProjection` / `UniMedITextModelWithProjection` load their part of this checkpoint; pretraining
continues from it with `AutoModelForPreTraining`.

{_project_card_body()}

{_evaluation_section(metrics)}
## Citation

Paper: {PAPER_URL}

```bibtex
{BIBTEX}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
