"""The benchmark's statistics: intervals cover, p-values reject what they should and only that, the constant-slab
baselines pick the right slab, and the runner's aggregation and power calculation are right."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.groundtruth import mean_sd, power_of_rate_test, seed_values
from training.evaluation.measures import nearest_neighbour_agreement
from training.evaluation.slice_selection import best_constant_selection, slice_selection
from training.evaluation.statistics import (
    auroc_with_ci,
    binomial_ci,
    mcnemar_exact,
    permutation_p_value,
    rate_against_chance,
)


def ct_metadata(nodule_slab: int) -> dict:
    return {"num_slabs": 4, "lesions": [{"finding": "nodule", "slabs": [nodule_slab]}]}


def test_auroc_interval_covers_the_estimate_and_p_separates_signal_from_noise():
    rng = np.random.default_rng(1)
    labels = np.array([0, 1] * 100)
    separated = auroc_with_ci(labels, labels + rng.normal(0, 0.8, size=200))
    low, high = separated["ci"]
    assert low < separated["auroc"] < high and 0 < high - low < 0.2
    assert separated["p_vs_chance"] < 1e-6 and (separated["positives"], separated["negatives"]) == (100, 100)
    noise = auroc_with_ci(labels, rng.normal(size=200))
    assert noise["ci"][0] < 0.5 < noise["ci"][1] and noise["p_vs_chance"] > 0.01
    assert auroc_with_ci(np.zeros(5, dtype=int), np.arange(5.0)) is None  # one class: undefined
    assert auroc_with_ci(labels, labels + rng.normal(0, 0.8, size=200))["ci"] != separated["ci"]  # data, not seed


def test_binomial_interval_and_rate_against_chance():
    low, high = binomial_ci(30, 100)
    assert low < 0.3 < high and high - low == pytest.approx(0.185, abs=0.01)
    assert binomial_ci(0, 10)[0] == 0.0
    strong = rate_against_chance(60, [0.25] * 100)
    assert strong["rate"] == 0.6 and strong["random_rate"] == 0.25 and strong["p_vs_random"] < 1e-10
    assert rate_against_chance(25, [0.25] * 100)["p_vs_random"] > 0.4


def test_mcnemar_counts_discordant_pairs_one_sided():
    model = [True] * 30 + [False] * 10 + [True] * 20
    constant = [False] * 30 + [True] * 10 + [True] * 20
    result = mcnemar_exact(model, constant)
    assert (result["only_first"], result["only_second"]) == (30, 10)
    assert result["p_value"] < 0.01
    assert mcnemar_exact(constant, model)["p_value"] > 0.99
    assert mcnemar_exact([True, False], [True, False])["p_value"] == 1.0  # no discordant pair


def test_permutation_p_value_is_small_for_structure_and_uniform_for_none():
    labels = np.repeat(np.arange(4), 25)

    def agreement(ids):
        return float(np.mean(ids[:50] == labels[:50]))

    assert permutation_p_value(agreement, labels, agreement(labels), permutations=200) == pytest.approx(1 / 201)
    assert permutation_p_value(agreement, labels, 0.0, permutations=50) == 1.0


def test_nearest_neighbour_agreement_p_value_and_interval():
    torch.manual_seed(0)
    groups = [frozenset({"a"}), frozenset({"b"}), frozenset({"c"})]
    centres = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    labels = [groups[i % 3] for i in range(60)]
    queries = torch.nn.functional.normalize(centres[[i % 3 for i in range(60)]] + 0.1 * torch.randn(60, 16), dim=-1)
    aligned = nearest_neighbour_agreement(queries, queries.flip(0), labels, labels[::-1])
    assert aligned["rate"] == 1.0 and aligned["random_rate"] == pytest.approx(1 / 3)
    assert aligned["p_permutation"] < 0.01 and aligned["ci"][0] > 0.9
    shuffled = nearest_neighbour_agreement(queries, torch.randn(60, 16), labels, labels)
    assert shuffled["p_permutation"] > 0.01


def test_constant_slab_baselines_learn_on_train_and_bound_on_test():
    assert best_constant_selection([{1}, {1}, {2}], num_slabs=4, k=1) == {1}
    assert best_constant_selection([{0}, {3}, {3}], num_slabs=4, k=2) == {0, 3}
    train = [ct_metadata(slab) for slab in (0, 0, 0, 1)]  # train's best slab: 0
    test = [ct_metadata(slab) for slab in (2, 2, 2, 1)]  # test's best: 2
    planted = torch.eye(4)[[2, 2, 2, 1]]  # the model picks each CT's nodule slab
    rows = slice_selection(planted, test, num_selected=1, train_metadata=train)["rows"]
    nodule = next(row for row in rows if row["lesion"] == "nodule")
    assert nodule["train_constant"]["slabs"] == [0] and nodule["train_constant"]["hit_rate"] == 0.0
    assert nodule["test_optimal_constant"]["slabs"] == [2] and nodule["test_optimal_constant"]["hit_rate"] == 0.75
    assert nodule["train_constant"]["model_only_hits"] == 4
    assert nodule["test_optimal_constant"]["p_model_better"] == pytest.approx(0.5)  # one discordant CT
    without_train = slice_selection(planted, test, num_selected=1)["rows"][0]
    assert "train_constant" not in without_train and "test_optimal_constant" in without_train


def test_seed_aggregation_and_power():
    result = {"seeds": {0: {"x": 0.5}, 1: {"x": 0.7}, 2: {"x": None}}}
    values = seed_values(result, lambda metrics: metrics["x"])
    assert values == [0.5, 0.7]
    mean, sd = mean_sd(values)
    assert mean == pytest.approx(0.6) and sd == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert mean_sd([0.4]) == (0.4, 0.0) and mean_sd([]) is None
    assert power_of_rate_test(150, 0.275, 0.275, 0.01) <= 0.01  # no effect: power is the size
    assert power_of_rate_test(150, 0.537, 0.761, 0.01) > 0.99
    assert power_of_rate_test(30, 0.275, 0.395, 0.01) < power_of_rate_test(150, 0.275, 0.395, 0.01)


def fake_metrics(seed: int, nodule_hit: float, cosine: float = 0.5) -> dict:
    """One evaluation's metrics in `training.evaluate`'s layout, with chosen numbers."""
    findings = ("nodule", "pleural_effusion", "consolidation")
    auroc = {"nodule": 0.6, "pleural_effusion": 0.95, "consolidation": 0.6, "mean": 0.72}
    stat = {"auroc": 0.95, "ci": [0.9, 0.98], "p_vs_chance": 1e-9, "positives": 100, "negatives": 250}
    recall = {"strict": 0.1, "same_text": 0.1, "random_strict": 0.0143, "random_same_text": 0.02,
              "strict_ci": [0.07, 0.14], "same_text_ci": [0.07, 0.14], "p_strict": 1e-6, "p_same_text": 1e-5}  # fmt: skip
    constant = {"slabs": [3], "hit_rate": 0.34, "ci": [0.27, 0.42], "p_model_better": 0.001, "model_only_hits": 40,
                "constant_only_hits": 10}  # fmt: skip
    row = {"lesion": "nodule", "rule": "configured_and_top_20_percent", "k": 1, "cts": 151, "hits": 0,
           "hit_rate": nodule_hit, "ci": [0.4, 0.6], "random_hit_rate": 0.30, "p_value": 1e-5,
           "same_slabs_hit_rate": 0.3, "train_constant": constant, "test_optimal_constant": constant}  # fmt: skip
    return {
        "label": "run", "seed": seed, "overrides": [], "train_seconds": 60.0, "disclaimer": "D", "model": "m",
        "data": "d", "split": "test", "counts": {"xray": 350, "ct": 440},
        "zero_shot_auroc": {"xray": auroc, "ct": auroc},
        "zero_shot_statistics": {modality: dict.fromkeys(findings, stat) for modality in ("xray", "ct")},
        "retrieval": {f"report_to_{m}": {"num_queries": 350, "R@1": recall, "R@5": recall} for m in ("xray", "ct")},
        "slice_selection": {"num_slabs": 4, "rows": [row],
                            "rules": {row["rule"]: {"k": 1, "most_common_selection": [2], "most_common_share": 0.4}}},
        "alignment": {d: {"rate": 0.32, "ci": [0.27, 0.37], "random_rate": 0.2, "p_permutation": 0.001}
                      for d in ("xray_to_ct", "ct_to_xray")},
        "embedding_spread": {"xray_vision": cosine, "ct_vision": 0.5, "xray_reports": 0.6, "ct_reports": 0.7},
        "verdicts": [],
    }  # fmt: skip


def test_runner_states_targets_met_or_missed_with_seeds_and_failures():
    from argparse import Namespace

    from benchmarks.groundtruth import FULL, RUNS, readme_section, target_statements

    def results(nodule_hit, cosine=0.5):
        return {run.name: {"label": run.label, "seeds": {seed: fake_metrics(seed, nodule_hit, cosine)
                                                          for seed in (0, 1, 2)}} for run in RUNS}  # fmt: skip

    met = target_statements(results(0.60))
    assert met[0].startswith("Target 1") and " MET: nodule-slab hit 60.0 vs random 30.0" in met[0]
    assert "MISSED" in target_statements(results(0.45))[0]  # +15 points: significant but short of +22
    assert "Target 2" in met[1] and "MET" in met[1]  # 32 vs 20 random: 1.6x
    assert met[-1].startswith("Target 4") and " MET " in met[-1]
    assert "MISSED" in target_statements(results(0.60, cosine=0.995))[-1]  # a collapsed X-ray embedding set
    failed = results(0.60)
    failed[FULL.name]["seeds"][2] = {"label": "x", "seed": 2, "error": "RuntimeError: boom"}
    args = Namespace(data="data/groundtruth", data_seed=7, split="test", reuse=False)
    section = readme_section(failed, args, ["--seeds", "0", "1", "2", "--data-seed", "7"], 600)
    assert section.startswith(
        "**Results** (regenerated by `python -m benchmarks.groundtruth --seeds 0 1 2 --data-seed 7`"
    )
    assert "FAILED: seed 2: RuntimeError: boom" in section and "60.0 ± 0.0 (random 30.0)" in section


def test_vectorised_bootstrap_equals_scikit_learn_on_the_same_resamples():
    from sklearn.metrics import roc_auc_score

    from training.evaluation.statistics import BOOTSTRAP_RESAMPLES, SEED

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=40)
    scores = np.round(labels + rng.normal(0, 1.5, size=40), 1)  # ties, as in real scores
    result = auroc_with_ci(labels, scores)
    assert result["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    drawn = np.random.default_rng(SEED).integers(40, size=(BOOTSTRAP_RESAMPLES, 40))
    replicates = [roc_auc_score(labels[d], scores[d]) for d in drawn if 0 < labels[d].sum() < 40]
    assert result["ci"] == pytest.approx(np.quantile(replicates, [0.025, 0.975]).tolist())


def test_between_run_p_value_over_seeds():
    from benchmarks.groundtruth import seeds_p_value

    def run(values):
        return {"seeds": {seed: {"x": value} for seed, value in enumerate(values)}}

    read = lambda metrics: metrics["x"]  # noqa: E731
    assert seeds_p_value(run([0.60, 0.62, 0.61]), run([0.80, 0.79, 0.82]), read) < 0.01
    assert seeds_p_value(run([0.80, 0.79, 0.82]), run([0.60, 0.62, 0.61]), read) > 0.99  # one-sided
    assert seeds_p_value(run([0.6]), run([0.8, 0.9]), read) is None  # one seed: no spread to test against


def test_runner_selects_rows_reuses_evaluations_and_measures_a_row_with_another_inference_embedding(
    tmp_path, monkeypatch
):
    from argparse import Namespace

    import benchmarks.groundtruth as benchmark

    with pytest.raises(SystemExit, match="unknown run"):
        benchmark.selected_runs(["vl", "nope"])
    assert [run.name for run in benchmark.selected_runs(["vl", "vl_sd"])] == ["vl", "vl_sd"]
    calls = []

    def fake_evaluate(model_dir, data, split, out_dir, batch_size, *, volume_embedding):
        calls.append((Path(model_dir), volume_embedding))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        metrics = {"data": str(data), "split": split, "volume_embedding": volume_embedding or "volume"}
        (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    monkeypatch.setattr(benchmark, "evaluate", fake_evaluate)
    args = Namespace(out=str(tmp_path), data=str(tmp_path / "data"), split="test", batch_size=4, reuse=True,
                     overwrite=False, gpu_scale=False, set=[], config=None)  # fmt: skip
    variant = next(run for run in benchmark.RUNS if run.model_of)
    with pytest.raises(FileNotFoundError, match="not trained"):
        benchmark.train_and_evaluate(variant, 0, args)
    final = tmp_path / "runs" / variant.model_of / "seed-0" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    (final.parent / "train_seconds.json").write_text("61.5")
    source = next(run for run in benchmark.RUNS if run.name == variant.model_of)
    assert benchmark.train_and_evaluate(source, 0, args)["train_seconds"] == 61.5  # reused, not trained
    measured = benchmark.train_and_evaluate(variant, 0, args)
    assert calls == [(final, None), (final, "volume_with_slices")]
    assert measured["volume_embedding"] == "volume_with_slices" and measured["measures"] == variant.model_of
    benchmark.train_and_evaluate(variant, 0, args)
    assert len(calls) == 2  # the stored evaluation of the same data and split is reused
    benchmark.train_and_evaluate(variant, 0, Namespace(**{**vars(args), "split": "validation"}))
    assert len(calls) == 3  # another split is measured again
