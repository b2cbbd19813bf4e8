"""training/evaluate.py and training/evaluation/: the exact random hit rate, slice hit rates, recall with duplicate
reports, AUROC and alignment wiring on planted embeddings, and the CLI end to end on a tiny saved model and a tiny
generated benchmark."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_configs import TINY_TEXT, TINY_VISION, minilm_path, tiny_config

from modeling_unimedi import UniMedIForPreTraining
from modeling_unimedi.metrics_unimedi import recall_at_k, recall_at_k_relevant
from processing.groundtruth import GroundTruthConfig, generate
from training.config import PretrainConfig
from training.evaluation.data import load_model, load_samples
from training.evaluation.measures import (
    FINDING_PROMPTS,
    mean_pairwise_cosine,
    nearest_neighbour_agreement,
    same_text,
    zero_shot_aurocs,
)
from training.evaluation.report import collapse_verdicts, selection_verdicts
from training.evaluation.slice_selection import ANY_LESION, lesion_slabs, selection_ks, slice_selection
from training.evaluation.statistics import hit_statistics, poisson_binomial_tail, random_hit_probability
from training.pretrain import build_processor

# The generator's grid (32 x 128 x 128) with demo-sized patches: 4 x 4 x 4 = 64 volume tokens, 2 x 2 image tokens.
EVAL_VISION = dict(
    TINY_VISION, image_size=64, patch_size=32, volume_size=(32, 128, 128), volume_patch_size=(8, 32, 32)
)


# --- random expectation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_slabs, num_lesion_slabs, k", [(8, 1, 2), (8, 3, 2), (4, 1, 1), (10, 2, 3), (8, 6, 3)])
def test_random_hit_probability_matches_monte_carlo(num_slabs, num_lesion_slabs, k):
    rng = np.random.default_rng(0)
    draws = 20000
    picks = rng.random((draws, num_slabs)).argsort(axis=1)[:, :k]  # k distinct slabs per draw, uniformly
    simulated = (picks < num_lesion_slabs).any(axis=1).mean()  # lesion in slabs 0 .. L-1 (any L slabs will do)
    assert random_hit_probability(num_slabs, num_lesion_slabs, k) == pytest.approx(simulated, abs=0.012)


def test_random_hit_probability_edges_and_bad_input():
    assert random_hit_probability(8, 0, 3) == 0.0
    assert random_hit_probability(8, 6, 3) == 1.0  # only 2 lesion-free slabs: 3 picks must hit
    assert random_hit_probability(8, 1, 2) == pytest.approx(2 / 8)
    with pytest.raises(ValueError, match="num_relevant"):
        random_hit_probability(4, 5, 1)


def test_poisson_binomial_tail_is_exact():
    assert poisson_binomial_tail([0.5, 0.5], 1) == pytest.approx(0.75)
    assert poisson_binomial_tail([0.25, 0.5, 1.0], 3) == pytest.approx(0.125)
    assert poisson_binomial_tail([0.3, 0.6], 0) == pytest.approx(1.0)


# --- slice selection -------------------------------------------------------------------------------------------------


def ct_metadata(*lesions, num_slabs=8):
    """Generator-style CT metadata: lesions as (finding, generator slabs)."""
    return {"num_slabs": num_slabs, "lesions": [{"finding": name, "slabs": list(slabs)} for name, slabs in lesions]}


def test_lesion_slabs_map_generator_slabs_onto_model_depth_tokens():
    metadata = ct_metadata(("nodule", [5]), ("pleural_effusion", [1, 2, 3]), ("consolidation", []))
    coarse = lesion_slabs(metadata, num_model_slabs=4)  # model slab j = generator slabs 2j, 2j+1
    assert coarse == {"nodule": {2}, "pleural_effusion": {0, 1}, ANY_LESION: {0, 1, 2}}  # off-grid lesion dropped
    assert lesion_slabs(metadata, 8)["nodule"] == {5}
    assert lesion_slabs(metadata, 16)["nodule"] == {10, 11}
    assert lesion_slabs(ct_metadata(), 4) == {}


def test_planted_scores_hit_every_lesion_and_inverted_scores_none():
    metadata = [ct_metadata(("nodule", [s])) for s in (0, 2, 5, 7)] + [ct_metadata()]  # last CT: normal
    planted = torch.full((5, 8), 0.1)
    for row, slab in enumerate((0, 2, 5, 7, 0)):
        planted[row, slab] = 1.0
    result = slice_selection(planted, metadata, num_selected=1)
    assert result["num_slabs"] == 8
    by_key = {(row["lesion"], row["rule"]): row for row in result["rows"]}
    assert set(by_key) == {
        (lesion, rule) for lesion in (ANY_LESION, "nodule") for rule in ("configured", "top_20_percent")
    }
    configured = by_key["nodule", "configured"]
    assert (configured["cts"], configured["hits"], configured["hit_rate"], configured["k"]) == (4, 4, 1.0, 1)
    assert configured["random_hit_rate"] == pytest.approx(1 / 8)
    assert configured["p_value"] == pytest.approx((1 / 8) ** 4)  # random hits all four only by luck
    assert by_key["nodule", "top_20_percent"]["k"] == 2  # 20 % of 8 slabs, rounded
    assert by_key["nodule", "top_20_percent"]["random_hit_rate"] == pytest.approx(2 / 8)
    assert result["rules"]["configured"]["most_common_share"] == pytest.approx(2 / 5)  # slab 0: CT 0 and the normal
    inverted = slice_selection(-planted, metadata, num_selected=1)
    assert all(row["hit_rate"] == 0.0 and row["p_value"] == 1.0 for row in inverted["rows"])


def test_constant_selection_is_reported_as_a_position_prior():
    metadata = [ct_metadata(("nodule", [s])) for s in (4, 5, 4, 1)]
    constant = torch.tensor([0.0, 0.1, 0.9, 0.2]).expand(4, -1)  # slab 2 of 4 = generator slabs 4-5, for every CT
    result = slice_selection(constant, metadata, num_selected=1)
    assert result["rules"] == {
        "configured_and_top_20_percent": {"k": 1, "most_common_selection": [2], "most_common_share": 1.0}
    }
    nodule = next(row for row in result["rows"] if row["lesion"] == "nodule")
    assert (nodule["hit_rate"], nodule["same_slabs_hit_rate"]) == (0.75, 0.75)
    verdicts = selection_verdicts(result)
    assert verdicts[0].startswith("Selection is (nearly) constant: slab(s) [2] for 100% of CTs")
    assert len(verdicts) == 1 + len(result["rows"])
    assert (
        "above random" in verdicts[-1] and "a position prior, not a per-CT choice, explains the gain" in verdicts[-1]
    )


def test_selection_ks_follow_the_config_and_the_authors_share():
    assert selection_ks(2, 8) == {"configured_and_top_20_percent": 2}  # 20 % of 8 slabs = 1.6 -> 2
    assert selection_ks(1, 8) == {"configured": 1, "top_20_percent": 2}
    assert selection_ks(0, 4) == {"top_20_percent": 1}  # no configured k: at least one slab
    assert selection_ks(3, 16) == {"configured_and_top_20_percent": 3}


def test_hit_statistics_count_overlaps_per_ct():
    stats = hit_statistics([{0, 1}, {2}, {3}], [{1, 2}, {0}, {3, 4, 5}], num_slabs=6, k=2)
    assert (stats["cts"], stats["hits"]) == (3, 2)
    expected = np.mean([random_hit_probability(6, n, 2) for n in (2, 1, 3)])
    assert stats["random_hit_rate"] == pytest.approx(expected)


# --- retrieval -------------------------------------------------------------------------------------------------------


def test_recall_with_duplicate_reports_and_ties():
    reports = ["Normal chest.", "Normal  chest.", "Nodule in the right upper lobe.", "Large effusion."]
    relevant = same_text(reports)
    assert relevant.tolist()[0] == [True, True, False, False]  # whitespace does not make a new report
    similarity = torch.tensor(
        [
            [0.5, 0.9, 0.1, 0.0],  # own image second, but its duplicate-text image is first
            [0.9, 0.5, 0.1, 0.0],
            [0.8, 0.1, 0.7, 0.0],  # own image second behind an unrelated one
            [0.3, 0.3, 0.3, 0.3],  # all tied: ties rank against the query
        ]
    )
    assert recall_at_k_relevant(similarity, relevant, 1) == pytest.approx(2 / 4)
    assert recall_at_k_relevant(similarity, relevant, 2) == pytest.approx(3 / 4)
    strict = torch.eye(4, dtype=torch.bool)
    for k in (1, 2, 3, 4):
        assert recall_at_k_relevant(similarity, strict, k) == pytest.approx(recall_at_k(similarity, k))
    with pytest.raises(ValueError, match="relevant"):
        recall_at_k_relevant(similarity, torch.zeros(4, 4, dtype=torch.bool), 1)


# --- zero-shot AUROC and alignment -----------------------------------------------------------------------------------


class PlantedZeroShot:
    """Stands in for UniMedIZeroShot: each class's ensemble embeds to its own orthonormal axis."""

    def __init__(self, dim=8):
        self.model = SimpleNamespace(logit_scale=torch.tensor(np.log(1 / 0.07)))
        self.axes = {}
        self.dim = dim

    def class_embeddings(self, class_prompts):
        rows = []
        for prompts in class_prompts:
            key = tuple(prompts)
            self.axes.setdefault(key, len(self.axes))
            rows.append(F.one_hot(torch.tensor(self.axes[key]), self.dim).float())
        return torch.stack(rows)


def planted_vision(zero_shot, finding, labels, noise=0.05, seed=0):
    """Embeddings near the finding's positive axis for samples with the finding, near its negative axis otherwise."""
    positive, negative = zero_shot.class_embeddings(list(FINDING_PROMPTS[finding]))
    generator = torch.Generator().manual_seed(seed)
    rows = torch.stack([positive if finding in label_set else negative for label_set in labels])
    return F.normalize(rows + noise * torch.randn(rows.shape, generator=generator), dim=-1)


def test_zero_shot_auroc_is_one_when_planted_and_chance_when_shuffled():
    rng = np.random.default_rng(0)
    findings = ["nodule", "pleural_effusion", "consolidation", "normal"]
    labels = [frozenset({findings[i]}) for i in rng.integers(0, 4, 2000)]
    zero_shot = PlantedZeroShot()
    for finding in ("nodule", "pleural_effusion", "consolidation"):
        vision = planted_vision(zero_shot, finding, labels)
        prompts = {finding: FINDING_PROMPTS[finding]}
        assert zero_shot_aurocs(zero_shot, vision, labels, prompts) == {finding: 1.0, "mean": 1.0}
        shuffled = [labels[i] for i in rng.permutation(len(labels))]
        assert zero_shot_aurocs(zero_shot, vision, shuffled, prompts)[finding] == pytest.approx(0.5, abs=0.06)


def test_zero_shot_auroc_is_undefined_without_both_classes():
    zero_shot = PlantedZeroShot()
    labels = [frozenset({"nodule"})] * 5
    result = zero_shot_aurocs(zero_shot, planted_vision(zero_shot, "nodule", labels), labels)
    assert result["nodule"] is None and result["pleural_effusion"] is None  # every sample is nodule, none effusion
    assert result["mean"] is None


def test_alignment_rate_on_planted_embeddings():
    sets = [frozenset({"normal"}), frozenset({"nodule"}), frozenset({"nodule", "consolidation"})]
    axis = {label_set: i for i, label_set in enumerate(sets)}
    xray_labels = [sets[i] for i in (0, 0, 1, 2, 2, 2)]
    ct_labels = [sets[i] for i in (0, 1, 1, 2)]
    xrays = F.one_hot(torch.tensor([axis[s] for s in xray_labels]), 3).float()
    cts = F.one_hot(torch.tensor([axis[s] for s in ct_labels]), 3).float()
    result = nearest_neighbour_agreement(xrays, cts, xray_labels, ct_labels)
    assert result["rate"] == 1.0
    assert result["random_rate"] == pytest.approx(np.mean([1 / 4, 1 / 4, 2 / 4, 1 / 4, 1 / 4, 1 / 4]))
    flipped = nearest_neighbour_agreement(xrays, cts.roll(1, dims=1), xray_labels, ct_labels)
    assert flipped["rate"] < 0.5


def test_embedding_spread_flags_collapse():
    generator = torch.Generator().manual_seed(0)
    spread_out = F.normalize(torch.randn(50, 16, generator=generator), dim=-1)
    collapsed = F.normalize(torch.ones(50, 16) + 0.01 * torch.randn(50, 16, generator=generator), dim=-1)
    exact = (spread_out @ spread_out.T)[~torch.eye(50, dtype=torch.bool)].mean().item()
    assert mean_pairwise_cosine(spread_out) == pytest.approx(exact, abs=1e-5)
    assert mean_pairwise_cosine(collapsed) > 0.99 and mean_pairwise_cosine(spread_out[:1]) is None
    verdicts = collapse_verdicts({"xray_vision": mean_pairwise_cosine(collapsed), "ct_vision": exact})
    assert len(verdicts) == 1 and verdicts[0].startswith("xray vision embeddings have collapsed")


# --- bad input -------------------------------------------------------------------------------------------------------


def test_missing_model_or_data_gives_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="test"):
        load_samples(tmp_path, "test")


# --- the CLI on a tiny model and a tiny generated benchmark ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory):
    folder = tmp_path_factory.mktemp("groundtruth")
    split = (0.0, 0.0, 1.0)
    generate(GroundTruthConfig(num_xrays=12, num_cts=8, split_fractions=split, ct_split_fractions=split), folder)
    return folder


@pytest.fixture(scope="module")
def tiny_final(tmp_path_factory):
    """A tiny pretraining model and processor saved the way `training.pretrain.train` saves `final/`."""
    folder = tmp_path_factory.mktemp("final")
    torch.manual_seed(0)
    config = tiny_config(
        vision_config=dict(EVAL_VISION),
        text_config=dict(TINY_TEXT, vocab_size=30522),  # the MiniLM tokenizer's vocabulary
        num_selected_slices=1,
        dino_out_dim=32,
        dino_hidden_dim=32,
        dino_bottleneck_dim=16,
    )
    model = UniMedIForPreTraining(config)
    processor = build_processor(PretrainConfig(text_checkpoint=None, tokenizer=minilm_path(), max_length=64), config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_cli_end_to_end(tiny_benchmark, tiny_final, tmp_path):
    out = tmp_path / "evaluation"
    command = [
        sys.executable,
        "-m",
        "training.evaluate",
        str(tiny_final),
        "--data",
        str(tiny_benchmark),
        "--out",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "not a clinical result" in done.stdout

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["counts"] == {"xray": 12, "ct": 8}
    for modality in ("xray", "ct"):
        aurocs = metrics["zero_shot_auroc"][modality]
        assert set(aurocs) == {"nodule", "pleural_effusion", "consolidation", "mean"}
        assert all(value is None or 0.0 <= value <= 1.0 for value in aurocs.values())
        recall = metrics["retrieval"][f"report_to_{modality}"]
        assert recall["num_queries"] == metrics["counts"][modality]
        assert 0.0 <= recall["R@1"]["strict"] <= recall["R@1"]["same_text"] <= recall["R@5"]["same_text"] <= 1.0
    selection = metrics["slice_selection"]
    assert selection["num_slabs"] == 4  # 32 slices / patch depth 8
    ct_records = [json.loads(m) for m in _ct_metadata_strings(tiny_benchmark)]
    with_lesion = sum(1 for m in ct_records if lesion_slabs(m, 4))
    any_rows = [row for row in selection["rows"] if row["lesion"] == ANY_LESION]
    assert [(row["cts"], row["rule"], row["k"]) for row in any_rows] == [
        (with_lesion, "configured_and_top_20_percent", 1)
    ]
    constant_rules = sum(rule["most_common_share"] >= 0.9 for rule in selection["rules"].values())
    collapsed = sum(cosine >= 0.99 for cosine in metrics["embedding_spread"].values())
    assert len(metrics["verdicts"]) == len(selection["rows"]) + constant_rules + collapsed
    for direction in ("xray_to_ct", "ct_to_xray"):
        assert 0.0 <= metrics["alignment"][direction]["random_rate"] <= 1.0
    for name in ("tsne.png", "slice_selection.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and min(image.size) > 100
    for row in selection["rows"]:  # no train split here: only the test-optimal constant
        assert "train_constant" not in row and 0.0 <= row["test_optimal_constant"]["hit_rate"] <= 1.0
        assert row["ci"][0] <= row["hit_rate"] <= row["ci"][1]
    for direction in ("xray_to_ct", "ct_to_xray"):
        assert 0.0 < metrics["alignment"][direction]["p_permutation"] <= 1.0
    markdown = (out / "metrics.md").read_text()
    assert (
        "Functional benchmark" in markdown and "| xray |" in markdown and "Slice selection (4 depth slabs" in markdown
    )
    assert "## Did the model learn?" in markdown and "pleural effusion" in markdown


def _ct_metadata_strings(folder):
    from processing.shards import stream_split

    return [record["metadata"] for record in stream_split(folder, "test") if record["modality"] == "ct"]
