"""UniMedIZeroShot (encoders, prompt ensembles, classification, retrieval), recall_at_k, and the two examples that
use it (examples/embed.py, examples/zero_shot.py), on tiny models with the real MiniLM tokenizer and sample files."""

import copy
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from tiny_configs import TINY_TEXT, TINY_VISION, tiny_config

from modeling_unimedi import UniMedIForPreTraining, UniMedIModel
from modeling_unimedi.image_processing_unimedi import UniMedIImageProcessor
from modeling_unimedi.processing_unimedi import UniMedIProcessor
from modeling_unimedi.volume_processing_unimedi import UniMedIVolumeProcessor
from modeling_unimedi.zero_shot_unimedi import UniMedIZeroShot, class_prompt_lists, recall_at_k

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO_ROOT / "examples"
TINY_MAX_LENGTH = TINY_TEXT["max_position_embeddings"]
CLASS_PROMPTS = {
    "pleural effusion": ["There is a {} .", "Findings consistent with {}."],
    "pneumothorax": ["Small apical {}.", "There is a {} .", "A {} is seen on the right."],
    "no finding": "The lungs are clear.",
}
# The same prompts written out, class by class, to check the placeholder substitution independently.
EXPANDED_PROMPTS = [
    ["There is a pleural effusion .", "Findings consistent with pleural effusion."],
    ["Small apical pneumothorax.", "There is a pneumothorax .", "A pneumothorax is seen on the right."],
    ["The lungs are clear."],
]
REPORTS = [
    "The lungs are clear. No pleural effusion or pneumothorax.",
    "Right lower lobe consolidation concerning for pneumonia.",
    "Large left pleural effusion with adjacent atelectasis. Heart size is normal.",
    "Small right apical pneumothorax.",
]


# --- fixtures --------------------------------------------------------------------------------------------------------


# With the default initialisation (std 0.02) a tiny random model gives every text nearly the same embedding (cosine
# 0.99999), which would hide a wrong ensemble or a mixed-up batch; a wide one spreads them (cosines 0.3 to 0.7).
SPREAD_OUT_INIT = dict(initializer_range=0.5)


def tiny_model(vocab_size: int) -> UniMedIModel:
    torch.manual_seed(0)
    config = tiny_config(
        vision_config=dict(TINY_VISION, **SPREAD_OUT_INIT),
        text_config=dict(TINY_TEXT, vocab_size=vocab_size, **SPREAD_OUT_INIT),
    )
    return UniMedIModel(config).eval()


@pytest.fixture(scope="module")
def model(text_tokenizer):
    return tiny_model(len(text_tokenizer))


@pytest.fixture(scope="module")
def processor(text_tokenizer):
    size = TINY_VISION["image_size"]
    return UniMedIProcessor(
        UniMedIImageProcessor(longest_edge=size + 4, crop_size=size),
        text_tokenizer,
        volume_processor=UniMedIVolumeProcessor(volume_size=TINY_VISION["volume_size"]),
        max_length=TINY_MAX_LENGTH,
    )


@pytest.fixture(scope="module")
def zero_shot(model, processor):
    return UniMedIZeroShot(model, processor, batch_size=2)


@pytest.fixture(scope="module")
def grid_volumes():
    """Five CTs already on the tiny model's grid, in HU, each with its own random structure."""
    generator = np.random.default_rng(0)
    return [generator.uniform(-1000, 1000, TINY_VISION["volume_size"]).astype(np.float32) for _ in range(5)]


@pytest.fixture(scope="module")
def examples():
    """The example scripts imported as modules (zero_shot.py imports embed.py from its own folder)."""
    sys.path.insert(0, str(EXAMPLES_DIR))
    try:
        yield importlib.import_module("embed"), importlib.import_module("zero_shot")
    finally:
        sys.path.remove(str(EXAMPLES_DIR))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, model, processor):
    """The tiny model saved with its processor, as the README's main job saves outputs/demo/final."""
    folder = tmp_path_factory.mktemp("tiny_unimedi")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def manual_embeddings(model, features: str, inputs) -> torch.Tensor:
    """Normalised projected embeddings straight from UniMedIModel.get_*_features, the reference for the wrapper."""
    with torch.no_grad():
        return F.normalize(getattr(model, features)(**inputs).pooler_output, dim=-1)


def manual_class_embeddings(model, processor, prompt_lists) -> torch.Tensor:
    means = [
        manual_embeddings(model, "get_text_features", processor(text=prompts)).mean(0) for prompts in prompt_lists
    ]
    return F.normalize(torch.stack(means), dim=-1)


# --- encoders and prompt ensembles -----------------------------------------------------------------------------------


def test_encoders_return_normalised_model_embeddings(zero_shot, model, processor, xray_jpeg_paths, grid_volumes):
    cases = [
        (zero_shot.encode_images(xray_jpeg_paths[:3]), "get_image_features", processor(images=xray_jpeg_paths[:3])),
        (zero_shot.encode_volumes(grid_volumes), "get_volume_features", processor(volumes=grid_volumes)),
        (zero_shot.encode_texts(REPORTS), "get_text_features", processor(text=REPORTS)),
    ]
    for encoded, features, inputs in cases:
        assert encoded.dtype == torch.float32
        torch.testing.assert_close(encoded.norm(dim=-1), torch.ones(len(encoded)))
        torch.testing.assert_close(encoded, manual_embeddings(model, features, inputs), atol=1e-5, rtol=1e-5)


def test_single_item_is_encoded_like_a_list_of_one(zero_shot, xray_jpeg_paths):
    torch.testing.assert_close(
        zero_shot.encode_images(xray_jpeg_paths[0]), zero_shot.encode_images(xray_jpeg_paths[:1])
    )
    torch.testing.assert_close(zero_shot.encode_texts(REPORTS[0]), zero_shot.encode_texts(REPORTS[:1]))


def test_class_prompt_lists_fill_the_class_name():
    assert class_prompt_lists(CLASS_PROMPTS) == EXPANDED_PROMPTS
    assert class_prompt_lists([["clear lungs", "no effusion"], "effusion"]) == [
        ["clear lungs", "no effusion"],
        ["effusion"],
    ]
    assert class_prompt_lists({3: ["grade {}"]}) == [["grade 3"]]


def test_ensemble_is_the_renormalised_mean_of_prompt_embeddings(zero_shot, model, processor):
    classes = zero_shot.class_embeddings(CLASS_PROMPTS)
    assert classes.shape == (3, model.config.projection_dim)
    torch.testing.assert_close(classes.norm(dim=-1), torch.ones(3))
    expected = manual_class_embeddings(model, processor, EXPANDED_PROMPTS)
    torch.testing.assert_close(classes, expected, atol=1e-5, rtol=1e-5)


# --- classification --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["images", "volumes"])
def test_classify_matches_a_manual_computation(modality, zero_shot, model, processor, xray_jpeg_paths, grid_volumes):
    samples = {"images": xray_jpeg_paths[:3], "volumes": grid_volumes}[modality]
    features = {"images": "get_image_features", "volumes": "get_volume_features"}[modality]
    probs, similarity = zero_shot.classify(**{modality: samples}, class_prompts=CLASS_PROMPTS)

    assert probs.shape == similarity.shape == (len(samples), len(CLASS_PROMPTS))
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(len(samples)))
    vision = manual_embeddings(model, features, processor(**{modality: samples}))
    expected_similarity = vision @ manual_class_embeddings(model, processor, EXPANDED_PROMPTS).T
    expected_probs = (model.logit_scale.exp() * expected_similarity).softmax(dim=-1).detach()
    torch.testing.assert_close(similarity, expected_similarity, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs, expected_probs, atol=1e-5, rtol=1e-5)


def test_batching_gives_the_same_results_as_one_batch(zero_shot, xray_jpeg_paths, grid_volumes):
    for encode, items in [
        (zero_shot.encode_images, xray_jpeg_paths[:3]),
        (zero_shot.encode_volumes, grid_volumes),
        (zero_shot.encode_texts, REPORTS),  # different lengths: padding differs between batchings
    ]:
        one_batch = encode(items, batch_size=len(items))
        torch.testing.assert_close(encode(items, batch_size=1), one_batch, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(encode(items, batch_size=3), one_batch, atol=1e-5, rtol=1e-5)
    prompts_alone = zero_shot.class_embeddings(CLASS_PROMPTS, batch_size=1)
    torch.testing.assert_close(
        zero_shot.class_embeddings(CLASS_PROMPTS, batch_size=64), prompts_alone, atol=1e-5, rtol=1e-5
    )


def test_half_precision_model_gives_float32_unit_embeddings(model, processor):
    bf16 = UniMedIZeroShot(copy.deepcopy(model).to(torch.bfloat16), processor)
    embeddings = bf16.encode_texts(REPORTS)
    assert embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(len(REPORTS)))
    reference = UniMedIZeroShot(model, processor).encode_texts(REPORTS)
    assert (embeddings * reference).sum(-1).min() > 0.99  # same directions up to bfloat16 rounding


# --- planted answers: the right class / candidate must come first ----------------------------------------------------


def planted_vectors(count: int, dim: int = 8, seed: int = 1) -> torch.Tensor:
    """`count` random unit vectors in general position (distinct, none dominated)."""
    return F.normalize(torch.randn(count, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def plant(zero_shot: UniMedIZeroShot, monkeypatch, table: dict) -> None:
    """Make the encoders look items up in `table` (name -> unnormalised vector) instead of running the model."""

    def lookup(items, batch_size=None):
        items = items if isinstance(items, list) else [items]
        return F.normalize(torch.stack([table[item] for item in items]), dim=-1)

    for encoder in ("encode_images", "encode_volumes", "encode_texts"):
        monkeypatch.setattr(zero_shot, encoder, lookup)


def test_planted_class_wins(model, processor, monkeypatch):
    zero_shot = UniMedIZeroShot(model, processor)
    centres = planted_vectors(3)
    # each class's two prompts lie symmetrically about its centre (offset orthogonal to it, so both have the same
    # norm): only the ensemble of their normalised embeddings points exactly at the centre
    offsets = planted_vectors(3, seed=2)
    offsets = 0.5 * F.normalize(offsets - (offsets * centres).sum(-1, keepdim=True) * centres, dim=-1)
    table = {
        f"class {c} prompt {p}": centres[c] + sign * offsets[c] for c in range(3) for p, sign in enumerate((1, -1))
    }
    true_classes = [2, 0, 1, 2, 0]
    table |= {f"image {i}": centres[c] + 0.05 * planted_vectors(5, seed=3)[i] for i, c in enumerate(true_classes)}
    plant(zero_shot, monkeypatch, table)

    prompts = {f"class {c}": [f"class {c} prompt 0", f"class {c} prompt 1"] for c in range(3)}
    probs, similarity = zero_shot.classify(images=[f"image {i}" for i in range(5)], class_prompts=prompts)
    assert probs.argmax(dim=-1).tolist() == true_classes
    assert similarity.argmax(dim=-1).tolist() == true_classes
    torch.testing.assert_close(zero_shot.class_embeddings(prompts), F.normalize(centres, dim=-1))


def test_planted_pairs_rank_first_both_ways(model, processor, monkeypatch):
    zero_shot = UniMedIZeroShot(model, processor)
    vectors = planted_vectors(4)
    permutation = [2, 0, 3, 1]  # report i describes CT permutation[i]
    table = {f"report {i}": vectors[permutation[i]] for i in range(4)}
    table |= {f"ct {j}": vectors[j] + 0.05 * planted_vectors(4, seed=5)[j] for j in range(4)}
    table["ct distractor"] = -vectors.sum(0)
    plant(zero_shot, monkeypatch, table)

    result = zero_shot.rank(
        [f"report {i}" for i in range(4)], volumes=[f"ct {j}" for j in range(4)] + ["ct distractor"]
    )
    assert result.similarity.shape == (4, 5)
    assert result.text_to_vision[:, 0].tolist() == permutation
    assert result.text_to_vision[:, -1].tolist() == [4] * 4  # the distractor is last for every report
    assert result.vision_to_text[:4, 0].tolist() == [permutation.index(j) for j in range(4)]
    aligned = result.similarity[:, permutation]  # column i is report i's CT: the layout recall_at_k expects
    assert recall_at_k(aligned, 1) == 1.0 and recall_at_k(aligned.T, 1) == 1.0
    assert recall_at_k(result.similarity[:, :4], 1) == 0.0  # unaligned, no report is paired with its own CT


# --- recall_at_k -----------------------------------------------------------------------------------------------------


def test_recall_at_k_on_a_hand_made_matrix():
    similarity = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.2],  # positive (0.9) is first
            [0.8, 0.5, 0.7, 0.1],  # positive (0.5) is third
            [0.3, 0.6, 0.4, 0.0],  # positive (0.4) is second; candidate 3 is a distractor for every query
        ]
    )
    assert [recall_at_k(similarity, k) for k in (1, 2, 3, 4, 10)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])
    # the other direction: candidate j's positive is query j (only the 3x3 block has positives)
    assert [recall_at_k(similarity[:, :3].T, k) for k in (1, 2)] == pytest.approx([1 / 3, 1])


def test_recall_at_k_counts_ties_against_the_query():
    assert recall_at_k(torch.tensor([[0.5, 0.5], [0.2, 0.9]]), 1) == pytest.approx(0.5)
    assert recall_at_k(torch.full((3, 3), 0.7), 1) == 0.0


@pytest.mark.parametrize(
    "similarity, k, message",
    [
        (torch.eye(3), 0, "k must be a positive int"),
        (torch.eye(3), 1.5, "k must be a positive int"),
        (torch.eye(3), True, "k must be a positive int"),
        (torch.ones(3), 1, r"must be \(num_queries, num_candidates\)"),
        (torch.eye(4)[:, :3], 1, "no more queries than candidates"),
        (torch.zeros(0, 3), 1, "at least one query"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1, "NaN"),
    ],
)
def test_recall_at_k_bad_input(similarity, k, message):
    with pytest.raises(ValueError, match=message):
        recall_at_k(similarity, k)


# --- bad input -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "class_prompts, error, message",
    [
        ({}, ValueError, "no classes"),
        ([], ValueError, "no classes"),
        ({"effusion": ["There is {}."], "pneumothorax": []}, ValueError, "class 'pneumothorax' has an empty prompt"),
        ([["clear lungs"], []], ValueError, "class 1 has an empty prompt"),
        ({"effusion": ["There is {}.", 3]}, TypeError, "class 'effusion': every prompt must be a string"),
        ({"effusion": 3}, TypeError, "class 'effusion': prompts must be a string or a list"),
        ([["There is {}."]], ValueError, "placeholder but the class has no name"),
        ("effusion", TypeError, "class_prompts must be a dict"),
    ],
)
def test_bad_class_prompts_fail_before_any_image_is_read(zero_shot, class_prompts, error, message, tmp_path):
    with pytest.raises(error, match=message):
        zero_shot.classify(images=[tmp_path / "never-read.png"], class_prompts=class_prompts)


def test_exactly_one_of_images_and_volumes(zero_shot, xray_jpeg_paths, grid_volumes):
    for kwargs in ({}, {"images": xray_jpeg_paths[:1], "volumes": grid_volumes[:1]}):
        with pytest.raises(ValueError, match="exactly one of the two"):
            zero_shot.classify(**kwargs, class_prompts=CLASS_PROMPTS)
        with pytest.raises(ValueError, match="exactly one of the two"):
            zero_shot.rank(REPORTS, **kwargs)


def test_empty_inputs_and_bad_batch_sizes(model, processor, zero_shot, tmp_path):
    with pytest.raises(ValueError, match="no images given"):
        zero_shot.encode_images([])
    with pytest.raises(ValueError, match="no text given"):
        zero_shot.rank([], volumes=[tmp_path])  # texts are encoded before the (unreadable) volume
    with pytest.raises(FileNotFoundError, match="missing.jpeg"):
        zero_shot.encode_images([tmp_path / "missing.jpeg"])
    for batch_size in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            UniMedIZeroShot(model, processor, batch_size=batch_size)
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            zero_shot.encode_texts(REPORTS, batch_size=batch_size)


def test_tokenizer_and_text_encoder_must_fit(processor, text_tokenizer):
    with pytest.raises(ValueError, match=f"tokenizer has {len(text_tokenizer)} tokens .* vocabulary of 120"):
        UniMedIZeroShot(tiny_model(120), processor)
    too_long = UniMedIProcessor(processor.image_processor, text_tokenizer, max_length=TINY_MAX_LENGTH + 1)
    with pytest.raises(ValueError, match=f"only {TINY_MAX_LENGTH} positions"):
        UniMedIZeroShot(tiny_model(len(text_tokenizer)), too_long)


# --- the examples ----------------------------------------------------------------------------------------------------


def run_example(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, str(EXAMPLES_DIR / script), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,  # the return code is asserted with the child's stderr
    )


def printed_cosines(stdout: str) -> dict[tuple[str, str], float]:
    pattern = r"cosine\(([\w-]+), ([\w-]+)\) = ([-+]\d\.\d+)"
    return {(first, second): float(value) for first, second, value in re.findall(pattern, stdout)}


def assert_cosines_match(stdout: str, model, processor, xray: Path, ct: Path, report: str) -> None:
    """The three printed similarities equal those computed here from UniMedIModel.get_*_features."""
    vectors = {
        "X-ray": manual_embeddings(model, "get_image_features", processor(images=[xray]))[0],
        "CT": manual_embeddings(model, "get_volume_features", processor(volumes=[ct]))[0],
        "report": manual_embeddings(model, "get_text_features", processor(text=[report]))[0],
    }
    cosines = printed_cosines(stdout)
    assert set(cosines) == {("X-ray", "CT"), ("X-ray", "report"), ("CT", "report")}
    for (first, second), value in cosines.items():
        assert value == pytest.approx(float(vectors[first] @ vectors[second]), abs=1e-4)


def default_xray(xray_jpeg_paths) -> Path:
    return next(path for path in xray_jpeg_paths if path.name == "NORMAL2-IM-1427-0001.jpeg")


def test_embed_example_end_to_end(model_folder, model, processor, examples, xray_jpeg_paths, ct_nifti_path):
    embed, _ = examples
    result = run_example("embed.py", "--model", str(model_folder))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"model: {model_folder}" in result.stdout and "RANDOM" not in result.stdout
    assert_cosines_match(
        result.stdout, model, processor, default_xray(xray_jpeg_paths), ct_nifti_path, embed.DEFAULT_REPORT
    )


def test_zero_shot_example_end_to_end(model_folder, model, processor, examples, xray_jpeg_paths):
    _, zero_shot_example = examples
    result = run_example("zero_shot.py", "--model", str(model_folder))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RANDOM" not in result.stdout

    rows = re.findall(
        r"^(\S+)\s+label=(\w+)\s+P\(normal\)=([\d.]+)\s+P\(pneumonia\)=([\d.]+)$", result.stdout, re.MULTILINE
    )
    assert [name for name, *_ in rows] == [path.name for path in xray_jpeg_paths]
    assert [label for _, label, *_ in rows] == ["normal"] * 8 + ["pneumonia"] * 8  # NORMAL2-* then person*_bacteria_*
    printed = torch.tensor([[float(p_normal), float(p_pneumonia)] for *_, p_normal, p_pneumonia in rows])
    expected, _ = UniMedIZeroShot(model, processor).classify(
        images=xray_jpeg_paths, class_prompts=zero_shot_example.CLASS_PROMPTS
    )
    torch.testing.assert_close(printed, expected, atol=1e-4, rtol=0)
    auroc = float(re.search(r"AUROC \(pneumonia vs normal, 16 X-rays\): ([\d.]+)", result.stdout).group(1))
    assert auroc == pytest.approx(roc_auc_score([0] * 8 + [1] * 8, expected[:, 1].numpy()), abs=1e-4)


def test_embed_example_on_what_the_training_job_saves(
    examples, model, processor, capsys, tmp_path, xray_jpeg_paths, ct_nifti_path
):
    """The main job saves UniMedIForPreTraining (student, EMA teacher, DINO heads) and the processor in one folder;
    the example must embed with the student UniMedIModel and the saved processor."""
    embed, _ = examples
    config = copy.deepcopy(model.config)
    config.dino_out_dim, config.dino_hidden_dim, config.dino_bottleneck_dim = 64, 32, 16
    pretraining = UniMedIForPreTraining(config)
    pretraining.unimedi.load_state_dict(model.state_dict())
    pretraining.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    built = embed.processor_for(model.config, processor.tokenizer)  # what the example would build without it
    assert processor.image_processor.longest_edge != built.image_processor.longest_edge

    embed.main(["--model", str(tmp_path), "--report", REPORTS[2]])
    stdout = capsys.readouterr().out
    assert_cosines_match(stdout, model, processor, default_xray(xray_jpeg_paths), ct_nifti_path, REPORTS[2])


def write_small_ct(path: Path) -> None:
    import nibabel as nib

    voxels = np.random.default_rng(0).integers(-1000, 1000, (40, 40, 12)).astype(np.int16)
    nib.save(nib.Nifti1Image(voxels, np.diag([0.8, 0.8, 2.5, 1.0])), path)


def test_examples_warn_loudly_with_random_weights(examples, monkeypatch, capsys, xray_jpeg_paths, tmp_path):
    embed, _ = examples
    monkeypatch.setattr(embed, "DEFAULT_MODEL_DIR", tmp_path / "no-trained-model")
    tiny_ct = tmp_path / "ct.nii.gz"
    write_small_ct(tiny_ct)
    embed.main(["--xray", str(xray_jpeg_paths[0]), "--ct", str(tiny_ct)])
    stdout = capsys.readouterr().out
    assert "WARNING: RANDOM WEIGHTS" in stdout and "MEANINGLESS" in stdout
    assert str(tmp_path / "no-trained-model") in stdout
    assert len(printed_cosines(stdout)) == 3


def test_example_model_folder_without_processor(examples, model, tmp_path, text_tokenizer):
    """Without a saved processor the examples build one for the model's input sizes with the MiniLM tokenizer."""
    embed, _ = examples
    model.save_pretrained(tmp_path / "model_only")
    loaded, processor, weights_are_random = embed.load_model_and_processor(tmp_path / "model_only")
    assert not weights_are_random
    assert processor.image_processor.crop_size == TINY_VISION["image_size"]
    assert processor.volume_processor.volume_size == TINY_VISION["volume_size"]
    assert processor.max_length == TINY_MAX_LENGTH
    torch.testing.assert_close(
        UniMedIZeroShot(loaded, processor).encode_texts(REPORTS),
        manual_embeddings(model, "get_text_features", processor(text=REPORTS)),
    )

    mismatched = tmp_path / "mismatched"
    tiny_model(len(text_tokenizer) - 1).save_pretrained(mismatched)
    message = rf"{mismatched} has no processor_config.json.*vocabulary of {len(text_tokenizer) - 1}"
    with pytest.raises(ValueError, match=message):
        embed.load_model_and_processor(mismatched)
    with pytest.raises(FileNotFoundError, match="absent: no such model folder"):
        embed.load_model_and_processor(tmp_path / "absent")


def test_standard_clip_zero_shot_call(text_tokenizer, xray_jpeg_paths):
    """The call CLIP's documentation shows: one X-ray against two prompts, probabilities from `logits_per_image`."""
    torch.manual_seed(0)
    model = UniMedIModel(tiny_config(text_config=dict(TINY_TEXT, vocab_size=text_tokenizer.vocab_size))).eval()
    size = TINY_VISION["image_size"]
    processor = UniMedIProcessor(
        UniMedIImageProcessor(longest_edge=size, crop_size=size), text_tokenizer, max_length=TINY_MAX_LENGTH
    )
    labels = ["pleural effusion", "no effusion"]
    inputs = processor(text=labels, images=[xray_jpeg_paths[0]], return_tensors="pt", padding=True)
    with torch.no_grad():
        outputs = model(**inputs)
    probs = outputs.logits_per_image.softmax(dim=1)
    assert probs.shape == (1, 2) and torch.allclose(probs.sum(dim=1), torch.ones(1))
    classified, _ = UniMedIZeroShot(model, processor).classify(images=[xray_jpeg_paths[0]], class_prompts=labels)
    assert torch.allclose(probs, classified, atol=1e-5)
