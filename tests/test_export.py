"""training.export: the release folder loads as Hub remote code (AutoModel, AutoProcessor, both zero-shot pipelines,
the towers, pretraining) where `modeling_unimedi` cannot be imported, and its card's metadata parses back."""

import json

import pytest
import torch
from huggingface_hub import ModelCard
from test_hub_and_conversion import place_in_hub_cache, run_without_package
from tiny_configs import TINY_TEXT, TINY_VISION, tiny_config

from modeling_unimedi import UniMedIImageProcessor, UniMedIModel, UniMedIProcessor, UniMedIVolumeProcessor
from training.export import main as export_main

METRICS = {
    "disclaimer": "Synthetic findings in one real CT.",
    "data": "data/groundtruth",
    "split": "test",
    "counts": {"xray": 8, "ct": 4},
    "zero_shot_auroc": {
        "xray": {"effusion": 0.8125, "nodule": None, "mean": 0.8125},
        "ct": {"effusion": 0.5, "mean": 0.5},
    },
    "retrieval": {
        "report_to_ct": {
            "num_queries": 4,
            "R@1": {"strict": 0.5, "same_text": 0.5, "random_strict": 0.25, "random_same_text": 0.25},
        }
    },
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, text_tokenizer):
    root = tmp_path_factory.mktemp("release")
    torch.manual_seed(0)
    model = UniMedIModel(tiny_config(text_config=dict(TINY_TEXT, vocab_size=len(text_tokenizer)))).eval()
    size = TINY_VISION["image_size"]
    processor = UniMedIProcessor(
        UniMedIImageProcessor(longest_edge=size, crop_size=size),
        text_tokenizer,
        volume_processor=UniMedIVolumeProcessor(volume_size=TINY_VISION["volume_size"]),
        max_length=TINY_TEXT["max_position_embeddings"],
    )
    model.save_pretrained(root / "final")
    processor.save_pretrained(root / "final")
    (root / "evaluation").mkdir()
    (root / "evaluation" / "metrics.json").write_text(json.dumps(METRICS))
    out = export_main([str(root / "final"), "--repo-id", "org/unimedi-tiny", "--dataset", "org/groundtruth"])
    return root, out, model, processor


def test_release_folder_is_complete(exported):
    _, out, _, _ = exported
    names = {path.name for path in out.iterdir()}
    assert {"model.safetensors", "config.json", "processor_config.json", "README.md", "LICENSE"} <= names
    assert {"modeling_unimedi.py", "pipelines_unimedi.py", "pretraining_unimedi.py", "zero_shot_unimedi.py"} <= names
    assert "Apache License" in (out / "LICENSE").read_text()
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForZeroShotImageClassification"] == "modeling_unimedi.UniMedIModel"


def test_card_metadata_round_trips(exported):
    _, out, _, _ = exported
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert (data.license, data.library_name, data.pipeline_tag) == (
        "apache-2.0",
        "transformers",
        "zero-shot-image-classification",
    )
    assert data.datasets == ["org/groundtruth"] and data.language == ["en"] and len(data.base_model) == 2
    values = {result.metric_name: result.metric_value for result in data.eval_results}
    assert values == {
        "chest X-ray zero-shot AUROC, effusion": 0.8125,
        "chest X-ray zero-shot AUROC, mean over findings": 0.8125,
        "chest CT zero-shot AUROC, effusion": 0.5,
        "chest CT zero-shot AUROC, mean over findings": 0.5,
    }
    assert {result.dataset_config for result in data.eval_results} == {"xray", "ct"}
    # the body: standard usage, intended use and limits, evaluation table, BibTeX
    for text in ("logits_per_image.softmax(dim=1)", "Intended use", "| chest CT | effusion | 0.500 |", "@inproceedings{"):
        assert text in card.text
    assert "https://arxiv.org/abs/2311.14851" in card.text and "eprint        = {2311.14851}" in card.text
    assert ModelCard(str(card)).data.to_dict() == data.to_dict()


def test_release_loads_as_hub_remote_code(exported, xray_jpeg_paths, ct_nifti_path):
    root, out, model, processor = exported
    place_in_hub_cache(out, root / "hub", "org/unimedi-tiny")
    labels = ["pleural effusion", "no effusion"]
    run = run_without_package(
        f"""
        import json
        import torch
        from transformers import AutoModel, AutoModelForPreTraining, AutoProcessor, pipeline
        from transformers.dynamic_module_utils import get_class_from_dynamic_module
        repo, labels = "org/unimedi-tiny", {labels!r}
        model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
        with torch.no_grad():
            probs = model(**processor(text=labels, images=[{str(xray_jpeg_paths[0])!r}])).logits_per_image.softmax(dim=1)
        images = pipeline("zero-shot-image-classification", model=repo, trust_remote_code=True)
        volumes = pipeline("zero-shot-volume-classification", model=repo, trust_remote_code=True)
        towers = [
            get_class_from_dynamic_module(f"modeling_unimedi.{{name}}", repo).from_pretrained(repo)
            for name in ("UniMedIVisionModelWithProjection", "UniMedITextModelWithProjection")
        ]
        text_inputs = processor(text=labels)
        with torch.no_grad():
            text_embeds = towers[1](**text_inputs).text_embeds
        pretraining = AutoModelForPreTraining.from_pretrained(repo, trust_remote_code=True)
        print(json.dumps({{
            "module": type(model).__module__,
            "probs": probs[0].tolist(),
            "image_pipeline": images({str(xray_jpeg_paths[0])!r}, candidate_labels=labels, hypothesis_template="{{}}"),
            "volume_pipeline": volumes({str(ct_nifti_path)!r}, candidate_labels=labels),
            "towers": [type(tower).__name__ for tower in towers],
            "text_embeds": text_embeds.tolist(),
            "pretraining": type(pretraining).__name__,
        }}))
        """,
        cwd=root,
        HF_HUB_CACHE=str(root / "hub"),
        HF_MODULES_CACHE=str(root / "modules"),
        HF_HUB_OFFLINE="1",
    )
    result = json.loads(run.strip().splitlines()[-1])
    with torch.no_grad():
        expected = model(**processor(text=labels, images=[xray_jpeg_paths[0]])).logits_per_image.softmax(dim=1)[0]
        ct_expected = model(**processor(text=labels, volumes=[ct_nifti_path])).logits_per_image.softmax(dim=1)[0]
        text_expected = model.get_text_features(**processor(text=labels)).pooler_output
    assert result["module"].startswith("transformers_modules.")
    assert result["probs"] == pytest.approx(expected.tolist(), abs=1e-5)
    scores = {r["label"]: r["score"] for r in result["image_pipeline"]}
    assert [scores[label] for label in labels] == pytest.approx(expected.tolist(), abs=1e-5)
    ct_scores = {r["label"]: r["score"] for r in result["volume_pipeline"]}
    assert [ct_scores[label] for label in labels] == pytest.approx(ct_expected.tolist(), abs=1e-5)
    assert result["towers"] == ["UniMedIVisionModelWithProjection", "UniMedITextModelWithProjection"]
    assert torch.allclose(torch.tensor(result["text_embeds"]), text_expected, atol=1e-5)
    assert result["pretraining"] == "UniMedIForPreTraining"
