"""Where a CPU demo step's time goes, and what the frozen report encoder's cache saves.

    python benchmarks/demo_step_profile.py [--data data/groundtruth] [--steps 6] [--threads 1] [--smoke]

Builds the demo's model, processor and data stream exactly as ``training.pretrain.train`` does (demo settings,
``training/configs/demo.yaml``), then times the parts of each step: reading records from the shards, collating
(image/volume decoding, augmentation, tokenising), the report encoder's forward alone, the model's forward (which
includes the report encoder), backward, the AdamW step and the EMA teacher update. The same batches are timed twice
in one process, without and then with ``training.text_cache`` installed, its reports encoded beforehand: the
steady state of a run after its first pass over the reports (a run's first pass still encodes each report once).
The first step of each setting warms up and is not timed. Prints a JSON line per setting and the ratio. A missing
``--data`` folder is generated first; ``--smoke`` (CI) generates a small dataset in a temporary folder and times one
step.
"""

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from data_throughput import generate_data  # benchmarks/ is the script's folder, first on sys.path


def build(data: str):
    """The demo's model (text encoder frozen, its frozen parts in eval mode), optimizer, collator and config."""
    from accelerate.utils import set_seed

    from training.config import load_config
    from training.data import PretrainCollator
    from training.pretrain import build_model, build_processor, freeze_text_layers

    config = load_config(None, [f"train_data={data}", "report_to=none"])
    set_seed(0)
    model = build_model(config)
    frozen = freeze_text_layers(model.unimedi.text_model, config.freeze_text_layers)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    model.train()
    for module in frozen:
        module.eval()
    return model, optimizer, PretrainCollator(build_processor(config, model.config), training=True), config


def read_batches(data: str, config, count: int) -> tuple[list, list[float]]:
    """``count`` batches of records from the demo's stream, and the seconds each read took."""
    from training.data import MixedBatches

    batches = MixedBatches(data, "train", config.batch_size, config.ct_fraction, seed=0)
    records, seconds = [], []
    for _ in range(count):
        start = time.perf_counter()
        records.append(batches.next_batch())
        seconds.append(time.perf_counter() - start)
    batches.close()
    return records, seconds


def profile(data: str, steps: int, cached: bool) -> dict:
    from training.text_cache import install_text_cache

    model, optimizer, collate, config = build(data)
    records, read_seconds = read_batches(data, config, steps + 1)
    cache = None
    if cached:  # the reports of these batches encoded once, as after a run's first pass over its reports
        cache = install_text_cache(model.unimedi.text_model)
        for batch in records:
            inputs = collate(*batch)
            with torch.no_grad():
                model.unimedi.get_text_features(inputs["input_ids"], inputs["attention_mask"])
    parts = defaultdict(list)
    parts["read records"] = read_seconds[1:]
    for step, batch in enumerate(records):
        timings = {}
        start = time.perf_counter()
        inputs = collate(*batch)
        timings["collate"] = time.perf_counter() - start
        if not cached:
            start = time.perf_counter()
            with torch.no_grad():
                model.unimedi.get_text_features(inputs["input_ids"], inputs["attention_mask"])
            timings["report encoder alone (inside forward too)"] = time.perf_counter() - start
        start = time.perf_counter()
        out = model(**inputs, teacher_temperature=0.04)
        timings["forward"] = time.perf_counter() - start
        start = time.perf_counter()
        out.loss.backward()
        timings["backward"] = time.perf_counter() - start
        start = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        timings["optimizer"] = time.perf_counter() - start
        start = time.perf_counter()
        model.update_teacher(0.996)
        timings["teacher update"] = time.perf_counter() - start
        if step:  # the first step warms up
            for name, seconds in timings.items():
                parts[name].append(seconds)
    step_parts = [name for name in parts if not name.startswith("report encoder")]
    totals = [sum(parts[name][i] for name in step_parts) for i in range(steps)]
    result = {
        "text_cache": cached,
        "step_s_median": round(statistics.median(totals), 3),
        "parts_s_median": {name: round(statistics.median(values), 4) for name, values in parts.items()},
    }
    if cache is not None:
        result["cache_hits_misses"] = [cache.hits, cache.misses]
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/groundtruth")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="a small generated dataset, one step (CI)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        if args.smoke:
            args.data, args.steps = str(Path(scratch) / "data"), 1
            generate_data(args.data, "--num-xrays", "40", "--num-cts", "20")
        elif not Path(args.data).exists():
            generate_data(args.data)
        results = [profile(args.data, args.steps, cached) for cached in (False, True)]
    for result in results:
        print(json.dumps(result))
    print(f"step time with the text cache / without: {results[1]['step_s_median'] / results[0]['step_s_median']:.3f}")


if __name__ == "__main__":
    main()
