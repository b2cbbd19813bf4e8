"""training/: config files and overrides, streaming and mixing, atomic checkpoints, exact resume, two processes."""

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_configs import TINY_TEXT, TINY_VISION, minilm_path

from modeling_unimedi import UniMedIModel
from processing.schema import ct_record, xray_record
from processing.shards import stream_split, write_shards
from training import checkpointing
from training.config import load_config
from training.data import MixedBatches, ModalityStream, cts_in_batch


def fabricated_shards(folder, num_xrays=24, num_cts=12, seed=0):
    """Random X-rays (PNG) and on-grid CTs (int16 HU) with short reports, in several shards."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(num_xrays):
        png = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 36), dtype=np.uint8)).save(png, format="PNG")
        records.append(
            xray_record(
                sample_id=f"x{i}",
                source="test",
                split="train",
                report=f"X-ray report {i}. Lungs clear. No effusion.",
                image={"bytes": png.getvalue()},
            )
        )
    for i in range(num_cts):
        volume = rng.integers(-1000, 400, size=TINY_VISION["volume_size"]).astype(np.float32)
        records.append(
            ct_record(
                sample_id=f"c{i}",
                source="test",
                split="train",
                report=f"CT report {i}. Nodule. No effusion.",
                volume=volume,
                spacing=(2.0, 1.0, 1.0),
            )
        )
    order = rng.permutation(len(records))
    write_shards([records[i] for i in order], folder, "train", records_per_shard=8)
    return folder


def tiny_run_args(data, output, **extra):
    settings = {
        "train_data": str(data),
        "output_dir": str(output),
        "text_checkpoint": "null",
        "tokenizer": minilm_path(),
        "max_length": 16,
        "batch_size": 4,
        "ct_fraction": 0.25,
        "max_steps": 6,
        "warmup_epochs": 0.2,
        "learning_rate": 1e-3,
        "save_every_steps": 2,
        "log_every_steps": 1,
        "report_to": "none",
        "shuffle_buffer": 8,
        "model_config.vision_config": json.dumps(dict(TINY_VISION, volume_size=list(TINY_VISION["volume_size"]))),
        "model_config.text_config": json.dumps(dict(TINY_TEXT, vocab_size=30522)),
        "model_config.projection_dim": 16,
        "model_config.dino_out_dim": 32,
        "model_config.dino_hidden_dim": 32,
        "model_config.dino_bottleneck_dim": 16,
        "model_config.num_selected_slices": 1,
    }
    settings.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in settings.items()]


def run_training(args, launcher=None, env_extra=None):
    command = (launcher or [sys.executable, "-m"]) + ["training.pretrain"] + args
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=os.getcwd())
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def losses(output):
    return {r["step"]: r for r in map(json.loads, (output / "train_log.jsonl").read_text().splitlines())}


# ---------------------------------------------------------------- config


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 1.0e-3\nmodel_config:\n  mask_ratio: 0.75\n")
    config = load_config(path, ["batch_size=8", "model_config.num_selected_slices=3", "ablation=vl"])
    assert (config.learning_rate, config.batch_size, config.ablation) == (1e-3, 8, "vl")
    assert config.model_config == {"mask_ratio": 0.75, "num_selected_slices": 3}
    assert config.weight_decay == 0.05  # paper default kept
    assert load_config(path, ["learning_rate=5e-5"]).learning_rate == 5e-5  # YAML 1.1 reads 5e-5 as a string
    with pytest.raises(ValueError, match="'learning_rate' must be a number"):
        load_config(path, ["learning_rate=fast"])
    with pytest.raises(ValueError, match="unknown setting 'batchsize'"):
        load_config(path, ["batchsize=8"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(path, ["batch_size"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml", [])
    from training.config import parse_args

    assert parse_args(["--resume"]).resume is True
    assert parse_args(["--resume", "out/checkpoints/step-00000040", "max_steps=9"]).resume.endswith("step-00000040")
    resumed = parse_args(["--resume", "max_steps=9"])  # an override after a bare --resume stays an override
    assert (resumed.resume, resumed.max_steps) == (True, 9)


def test_text_encoder_gets_its_own_learning_rate():
    from tiny_configs import tiny_config

    from modeling_unimedi import UniMedIForPreTraining
    from training.pretrain import optimizer_groups

    model = UniMedIForPreTraining(tiny_config())
    groups = optimizer_groups(model, learning_rate=3e-4, weight_decay=0.05, text_learning_rate=3e-5)
    setting = {id(param): (group["lr"], group["weight_decay"]) for group in groups for param in group["params"]}
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    assert sum(len(group["params"]) for group in groups) == len(setting) == len(trainable)
    for name, param in trainable.items():
        lr, decay = setting[id(param)]
        assert lr == (3e-5 if name.startswith("unimedi.text_model.") else 3e-4), name
        assert decay == (0.0 if param.ndim < 2 or name.endswith(("cls_token", "position_embedding")) else 0.05), name
    single = optimizer_groups(model, learning_rate=3e-4, weight_decay=0.05)
    assert {group["lr"] for group in single} == {3e-4} and len(single) == 2


def test_freezing_text_layers_stops_their_gradients_and_dropout():
    from transformers import BertConfig, BertModel

    from training.pretrain import freeze_text_layers

    text_model = BertModel(BertConfig(**{k: v for k, v in TINY_TEXT.items() if k != "model_type"}))
    assert freeze_text_layers(text_model, 0) == []
    frozen = freeze_text_layers(text_model, 1)
    assert frozen == [text_model.embeddings, text_model.encoder.layer[0]]
    assert not any(p.requires_grad for module in frozen for p in module.parameters())
    assert all(p.requires_grad for p in text_model.encoder.layer[1].parameters())
    with pytest.raises(ValueError, match=r"must be 'all' or in \[0, 2\], got 3"):
        freeze_text_layers(text_model, 3)
    with pytest.raises(ValueError, match="got 'most'"):
        freeze_text_layers(text_model, "most")
    assert len(freeze_text_layers(text_model, "all")) == 3
    with pytest.raises(ValueError, match="needs a BERT-family text encoder"):
        freeze_text_layers(torch.nn.Linear(2, 2), 1)


# ---------------------------------------------------------------- data


@pytest.mark.parametrize("batch_size, fraction", [(16, 0.25), (6, 0.1), (4, 1 / 3), (144, 0.125)])
def test_mixing_ratio_holds_over_many_batches(batch_size, fraction):
    counts = [cts_in_batch(i, batch_size, fraction) for i in range(997)]
    assert set(counts) <= {int(batch_size * fraction), int(batch_size * fraction) + 1}
    assert abs(sum(counts) - 997 * batch_size * fraction) <= 1


def test_mixed_batches_from_streamed_shards(tmp_path):
    fabricated_shards(tmp_path)
    batches = MixedBatches(str(tmp_path), "train", batch_size=4, ct_fraction=0.25, buffer=8)
    drawn = [batches.next_batch() for _ in range(20)]  # 60 X-rays over 24 records, 20 CTs over 12: wraps epochs
    assert all(len(x) + len(c) == 4 for x, c in drawn)
    assert sum(len(c) for _, c in drawn) == 20
    assert all(r["modality"] == "xray" for x, _ in drawn for r in x)
    assert all(r["modality"] == "ct" for _, c in drawn for r in c)
    first_epoch = [r["sample_id"] for x, _ in drawn for r in x][:24]
    assert sorted(first_epoch) == sorted(f"x{i}" for i in range(24))  # every X-ray once per epoch


def test_stream_resumes_exactly_where_it_stopped(tmp_path):
    fabricated_shards(tmp_path)
    reference = ModalityStream(str(tmp_path), "train", "xray", 0, 1, seed=3, buffer=8)
    expected = [r["sample_id"] for r in reference.take(40)]
    stream = ModalityStream(str(tmp_path), "train", "xray", 0, 1, seed=3, buffer=8)
    head = [r["sample_id"] for r in stream.take(29)]
    resumed = ModalityStream(str(tmp_path), "train", "xray", 0, 1, seed=3, buffer=8)
    resumed.load_state_dict(stream.state_dict())
    assert head + [r["sample_id"] for r in resumed.take(11)] == expected


def test_ranks_read_disjoint_shards(tmp_path):
    fabricated_shards(tmp_path)
    seen = [
        {r["sample_id"] for r in ModalityStream(str(tmp_path), "train", "xray", rank, 2, 0, 8).take(12)}
        for rank in (0, 1)
    ]
    assert not seen[0] & seen[1]


def test_streaming_round_trip_keeps_the_volume(tmp_path):
    fabricated_shards(tmp_path)
    from processing.schema import decode_volume

    cts = [r for r in stream_split(tmp_path, "train") if r["modality"] == "ct"]
    assert len(cts) == 12 and decode_volume(cts[0]).shape == TINY_VISION["volume_size"]


# ---------------------------------------------------------------- checkpoints


def test_incomplete_and_corrupted_checkpoints_are_skipped(tmp_path):
    for step in (2, 4):
        tmp = checkpointing.temporary_dir(tmp_path, step)
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(os.urandom(64))
        checkpointing.finalize(tmp, checkpointing.checkpoint_dir(tmp_path, step), step)
    assert checkpointing.latest_complete(tmp_path).name == "step-00000004"
    corrupted = checkpointing.checkpoint_dir(tmp_path, 4) / "model.safetensors"
    corrupted.write_bytes(corrupted.read_bytes()[:-1] + b"x")
    unsealed = checkpointing.checkpoint_dir(tmp_path, 6)  # e.g. copied by hand without its manifest
    unsealed.mkdir()
    (unsealed / "model.safetensors").write_bytes(b"partial")
    assert checkpointing.latest_complete(tmp_path).name == "step-00000002"
    broken = checkpointing.checkpoint_dir(tmp_path, 2) / checkpointing.MANIFEST
    for manifest in ("null", '{"files": []}', '{"files": {}}', '{"files": {"x": null}}', '{"files": {"x": 1}}'):
        broken.write_text(manifest)  # damaged manifests mark the checkpoint broken, never crash the search
        assert checkpointing.latest_complete(tmp_path) is None, manifest


# ---------------------------------------------------------------- end to end


def test_interrupted_run_resumes_to_the_same_losses(tmp_path):
    data = fabricated_shards(tmp_path / "data")
    run_training(tiny_run_args(data, tmp_path / "straight"))
    run_training(tiny_run_args(data, tmp_path / "resumed", stop_after_step=4))
    assert not (tmp_path / "resumed" / "final").exists()
    # the newest checkpoint is damaged: resuming must fall back to step 2 and still match
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step-00000004"
    (checkpoint / "model.safetensors").write_bytes(b"truncated")
    run_training(tiny_run_args(data, tmp_path / "resumed") + ["--resume"])
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    for step in range(3, 7):
        for key in ("loss", "vl_loss", "icl_loss", "pcl_loss"):
            assert resumed[step][key] == pytest.approx(straight[step][key], abs=1e-5), (step, key)
    model = UniMedIModel.from_pretrained(tmp_path / "resumed" / "final")
    assert model.config.vision_config.hidden_size == TINY_VISION["hidden_size"]
    assert (tmp_path / "resumed" / "final" / "README.md").read_text().count("## This checkpoint") == 1
    reference = UniMedIModel.from_pretrained(tmp_path / "straight" / "final").state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.allclose(tensor, reference[name], atol=1e-5), name


def test_two_cpu_processes(tmp_path):
    """Two gloo processes via torchrun (`accelerate launch --cpu --num_processes 2` starts only one process without
    mpirun; Accelerate picks up torchrun's environment as MULTI_CPU)."""
    data = fabricated_shards(tmp_path / "data")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    run_training(
        tiny_run_args(data, tmp_path / "ddp", max_steps=2, save_every_steps=2),
        launcher=launcher,
        env_extra={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
    )
    assert sorted(
        p.name for p in (tmp_path / "ddp" / "checkpoints" / "step-00000002").glob("data_state_rank*.json")
    ) == [
        "data_state_rank0.json",
        "data_state_rank1.json",
    ]
    UniMedIModel.from_pretrained(tmp_path / "ddp" / "final")


def test_a_fresh_run_refuses_an_output_dir_with_an_earlier_run(tmp_path):
    from training.config import load_config
    from training.pretrain import prepare_output_dir

    (tmp_path / "checkpoints" / "step-00000002").mkdir(parents=True)
    config = load_config(None, [f"output_dir={tmp_path}", "overwrite_output_dir=false"])
    with pytest.raises(FileExistsError, match="--resume"):
        prepare_output_dir(tmp_path, config, 0)
    config.overwrite_output_dir = True
    prepare_output_dir(tmp_path, config, 0)
    assert not (tmp_path / "checkpoints").exists()
    # resuming from step 2 drops log lines a killed run wrote after its last checkpoint
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    config.resume = True
    prepare_output_dir(tmp_path, config, 2)
    assert [json.loads(x)["step"] for x in (tmp_path / "train_log.jsonl").read_text().splitlines()] == [1, 2]


def test_vl_only_ablation_trains(tmp_path):
    """The VL row of Table 7 has no self-distillation losses; the loop must log only what exists."""
    data = fabricated_shards(tmp_path / "data")
    run_training(tiny_run_args(data, tmp_path / "vl", ablation="vl", max_steps=2, save_every_steps=2))
    logged = losses(tmp_path / "vl")
    assert set(logged[2]) >= {"loss", "vl_loss"} and "icl_loss" not in logged[2]
    # the rate each step's update used: cosine over 2 steps without warm-up starts at the full rate
    assert [logged[step]["lr"] for step in (1, 2)] == pytest.approx([1e-3, 5e-4])


def test_build_model_takes_the_ablation_row_with_overrides_on_top(tmp_path):
    """`ablation` picks a row of Table 7; a `model_config` field overrides that row's switch, the rest stays."""
    from training.pretrain import build_model

    args = tiny_run_args(tmp_path, tmp_path, ablation="vl+sd", **{"model_config.slice_selection": "attentive"})
    model = build_model(load_config(None, args))
    switches = (model.config.self_distillation, model.config.token_masking, model.config.slice_selection)
    assert switches == (True, "attentive", "attentive")  # token_masking from the row, selection overridden
    assert model.config.projection_dim == 16 and model.config.text_config.hidden_size == TINY_TEXT["hidden_size"]


def test_frozen_text_layers_stay_as_initialised_through_training(tmp_path):
    from accelerate.utils import set_seed

    from training.pretrain import build_model

    data = fabricated_shards(tmp_path / "data")
    args = tiny_run_args(data, tmp_path / "frozen", ablation="vl", max_steps=3, freeze_text_layers=1)
    run_training(args)
    config = load_config(None, args)
    set_seed(config.seed)
    initial = build_model(config).unimedi.text_model
    trained = UniMedIModel.from_pretrained(tmp_path / "frozen" / "final").text_model
    for frozen in ("embeddings", "encoder.layer.0"):
        for name, param in initial.get_submodule(frozen).named_parameters():
            torch.testing.assert_close(trained.get_submodule(frozen).get_parameter(name), param, rtol=0, atol=0)
    moved = trained.encoder.layer[1].attention.self.query.weight - initial.encoder.layer[1].attention.self.query.weight
    assert moved.abs().max() > 0


def test_streams_read_shards_that_mix_modalities(tmp_path):
    """Shards not written by `write_shards` (e.g. a Hub dataset) hold both modalities: streams filter them."""
    from datasets import Dataset

    from processing.schema import FEATURES
    from training.data import PretrainCollator

    fabricated_shards(tmp_path / "split")
    records = [r for r in stream_split(tmp_path / "split", "train")]
    for record in records:
        if record["image"] is not None:
            png = io.BytesIO()
            record["image"].save(png, format="PNG")
            record["image"] = {"bytes": png.getvalue()}
    (tmp_path / "mixed").mkdir()
    Dataset.from_list(records, features=FEATURES).to_parquet(str(tmp_path / "mixed" / "train-00000.parquet"))
    batches = MixedBatches(str(tmp_path / "mixed"), "train", batch_size=4, ct_fraction=0.25, buffer=8)
    xrays, cts = batches.next_batch()
    assert [r["modality"] for r in xrays] == ["xray"] * 3 and [r["modality"] for r in cts] == ["ct"]
    from transformers import AutoTokenizer

    from modeling_unimedi import UniMedIImageProcessor, UniMedIProcessor, UniMedIVolumeProcessor

    processor = UniMedIProcessor(
        UniMedIImageProcessor(),
        AutoTokenizer.from_pretrained(minilm_path()),
        UniMedIVolumeProcessor(volume_size=TINY_VISION["volume_size"]),
    )
    inputs = PretrainCollator(processor)(xrays, cts)
    assert inputs["pixel_values"].shape[0] == 3 and inputs["volume_values"].shape[0] == 1
    batches.close()


# ---------------------------------------------------------------- resuming safely


class WritesMarker:
    """Unpickling this runs code: it creates the file `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('pwned')",)


def reseal(folder):
    """Rewrite a checkpoint's manifest after tampering, as anyone who can write the folder can."""
    tmp = folder.with_name(".tmp-" + folder.name)
    folder.rename(tmp)
    (tmp / checkpointing.MANIFEST).unlink()
    checkpointing.finalize(tmp, folder, int(folder.name.split("-")[1]))


def run_expecting_refusal(args, match):
    command = [sys.executable, "-m", "training.pretrain"] + args
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=os.getcwd(), check=False)
    assert done.returncode != 0 and match in done.stderr, done.stderr[-3000:]


def test_resume_never_unpickles_and_refuses_changed_settings(tmp_path):
    import pickle

    data = fabricated_shards(tmp_path / "data")
    output = tmp_path / "run"
    args = tiny_run_args(data, output, max_steps=4, stop_after_step=2)
    run_training(args)
    checkpoint = output / "checkpoints" / "step-00000002"
    assert not list(checkpoint.glob("*.pkl"))
    marker = tmp_path / "marker"
    pristine = tmp_path / "pristine"
    shutil.copytree(checkpoint, pristine)

    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):  # the pickles Accelerate would load
        (checkpoint / name).write_bytes(pickle.dumps(WritesMarker(marker)))
    reseal(checkpoint)
    run_expecting_refusal(args + ["--resume"], "refusing a checkpoint that holds pickle files")
    assert not marker.exists()

    shutil.rmtree(checkpoint)
    shutil.copytree(pristine, checkpoint)
    torch.save({"state": WritesMarker(marker)}, checkpoint / "optimizer.bin", _use_new_zipfile_serialization=True)
    reseal(checkpoint)
    run_expecting_refusal(args + ["--resume"], "refusing unsafe content in the optimizer state")
    assert not marker.exists()

    shutil.rmtree(checkpoint)
    shutil.copytree(pristine, checkpoint)
    changed = tiny_run_args(data, output, max_steps=4, learning_rate=5e-4, shuffle_buffer=4)
    run_expecting_refusal(changed + ["--resume"], "learning_rate: 0.001 -> 0.0005; shuffle_buffer: 8 -> 4")
    # allowed overrides (a longer run, other logging), from a checkpoint given by path
    run_training(tiny_run_args(data, output, max_steps=5, log_every_steps=2) + ["--resume", str(checkpoint)])
    assert sorted(losses(output)) == [1, 2, 3, 4, 5] and not marker.exists()


def test_ranks_get_equal_epochs_and_open_only_their_shards(tmp_path, monkeypatch):
    """12 CTs in shards of 8 and 4, 24 X-rays in 3 shards, over 2 ranks: 6 CTs and 12 X-rays each per epoch, every
    record read by one rank, and the ranks together open each shard once (the boundary's twice), not each all."""
    import training.data

    fabricated_shards(tmp_path)
    opened = []
    real_load_dataset = training.data.load_dataset
    monkeypatch.setattr(
        training.data,
        "load_dataset",
        lambda *args, **kwargs: (
            opened.append(next(iter(kwargs["data_files"].values()))) or real_load_dataset(*args, **kwargs)
        ),
    )
    for modality, per_rank, shards in (("ct", 6, 2), ("xray", 12, 3)):
        opened.clear()
        epochs = []
        for rank in (0, 1):
            stream = ModalityStream(str(tmp_path), "train", modality, rank, 2, seed=5, buffer=8)
            epoch = []
            while stream.epoch == 0:
                epoch += [r["sample_id"] for r in stream.take(1)]
            epochs.append(epoch[:-1])  # the last record taken opened the next epoch
        assert [len(e) for e in epochs] == [per_rank, per_rank], modality
        assert len(set(epochs[0]) | set(epochs[1])) == 2 * per_rank, modality
        # two epochs opened per rank: each shard once per epoch, plus the shard a rank boundary falls in
        assert sum(len(files) for files in opened) <= 2 * (shards + 1), (modality, opened)


def test_a_kill_while_rewriting_the_log_keeps_it(tmp_path, monkeypatch):
    """A kill after the file was opened for writing, before its content was written, must leave the old log."""
    from training.pretrain import prepare_output_dir

    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    config = load_config(None, [f"output_dir={tmp_path}", "resume=true"])

    def killed_while_writing(path, text, *args, **kwargs):
        open(path, "w").close()
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        prepare_output_dir(tmp_path, config, 2)
    monkeypatch.undo()
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3]


def test_a_kill_while_pruning_is_cleaned_up_by_the_next_start(tmp_path, monkeypatch):
    for step in (2, 4, 6):
        tmp = checkpointing.temporary_dir(tmp_path, step)
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(os.urandom(64))
        checkpointing.finalize(tmp, checkpointing.checkpoint_dir(tmp_path, step), step)

    def killed_while_deleting(folder, *args, **kwargs):
        (folder / checkpointing.MANIFEST).unlink()  # rmtree's first deletion, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.prune(tmp_path, keep=2)
    monkeypatch.undo()
    checkpointing.prune(tmp_path, keep=2)  # the next save (or start) finishes the deletion
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000006"]


def test_launch_by_file_path_imports_this_checkout(tmp_path):
    """`accelerate launch training/pretrain.py` runs the file: its modules must come from this checkout, also without
    the package installed or on PYTHONPATH (the installed editable copy points at another checkout)."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-v", str(root / "training" / "pretrain.py"), "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sources = re.findall(
        r"^# code object from '?(.+?/(?:training|modeling_unimedi|processing)/[^/']+\.py)", done.stderr, re.MULTILINE
    )
    sources += re.findall(
        r"matches (.+?/(?:training|modeling_unimedi|processing)/[^/ ]+\.py)$", done.stderr, re.MULTILINE
    )
    assert sources and all(Path(s).resolve().is_relative_to(root) for s in sources), sorted(set(sources))


def test_fp16_on_cpu_is_refused(tmp_path):
    """fp16 autocast does nothing on CPU: the run would record fp16 while computing in float32."""
    data = fabricated_shards(tmp_path / "data")  # a run that would otherwise train, silently in float32
    run_expecting_refusal(tiny_run_args(data, tmp_path / "out", mixed_precision="fp16"), "fp16 needs a GPU")


def test_a_hub_stream_is_split_by_record_and_resumes_exactly(tmp_path, monkeypatch):
    """Without local shards (a Hub dataset, here the same folder loaded by name) every rank keeps its own records of
    the shuffled stream, and a resumed stream skips the rank's own records, also in a later epoch."""
    import training.data

    fabricated_shards(tmp_path)
    monkeypatch.setattr(training.data, "shard_files", lambda data, split: None)
    epochs = []
    for rank in (0, 1):
        drawn = [r["sample_id"] for r in ModalityStream(str(tmp_path), "train", "ct", rank, 2, 1, 4).take(12)]
        stopped = ModalityStream(str(tmp_path), "train", "ct", rank, 2, 1, 4)
        stopped.take(8)
        resumed = ModalityStream(str(tmp_path), "train", "ct", rank, 2, 1, 4)
        resumed.load_state_dict(stopped.state_dict())
        assert [r["sample_id"] for r in resumed.take(4)] == drawn[8:], rank
        epochs.append(set(drawn[:6]))
    assert epochs[0] | epochs[1] == {f"c{i}" for i in range(12)}


def test_a_decompression_bomb_record_is_refused_by_name():
    """A PNG whose header claims 30000 x 30000 pixels: PIL's bomb guard becomes an error naming the record."""
    import struct
    import zlib

    from training.data import _decode_image

    png = io.BytesIO()
    Image.new("L", (1, 1)).save(png, format="PNG")
    data = bytearray(png.getvalue())
    header = struct.pack(">II", 30000, 30000) + bytes(data[24:29])  # IHDR: width, height, then 5 unchanged bytes
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    with pytest.raises(ValueError, match=r"'bomb-1': cannot decode its image"):
        _decode_image({"sample_id": "bomb-1", "image": {"bytes": bytes(data)}})
