"""Release a trained UniMedI as a complete Hub repository folder, and optionally upload it.

    python -m training.export outputs/demo/final --repo-id org/unimedi-vitb16 [--out DIR] [--evaluation metrics.json]
        [--dataset NAME ...] [--base-model ID ...] [--push]

writes to DIR (default: `<model folder>-hub`): `model.safetensors` and `config.json` (with `auto_map` for every
Auto* factory and `custom_pipelines` for the CT pipelines), the processor (tokenizer, X-ray and CT settings), the
remote code (every flat file of `modeling_unimedi`, so AutoModel, AutoProcessor, the pipelines, the towers and
pretraining load without the package), `README.md` (model card with full YAML metadata and the model-index from the
evaluation JSON; default: `evaluation/metrics.json` next to the model folder, as `training.evaluate` writes it) and
`LICENSE`. `--push` uploads the folder with huggingface_hub (needs a token with write access).
"""

import argparse
import json
import shutil
from pathlib import Path

from modeling_unimedi import UniMedIModel, UniMedIProcessor
from training.model_card import release_card

LICENSE_FILE = Path(__file__).resolve().parents[1] / "LICENSE"
# The paper's initialisation: ImageNet ViT-B/16 for the vision tower and BioClinicalBERT for the report encoder.
PAPER_BASE_MODELS = ["google/vit-base-patch16-224-in21k", "emilyalsentzer/Bio_ClinicalBERT"]


def export(
    model_dir: str | Path,
    repo_id: str,
    out_dir: str | Path | None = None,
    evaluation: str | Path | None = None,
    datasets: list[str] | None = None,
    base_models: list[str] | None = None,
) -> Path:
    """Write the Hub folder of the model in `model_dir` (a UniMedIModel or pretraining folder) and return its path."""
    model_dir = Path(model_dir)
    out_dir = Path(out_dir) if out_dir is not None else model_dir.with_name(model_dir.name + "-hub")
    evaluation = Path(evaluation) if evaluation is not None else model_dir.parent / "evaluation" / "metrics.json"
    if "/" not in repo_id:
        raise ValueError(f"--repo-id must be 'organisation/name', got {repo_id!r}")
    model = UniMedIModel.from_pretrained(model_dir)  # a pretraining folder gives its student
    processor = UniMedIProcessor.from_pretrained(model_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    metrics = json.loads(evaluation.read_text()) if evaluation.is_file() else None
    card = release_card(
        model.config,
        repo_id,
        metrics,
        datasets=datasets if datasets is not None else [],
        base_models=base_models if base_models is not None else PAPER_BASE_MODELS,
    )
    card.save(out_dir / "README.md")
    shutil.copyfile(LICENSE_FILE, out_dir / "LICENSE")
    return out_dir


def push(out_dir: Path, repo_id: str, private: bool = False) -> str:
    """Create the model repository if needed and upload the folder; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(folder_path=out_dir, repo_id=repo_id, commit_message="Release UniMedI").commit_url


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--out")
    parser.add_argument("--evaluation", help="metrics.json of training.evaluate")
    parser.add_argument("--dataset", action="append", dest="datasets", help="Hub id of a training dataset")
    parser.add_argument("--base-model", action="append", dest="base_models", help="Hub id of an initialisation")
    parser.add_argument("--push", action="store_true")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    out_dir = export(args.model_dir, args.repo_id, args.out, args.evaluation, args.datasets, args.base_models)
    print(f"wrote {out_dir}")
    if args.push:
        print(f"uploaded: {push(out_dir, args.repo_id, args.private)}")
    return out_dir


if __name__ == "__main__":
    main()
