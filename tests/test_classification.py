"""UniMedIForImageClassification (loading from UniMedI folders, 2D/3D heads, linear probe, Auto/remote code) and
training.finetune (protocol end to end on generated ground-truth data, stratified label fractions, resume)."""

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from test_hub_and_conversion import run_without_package
from tiny_configs import TINY_VISION, tiny_config, vision_state

from modeling_unimedi import UniMedIForImageClassification
from processing.groundtruth import GroundTruthConfig
from processing.schema import CT, XRAY
from training.downstream import DATASETS
from training.downstream.classification import metrics, strata_of, targets
from training.downstream.common import stratified_subset
from training.finetune import load_settings, markdown_row

GROUNDTRUTH_CONFIG = GroundTruthConfig(num_xrays=40, num_cts=20, xray_size=64, volume_size=(8, 32, 32))
XRAYS = torch.rand(3, 3, 32, 32)
VOLUMES = torch.rand(3, 1, 8, 32, 32)


@pytest.mark.parametrize("kind", ["inference", "pretraining"])
def test_loads_the_encoder_from_any_unimedi_folder(saved_folders, kind, caplog):
    folder, expected = saved_folders[kind]
    model, info = UniMedIForImageClassification.from_pretrained(
        folder, num_labels=5, problem_type="multi_label_classification", output_loading_info=True
    )
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded = model.vision_model.state_dict()
    assert expected.keys() == loaded.keys()
    assert all(torch.equal(expected[key], loaded[key]) for key in expected)
    assert not hasattr(model, "text_model") and not hasattr(model, "unimedi")
    assert not any(name.startswith(("text", "teacher")) for name, _ in model.named_parameters())
    assert model.config.num_labels == 5 and model.config.problem_type == "multi_label_classification"


@pytest.mark.parametrize(
    ("problem_type", "num_labels", "labels"),
    [
        ("single_label_classification", 3, torch.tensor([0, 2, 1])),
        ("multi_label_classification", 5, torch.tensor([[1.0, 0, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])),
        ("regression", 1, torch.tensor([0.5, -1.0, 2.0])),
    ],
)
@pytest.mark.parametrize("modality", ["pixel_values", "volume_values"])
def test_xray_and_ct_forward_and_backward_for_each_problem_type(problem_type, num_labels, labels, modality):
    torch.manual_seed(0)
    model = UniMedIForImageClassification(tiny_config(num_labels=num_labels, problem_type=problem_type))
    inputs = {modality: XRAYS if modality == "pixel_values" else VOLUMES}
    out = model(**inputs, labels=labels)
    assert out.logits.shape == (3, num_labels)
    reference = {
        "single_label_classification": lambda: torch.nn.functional.cross_entropy(out.logits, labels),
        "multi_label_classification": lambda: torch.nn.functional.binary_cross_entropy_with_logits(out.logits, labels),
        "regression": lambda: torch.nn.functional.mse_loss(out.logits.squeeze(-1), labels),
    }[problem_type]()
    assert torch.allclose(out.loss, reference)
    out.loss.backward()
    assert model.vision_model.cls_token.grad is not None and model.classifier.weight.grad is not None


def test_problem_type_is_inferred_from_the_labels_as_vit_does():
    model = UniMedIForImageClassification(tiny_config(num_labels=3))
    model(pixel_values=XRAYS, labels=torch.tensor([0, 1, 2]))
    assert model.config.problem_type == "single_label_classification"
    model = UniMedIForImageClassification(tiny_config(num_labels=3))
    model(pixel_values=XRAYS, labels=torch.rand(3, 3).round())
    assert model.config.problem_type == "multi_label_classification"


def test_one_input_kind_is_required():
    model = UniMedIForImageClassification(tiny_config(num_labels=2))
    with pytest.raises(ValueError, match="either `pixel_values`"):
        model(pixel_values=XRAYS, volume_values=VOLUMES)
    with pytest.raises(ValueError, match="either `pixel_values`"):
        model()


def test_freeze_encoder_trains_only_the_head_and_keeps_the_encoder_in_eval_mode(saved_folders):
    folder, _ = saved_folders["pretraining"]
    config_dropout = {"hidden_dropout": 0.5, "attention_dropout": 0.5}
    model = UniMedIForImageClassification.from_pretrained(folder, num_labels=2, freeze_encoder=True)
    for key, value in config_dropout.items():  # dropout that would change the features if the encoder trained
        setattr(model.vision_model.config, key, value)
        for module in model.vision_model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = value
    before = vision_state(model.vision_model)
    head_before = model.classifier.weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {
        "classifier.weight",
        "classifier.bias",
    }
    model.train()
    assert not model.vision_model.training and all(not m.training for m in model.vision_model.modules())
    assert model.classifier.training
    features = []
    for _ in range(3):
        out = model(volume_values=VOLUMES, labels=torch.tensor([0, 1, 1]))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        features.append(model.vision_model(volume_values=VOLUMES).pooler_output)
    after = model.vision_model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)  # bit-identical
    assert torch.equal(features[0], features[-1])  # no dropout: the same features every step
    assert not torch.equal(head_before, model.classifier.weight)
    assert model.config.freeze_encoder is True


def test_auto_class_finds_it_and_saved_classifier_round_trips(tmp_path):
    from transformers import AutoModelForImageClassification

    torch.manual_seed(0)
    model = UniMedIForImageClassification(tiny_config(num_labels=2, id2label={0: "normal", 1: "nodule"})).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"] == (
        "classification_unimedi.UniMedIForImageClassification"
    )
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, UniMedIForImageClassification)
    assert loaded.config.id2label == {0: "normal", 1: "nodule"}
    with torch.inference_mode():
        assert torch.equal(model(pixel_values=XRAYS).logits, loaded(pixel_values=XRAYS).logits)


def test_remote_code_loads_the_classifier_without_the_package(tmp_path, saved_folders):
    torch.manual_seed(0)
    model = UniMedIForImageClassification.from_pretrained(saved_folders["pretraining"][0], num_labels=3).eval()
    folder = tmp_path / "export"
    model.save_pretrained(folder)
    assert (folder / "classification_unimedi.py").is_file()
    torch.save(VOLUMES, tmp_path / "volumes.pt")
    with torch.inference_mode():
        torch.save(model(volume_values=VOLUMES).logits, tmp_path / "expected.pt")
    out = run_without_package(
        f"""
        import torch
        from transformers import AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        with torch.inference_mode():
            logits = model(volume_values=torch.load({str(tmp_path / "volumes.pt")!r})).logits
        print(type(model).__name__, type(model).__module__)
        print(torch.allclose(logits, torch.load({str(tmp_path / "expected.pt")!r}), atol=1e-6))
        """,
        cwd=tmp_path,
        HF_HUB_OFFLINE="1",
    )
    name, module = out.splitlines()[0].split()
    assert name == "UniMedIForImageClassification" and not module.startswith("modeling_unimedi")
    assert out.splitlines()[1] == "True"


# --- training.finetune -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5])
def test_label_fraction_is_a_seeded_stratified_subset(fraction):
    rng = np.random.default_rng(0)
    strata = list(rng.choice(["a", "b", "c", "d"], size=1000, p=[0.6, 0.25, 0.1, 0.05]))
    subset = stratified_subset(strata, fraction, seed=3)
    assert len(subset) == round(fraction * 1000) and len(set(subset)) == len(subset)
    assert np.array_equal(subset, stratified_subset(strata, fraction, seed=3))
    assert not np.array_equal(subset, stratified_subset(strata, fraction, seed=4))
    whole, chosen = Counter(strata), Counter(strata[i] for i in subset)
    for name, count in whole.items():  # every stratum within one item of its exact share
        assert abs(chosen[name] - count * fraction) < 1 + 1e-9
    assert np.array_equal(stratified_subset(strata, 1.0, seed=3), np.arange(1000))


def test_targets_and_strata_from_label_names():
    spec = DATASETS["groundtruth-ct"]
    matrix = targets([["nodule"], ["normal"], ["consolidation", "pleural_effusion"]], spec, "here")
    assert matrix.tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 1]]
    assert strata_of(matrix) == ["100", "000", "011"]
    single = DATASETS["covidx"]
    assert targets([["COVID-19"], ["normal"]], single, "here").tolist() == [2, 0]
    with pytest.raises(ValueError, match="record 1 has labels"):
        targets([["normal"], ["pneumonia", "COVID-19"]], single, "here")


def test_metrics_use_the_papers_measures():
    multi = metrics(DATASETS["groundtruth-xray"], np.array([[1, 0, 2], [0, 1, 1]]), np.array([[1, 0, 1], [0, 1, 1]]))
    assert multi["mean_auroc"] == 1.0 and set(multi["auroc_per_label"]) == {"nodule", "pleural_effusion"}
    single = metrics(DATASETS["covidx"], np.array([[2.0, 0, 0], [0, 0, 1], [0, 1, 0]]), np.array([0, 1, 1]))
    assert single["accuracy"] == pytest.approx(2 / 3)


def test_settings_file_overrides_and_errors(tmp_path):
    config = load_settings(None, ["label_fraction=0.1", "freeze_encoder=false", "head_learning_rate=5e-3"])
    assert config.dataset == "groundtruth-xray" and config.label_fraction == 0.1 and not config.freeze_encoder
    assert config.head_learning_rate == 5e-3 and config.output_dir.endswith("groundtruth-xray-finetune-0.1")
    with pytest.raises(ValueError, match="unknown setting"):
        load_settings(None, ["learning_rat=1"])
    with pytest.raises(ValueError, match="unknown dataset"):
        load_settings(None, ["dataset=mnist"])
    with pytest.raises(ValueError, match="label_fraction"):
        load_settings(None, ["label_fraction=0"])


@pytest.fixture(scope="module")
def groundtruth_data(tmp_path_factory):
    from processing.groundtruth import generate

    folder = tmp_path_factory.mktemp("groundtruth")
    generate(GROUNDTRUTH_CONFIG, folder)
    return folder


def run_finetune(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "training.finetune", *args],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=os.getcwd(),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def tiny_finetune_args(data, output, **extra) -> list[str]:
    vision = json.dumps(dict(TINY_VISION, volume_size=list(TINY_VISION["volume_size"])))
    settings = {
        "data": str(data),
        "output_dir": str(output),
        "model_config": json.dumps({"vision_config": json.loads(vision)}),
        "batch_size": 8,
        "num_epochs": 3,
        "report_to": "none",
        **extra,
    }
    return [f"{key}={value}" for key, value in settings.items()]


@pytest.mark.parametrize(
    ("dataset", "freeze_encoder", "fraction"), [("groundtruth-xray", True, 0.5), ("groundtruth-ct", False, 1.0)]
)
def test_finetune_end_to_end_on_groundtruth_data(
    groundtruth_data, tmp_path, saved_folders, dataset, freeze_encoder, fraction
):
    output = tmp_path / "run"
    run_finetune(
        *tiny_finetune_args(
            groundtruth_data,
            output,
            dataset=dataset,
            freeze_encoder=str(freeze_encoder).lower(),
            label_fraction=fraction,
            model=str(saved_folders["pretraining"][0]),
        )
    )
    results = json.loads((output / "results.json").read_text())
    train_total = GROUNDTRUTH_CONFIG.split_counts(XRAY if dataset == "groundtruth-xray" else CT)["train"]
    assert results["train_subset"] == {"size": round(fraction * train_total), "of": train_total, "seed": 0}
    assert len(json.loads((output / "train_subset.json").read_text())["sample_ids"]) == round(fraction * train_total)
    assert 0.0 <= results["test"]["mean_auroc"] <= 1.0 and results["epochs_run"] == 3
    history = [json.loads(line) for line in (output / "history.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert results["best_validation_loss"] == min(row["validation/loss"] for row in history)
    assert (output / "results.md").read_text().strip() == markdown_row(results)
    best = UniMedIForImageClassification.from_pretrained(output / "best")
    assert best.config.id2label == dict(enumerate(DATASETS[dataset].labels))
    frozen = UniMedIForImageClassification.from_pretrained(saved_folders["pretraining"][0], num_labels=3)
    encoder_same = all(
        torch.equal(a, b)
        for a, b in zip(frozen.vision_model.state_dict().values(), best.vision_model.state_dict().values())
    )
    assert encoder_same == freeze_encoder  # the probe leaves the encoder untouched, fine-tuning changes it


def history_of(output) -> list[dict]:
    return [json.loads(line) for line in (output / "history.jsonl").read_text().splitlines()]


def test_finetune_stops_early_after_patience_epochs(groundtruth_data, tmp_path):
    output = tmp_path / "run"
    args = tiny_finetune_args(
        groundtruth_data, output, num_epochs=6, early_stopping_patience=1, head_learning_rate=0.5
    )
    run_finetune(*args)
    losses = [row["validation/loss"] for row in history_of(output)]
    first_without_improvement = next((i + 1 for i in range(1, len(losses)) if losses[i] >= min(losses[:i])), 6)
    assert len(losses) == first_without_improvement  # patience 1: that epoch is the last
    with pytest.raises(AssertionError, match="holds an earlier run"):
        run_finetune(*args)


def test_an_interrupted_finetune_resumes_to_the_same_epochs(groundtruth_data, tmp_path):
    common = {"freeze_encoder": "false", "dataset": "groundtruth-ct", "early_stopping_patience": 10}
    run_finetune(*tiny_finetune_args(groundtruth_data, tmp_path / "whole", num_epochs=3, **common))
    run_finetune(*tiny_finetune_args(groundtruth_data, tmp_path / "parts", num_epochs=1, **common))
    run_finetune(*tiny_finetune_args(groundtruth_data, tmp_path / "parts", num_epochs=3, **common), "--resume")
    whole, parts = history_of(tmp_path / "whole"), history_of(tmp_path / "parts")
    assert not list((tmp_path / "parts").rglob("*.pkl")), "checkpoints hold no pickles (issue #13)"
    assert [row["epoch"] for row in parts] == [1, 2, 3]
    for a, b in zip(whole, parts):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["validation/loss"] == pytest.approx(b["validation/loss"], abs=1e-6)


def test_grid_runs_missing_cells_and_prints_paper_shaped_tables(groundtruth_data, tmp_path, monkeypatch, capsys):
    from training import finetune_grid

    table = finetune_grid.Table("Tiny table", ("groundtruth-xray",), True, (0.5,))
    monkeypatch.setitem(finetune_grid.GRIDS, "tiny", (table,))
    args = ["--grid", "tiny", "--models", "random=none", "--output-dir", str(tmp_path)]
    settings = tiny_finetune_args(groundtruth_data, tmp_path / "unused", num_epochs=1)
    settings = [s for s in settings if not s.startswith("output_dir=")]
    tables = finetune_grid.main([*args, *settings])
    cell = tmp_path / "random" / "groundtruth-xray-probe-0.5"
    results = json.loads((cell / "seed-0" / "results.json").read_text())
    value = f"{100 * results['test']['mean_auroc']:.1f}"
    assert tables.splitlines()[2:] == ["| Method | groundtruth-xray 50 % |", "|---|---|", f"| random | {value} |"]
    assert (tmp_path / "tables.md").read_text() == tables
    mtime = (cell / "seed-0" / "results.json").stat().st_mtime
    finetune_grid.main([*args, *settings])  # a finished cell is not run again
    assert (cell / "seed-0" / "results.json").stat().st_mtime == mtime
    assert finetune_grid.parse_models("a=x/y,b=random") == {"a": "x/y", "b": None}


def test_grid_tables_give_mean_sd_over_seeds_and_the_gain_over_random_init(tmp_path, monkeypatch):
    from training import finetune_grid

    table = finetune_grid.Table("Tiny table", ("groundtruth-xray",), True, (0.01, 1.0))
    monkeypatch.setitem(finetune_grid.GRIDS, "tiny", (table,))
    scores = {("random", 0.01): [0.50, 0.54, 0.52], ("pre", 0.01): [0.70, 0.74, 0.72], ("pre", 1.0): [0.90]}
    for (model, fraction), values in scores.items():
        for seed, value in enumerate(values):
            folder = finetune_grid.cell_dir(tmp_path, model, "groundtruth-xray", True, fraction, seed)
            folder.mkdir(parents=True)
            (folder / "results.json").write_text(json.dumps({"metric": "mean_auroc", "test": {"mean_auroc": value}}))
    lines = finetune_grid.markdown_tables("tiny", {"random": None, "pre": "x"}, tmp_path, (0, 1, 2)).splitlines()
    assert lines[4:6] == ["| random | 52.0 ± 2.0 | - |", "| pre | 72.0 ± 2.0 | 90.0 (n=1) |"]
    gain = lines[-1]
    assert gain.startswith("| pre | +20.0 (p=") and gain.endswith(" | - |")  # no random cell at 100 %: no gain
    assert float(gain.split("p=")[1].split(")")[0]) < 0.01


def test_the_dataset_decides_the_task_and_a_wrong_task_is_refused():
    assert load_settings(None, []).task == "classification"
    with pytest.raises(ValueError, match="unknown task"):
        load_settings(None, ["task=regression"])


def test_test_split_setting_picks_the_stored_split_tested_at_the_end(groundtruth_data, tmp_path):
    from training.downstream import TASKS

    settings = tiny_finetune_args(groundtruth_data, tmp_path / "unused", test_split="validation")
    config = load_settings(None, settings)
    task, spec = TASKS[config.task], DATASETS[config.dataset]
    model = task.build_model(config, spec)
    loaders, _ = task.build_loaders(config, spec, model.config.vision_config)
    assert loaders["test"].dataset["sample_id"] == loaders["validation"].dataset["sample_id"]
    assert all(split == "validation" for split in loaders["test"].dataset["split"])
