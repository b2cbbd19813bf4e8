"""transformers pipelines on a saved UniMedI folder, called as documented for CLIP: the built-in
"zero-shot-image-classification" (and "image-feature-extraction" on the vision tower), and the CT pipelines of
pipelines_unimedi, locally and as Hub remote code in a process where `modeling_unimedi` cannot be imported."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_hub_and_conversion import place_in_hub_cache, run_without_package
from tiny_configs import TINY_TEXT, TINY_VISION, tiny_config
from transformers import AutoImageProcessor, pipeline

from modeling_unimedi import (
    UniMedIImageProcessor,
    UniMedIModel,
    UniMedIProcessor,
    UniMedITextModelWithProjection,
    UniMedIVisionModelWithProjection,
    UniMedIVolumeProcessor,
)

LABELS = ["pleural effusion", "pneumothorax", "no finding"]


@pytest.fixture(scope="module")
def model(text_tokenizer):
    torch.manual_seed(0)
    spread = {"initializer_range": 0.5}  # distinct scores per label on a random tiny model
    config = tiny_config(
        vision_config=dict(TINY_VISION, **spread),
        text_config=dict(TINY_TEXT, vocab_size=len(text_tokenizer), **spread),
    )
    return UniMedIModel(config).eval()


@pytest.fixture(scope="module")
def processor(text_tokenizer):
    size = TINY_VISION["image_size"]
    return UniMedIProcessor(
        UniMedIImageProcessor(longest_edge=size, crop_size=size),
        text_tokenizer,
        volume_processor=UniMedIVolumeProcessor(volume_size=TINY_VISION["volume_size"]),
        max_length=TINY_TEXT["max_position_embeddings"],
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory, model, processor):
    folder = tmp_path_factory.mktemp("unimedi")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def expected_ranking(model, processor, **vision) -> list[dict]:
    """The documented CLIP computation: softmax over the texts of `logits_per_image`, most likely first."""
    with torch.no_grad():
        probs = model(**processor(text=LABELS, **vision)).logits_per_image.softmax(dim=1)[0]
    return sorted(
        ({"score": p, "label": label} for p, label in zip(probs.tolist(), LABELS)), key=lambda r: -r["score"]
    )


def assert_same_ranking(result, expected):
    assert [r["label"] for r in result] == [r["label"] for r in expected]
    assert [r["score"] for r in result] == pytest.approx([r["score"] for r in expected], abs=1e-5)


def test_zero_shot_image_classification_pipeline(folder, model, processor, xray_jpeg_paths):
    classifier = pipeline("zero-shot-image-classification", model=str(folder))
    assert isinstance(classifier.model, UniMedIModel)
    result = classifier(str(xray_jpeg_paths[0]), candidate_labels=LABELS, hypothesis_template="{}")
    # the pipeline reads the JPEG as RGB PIL; the processor reads it from disk: the same grayscale
    assert_same_ranking(result, expected_ranking(model, processor, images=[xray_jpeg_paths[0]]))
    assert len({round(r["score"], 4) for r in result}) == 3


def test_zero_shot_volume_classification_nifti_and_dicom(
    folder, model, processor, ct_nifti_path, write_dicom_ct_series, tmp_path
):
    classifier = pipeline("zero-shot-volume-classification", model=str(folder), trust_remote_code=True)
    result = classifier(str(ct_nifti_path), candidate_labels=LABELS)
    assert_same_ranking(result, expected_ranking(model, processor, volumes=[ct_nifti_path]))
    write_dicom_ct_series(tmp_path / "series", [0.0, 2.5, 5.0, 7.5])
    on_dicom = classifier(str(tmp_path / "series"), candidate_labels=LABELS)
    assert_same_ranking(on_dicom, expected_ranking(model, processor, volumes=[tmp_path / "series"]))
    with pytest.raises(ValueError, match="candidate_labels must be a non-empty list"):
        classifier(str(ct_nifti_path), candidate_labels=[])


def test_volume_feature_extraction_pipeline(folder, model, processor, ct_nifti_path):
    extractor = pipeline("volume-feature-extraction", model=str(folder), trust_remote_code=True)
    with torch.no_grad():
        expected = model.get_volume_features(**processor(volumes=[ct_nifti_path])).pooler_output
    assert extractor(str(ct_nifti_path)) == pytest.approx(expected[0].tolist(), abs=1e-5)
    normalised = extractor(str(ct_nifti_path), return_tensors=True, normalize=True)
    assert torch.allclose(normalised, F.normalize(expected, dim=-1), atol=1e-5)


def test_image_feature_extraction_on_the_vision_tower(folder, model, processor, xray_jpeg_paths):
    extractor = pipeline(
        "image-feature-extraction",
        model=UniMedIVisionModelWithProjection.from_pretrained(folder),
        image_processor=AutoImageProcessor.from_pretrained(folder),
    )
    with torch.no_grad():
        expected = model.get_image_features(**processor(images=[xray_jpeg_paths[0]])).pooler_output
    assert torch.allclose(extractor(str(xray_jpeg_paths[0]), return_tensors=True), expected, atol=1e-5)


def test_feature_extraction_on_the_text_tower(folder, model, processor):
    extractor = pipeline(
        "feature-extraction",
        model=UniMedITextModelWithProjection.from_pretrained(folder),
        tokenizer=processor.tokenizer,
    )
    with torch.no_grad():
        expected = model.get_text_features(**processor(text=["Small left pleural effusion."])).pooler_output
    assert torch.allclose(extractor("Small left pleural effusion.", return_tensors=True), expected, atol=1e-5)


def test_pipelines_as_hub_remote_code(folder, model, processor, xray_jpeg_paths, ct_nifti_path, tmp_path):
    place_in_hub_cache(folder, tmp_path / "hub", "org/unimedi-tiny")
    out = run_without_package(
        f"""
        import json
        from transformers import pipeline
        labels = {LABELS!r}
        images = pipeline("zero-shot-image-classification", model="org/unimedi-tiny", trust_remote_code=True)
        volumes = pipeline("zero-shot-volume-classification", model="org/unimedi-tiny", trust_remote_code=True)
        features = pipeline("volume-feature-extraction", model="org/unimedi-tiny", trust_remote_code=True)
        print(json.dumps([
            type(images.model).__module__,
            images({str(xray_jpeg_paths[0])!r}, candidate_labels=labels, hypothesis_template="{{}}"),
            volumes({str(ct_nifti_path)!r}, candidate_labels=labels),
            features({str(ct_nifti_path)!r}),
        ]))
        """,
        cwd=tmp_path,
        HF_HUB_CACHE=str(tmp_path / "hub"),
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        HF_HUB_OFFLINE="1",
    )
    module, on_image, on_volume, embedding = json.loads(out.strip().splitlines()[-1])
    assert module.startswith("transformers_modules.")
    assert_same_ranking(on_image, expected_ranking(model, processor, images=[xray_jpeg_paths[0]]))
    assert_same_ranking(on_volume, expected_ranking(model, processor, volumes=[ct_nifti_path]))
    with torch.no_grad():
        expected = model.get_volume_features(**processor(volumes=[ct_nifti_path])).pooler_output[0]
    assert embedding == pytest.approx(expected.tolist(), abs=1e-5)
