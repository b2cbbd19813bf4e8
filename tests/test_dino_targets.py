"""`benchmarks/dino_targets.py` reads a pretraining run's newest checkpoint and describes L_icl's teacher targets."""

import pytest
from test_training import fabricated_shards, run_training, tiny_run_args

from benchmarks.dino_targets import main


def test_dino_targets_describes_each_modalitys_teacher_targets(tmp_path):
    data = fabricated_shards(tmp_path / "data", num_xrays=12, num_cts=6)
    run_training(tiny_run_args(data, tmp_path / "run", max_steps=4, save_every_steps=2))
    lines = main([str(tmp_path / "run"), "--data", str(data), "--split", "train", "--num", "5"])
    assert "step-00000004" in lines[0]  # the newest checkpoint
    rows = {cells[0]: cells[1:] for cells in (line.strip("| ").split(" | ") for line in lines[3:])}
    assert set(rows) == {"xray", "ct"}
    for samples, entropy, peaks, max_probability, spread, cls_cosine, bottleneck_cosine in rows.values():
        assert int(samples) == 5
        assert 0 < float(entropy) <= 100.0
        assert 1 <= int(peaks) <= 5
        assert 1 / 32 <= float(max_probability) <= 1  # tiny_run_args: dino_out_dim 32
        assert float(spread) >= 0
        assert -1 <= float(cls_cosine) <= 1 and -1 <= float(bottleneck_cosine) <= 1


def test_dino_targets_refuses_a_run_without_self_distillation(tmp_path):
    data = fabricated_shards(tmp_path / "data", num_xrays=8, num_cts=4)
    run_training(tiny_run_args(data, tmp_path / "run", max_steps=2, ablation="vl"))
    with pytest.raises(ValueError, match="no self-distillation"):
        main([str(tmp_path / "run"), "--data", str(data), "--split", "train", "--num", "2"])
