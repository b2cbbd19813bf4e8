"""The paper's downstream grid (label fractions x datasets x linear probe / fine-tuning) and its tables.

    python -m training.finetune_grid --grid groundtruth --models unimedi=outputs/demo/final,random=none
    python -m training.finetune_grid --grid paper --models unimedi=outputs/pretrain/final --data-root data

Every cell is one `training.finetune` run per seed (`--seeds`, default 0) in
`<output-dir>/<model>/<dataset>-<protocol>-<fraction>/seed-<S>/`; a run whose `results.json` exists is not run
again, so an interrupted grid continues where it stopped. Extra `key=value` settings go to every run (e.g.
`num_epochs=5`); `--datasets` runs only some datasets' cells, `--tables-only` none. Tables show the mean ± sd over
seeds and each pretrained model's gain over the random-init model (`name=none`) with a one-sided Welch p-value.
Prints and writes `tables.md`: for `paper`, Table 1 (2D linear probe: CheXpert and RSNA AUROC, COVIDx accuracy),
Table 2 (CC-CCII linear probe) and Table 3 (CC-CCII and LUNA16 fine-tuned on all labels); for `groundtruth`, the
same protocol on the benchmark's X-rays and CTs.
"""

import argparse
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.evaluation.statistics import welch_greater_p
from training.finetune import CONFIG_DIR, load_settings, train

FRACTIONS = (0.01, 0.1, 1.0)


@dataclass(frozen=True)
class Table:
    title: str
    datasets: tuple[str, ...]
    freeze_encoder: bool
    fractions: tuple[float, ...] = FRACTIONS


# dataset name -> its settings file
CONFIG_FILES = {
    "chexpert": "chexpert.yaml",
    "rsna": "rsna.yaml",
    "covidx": "covidx.yaml",
    "cc-ccii": "cc_ccii.yaml",
    "luna16": "luna16.yaml",
    "groundtruth-xray": "groundtruth_xray.yaml",
    "groundtruth-ct": "groundtruth_ct.yaml",
}
GRIDS = {
    "paper": (
        Table(
            "Table 1: 2D linear classification (AUROC: CheXpert, RSNA; ACC: COVIDx)",
            ("chexpert", "rsna", "covidx"),
            True,
        ),
        Table("Table 2: 3D linear classification (ACC)", ("cc-ccii",), True),
        Table("Table 3: 3D fine-tuning, full training data (ACC)", ("cc-ccii", "luna16"), False, (1.0,)),
    ),
    "groundtruth": (
        Table("Ground truth, linear probe (mean AUROC over 3 findings)", ("groundtruth-xray", "groundtruth-ct"), True),
        Table("Ground truth, fine-tuning (mean AUROC over 3 findings)", ("groundtruth-xray", "groundtruth-ct"), False),
    ),
}


def cell_dir(
    output_dir: Path, model_name: str, dataset: str, freeze_encoder: bool, fraction: float, seed: int
) -> Path:
    cell = f"{dataset}-{'probe' if freeze_encoder else 'finetune'}-{fraction:g}"
    return output_dir / model_name / cell / f"seed-{seed}"


def run_grid(
    grid: str,
    models: dict[str, str | None],
    output_dir: Path,
    data_root: str | None,
    overrides: list[str],
    datasets: set[str] | None = None,
    seeds: tuple[int, ...] = (0,),
):
    """Run every missing cell of `grid` (of `datasets` only, when given) for every model, once per seed (the seed
    draws the label subset, the head's initialisation and the shuffle order)."""
    for seed, table in itertools.product(seeds, GRIDS[grid]):  # a whole grid per seed: early seeds report first
        for model_name, model in models.items():
            for dataset in (d for d in table.datasets if datasets is None or d in datasets):
                for fraction in table.fractions:
                    folder = cell_dir(output_dir, model_name, dataset, table.freeze_encoder, fraction, seed)
                    if not (folder / "results.json").is_file():
                        settings = [
                            f"model={json.dumps(model)}",
                            f"label_fraction={fraction}",
                            f"freeze_encoder={str(table.freeze_encoder).lower()}",
                            f"output_dir={folder}",
                            "overwrite_output_dir=true",
                            f"seed={seed}",
                            *([f"data={Path(data_root) / dataset}"] if data_root else []),
                            *overrides,
                        ]
                        train(load_settings(CONFIG_DIR / CONFIG_FILES[dataset], settings))


def cell_values(output_dir: Path, model_name: str, table: Table, dataset: str, fraction: float, seeds) -> list[float]:
    """The test metric (%) of each finished seed of one cell."""
    values = []
    for seed in seeds:
        results = cell_dir(output_dir, model_name, dataset, table.freeze_encoder, fraction, seed) / "results.json"
        if results.is_file():
            found = json.loads(results.read_text())
            values.append(100 * found["test"][found["metric"]])
    return values


def mean_sd_text(values: list[float], num_seeds: int) -> str:
    """Mean ± sd over the finished seeds, and how many finished when not all did."""
    if not values:
        return "-"
    text = f"{values[0]:.1f}" if len(values) == 1 else f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"
    return text if len(values) == num_seeds else f"{text} (n={len(values)})"


def gain_text(values: list[float], baseline: list[float]) -> str:
    """Mean gain in points over the baseline's cell, with a one-sided Welch p-value over seeds when both have two."""
    if not values or not baseline:
        return "-"
    gain = f"{np.mean(values) - np.mean(baseline):+.1f}"
    p_value = welch_greater_p(values, baseline)
    return gain if p_value is None else f"{gain} (p={p_value:.2g})"


def markdown_tables(grid: str, models: dict[str, str | None], output_dir: Path, seeds: tuple[int, ...] = (0,)) -> str:
    """One markdown table per `Table`: a row per model, a column per dataset and label fraction, values in %, the
    mean ± sd over `seeds` ("-": a cell not run); below it each pretrained model's gain over the random-init model
    (the first with no folder), the comparison the paper's "pretraining helps most at 1 %" rests on."""
    baseline = next((name for name, folder in models.items() if folder is None), None)
    blocks = []
    for table in GRIDS[grid]:
        columns = [(d, f) for d in table.datasets for f in table.fractions]
        header = "| Method | " + " | ".join(f"{d} {100 * f:g} %" for d, f in columns) + " |"
        rule = "|---" * (len(columns) + 1) + "|"
        values = {
            name: [cell_values(output_dir, name, table, d, f, seeds) for d, f in columns] for name in models
        }
        rows = [f"**{table.title}** (seeds {list(seeds)})", "", header, rule]
        rows += [
            f"| {name} | " + " | ".join(mean_sd_text(cell, len(seeds)) for cell in cells) + " |"
            for name, cells in values.items()
        ]
        gains = [name for name in models if name != baseline and models[name] is not None]
        if baseline is not None and gains:
            rows += ["", f"Gain over {baseline} (points; one-sided Welch p over seeds)", "", header, rule]
            rows += [
                f"| {name} | " + " | ".join(map(gain_text, values[name], values[baseline])) + " |" for name in gains
            ]
        blocks.append("\n".join(rows))
    return "\n\n".join(blocks) + "\n"


def parse_models(text: str) -> dict[str, str | None]:
    """`name=path,name=none`: "none" (or "random") is the architecture at random initialisation."""
    models = {}
    for item in text.split(","):
        name, sep, path = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--models entry {item!r} is not name=path")
        models[name] = None if path.lower() in ("none", "random") else path
    return models


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="groundtruth")
    parser.add_argument("--models", default="random=none", help="name=folder,... (folder 'none': random init)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/finetune_grid"))
    parser.add_argument("--data-root", help="folder holding one prepared folder per dataset (data-root/chexpert, ...)")
    parser.add_argument("--datasets", help="comma-separated: run only these datasets' cells (e.g. groundtruth-ct)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per cell (mean ± sd in tables)")
    parser.add_argument("--tables-only", action="store_true", help="print the tables of the finished cells only")
    parser.add_argument("overrides", nargs="*", help="key=value settings for every run")
    args = parser.parse_args(argv)
    models = parse_models(args.models)
    datasets = set(args.datasets.split(",")) if args.datasets else None
    if not args.tables_only:
        run_grid(args.grid, models, args.output_dir, args.data_root, args.overrides, datasets, tuple(args.seeds))
    tables = markdown_tables(args.grid, models, args.output_dir, tuple(args.seeds))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "tables.md").write_text(tables)
    print(tables)
    return tables


if __name__ == "__main__":
    main()
