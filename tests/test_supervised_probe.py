"""The supervised control of the ground-truth benchmark on CTs: it trains the 3D tokenizer on the labels and scores
the attentive slab selection of the encoder it trained against the exact random and constant-slab baselines."""

from pathlib import Path

import numpy as np
import pytest

from benchmarks.supervised_probe import main
from processing.groundtruth import GroundTruthConfig, generate
from training.evaluation.data import load_ct_metadata
from training.evaluation.slice_selection import best_constant_selection, lesion_slabs
from training.evaluation.statistics import random_hit_probability


@pytest.fixture(scope="module")
def probe_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("probe")
    split = (0.5, 0.0, 0.5)
    generate(GroundTruthConfig(num_xrays=4, num_cts=16, split_fractions=split, ct_split_fractions=split), folder)
    return folder


def nodule_slabs(folder: Path, split: str) -> list[set[int]]:
    slabs = [lesion_slabs(item, 4) for item in load_ct_metadata(folder, split)]
    return [found["nodule"] for found in slabs if "nodule" in found]


def test_ct_probe_prints_aurocs_and_the_slab_selection_against_its_baselines(probe_data, capsys):
    main(["--data", str(probe_data), "--modality", "ct", "--steps", "2", "--batch-size", "2", "--eval-every", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    header, rows = lines[0], [line.strip("| ").split(" | ") for line in lines[1:]]
    assert "nodule slab hit (k = 1)" in header  # the demo config's k
    assert [row[0] for row in rows] == ["1", "2"]
    test_slabs, train_slabs = nodule_slabs(probe_data, "test"), nodule_slabs(probe_data, "train")
    assert test_slabs and train_slabs
    random_rate = np.mean([random_hit_probability(4, len(slabs), 1) for slabs in test_slabs])
    constant = best_constant_selection(train_slabs, 4, 1)
    constant_rate = np.mean([bool(constant & slabs) for slabs in test_slabs])
    for row in rows:
        aurocs, (hit, random, train_constant, p_value) = [float(v) for v in row[2:5]], row[5:]
        assert all(0 <= value <= 100 for value in aurocs)
        assert 0 <= float(hit) <= 100
        assert float(random) == pytest.approx(100 * random_rate, abs=0.05)
        assert float(train_constant) == pytest.approx(100 * constant_rate, abs=0.05)
        assert 0 < float(p_value) <= 1


def test_probe_refuses_data_without_the_modality(tmp_path):
    split = (0.5, 0.0, 0.5)
    generate(GroundTruthConfig(num_xrays=4, num_cts=0, split_fractions=split, ct_split_fractions=split), tmp_path)
    with pytest.raises(ValueError, match="holds no ct samples"):
        main(["--data", str(tmp_path), "--modality", "ct", "--steps", "1"])
