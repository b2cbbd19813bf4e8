"""The paper's downstream grid (label fractions x datasets x linear probe / fine-tuning) and its tables.

    python -m training.finetune_grid --grid groundtruth --models unimedi=outputs/demo/final,random=none
    python -m training.finetune_grid --grid paper --models unimedi=outputs/pretrain/final --data-root data

Every cell is one `training.finetune` run in `<output-dir>/<model>/<dataset>-<protocol>-<fraction>/`; a cell whose
`results.json` exists is not run again, so an interrupted grid continues where it stopped. Extra `key=value`
settings go to every run (e.g. `num_epochs=5`); `--datasets` runs only some datasets' cells, `--tables-only` none.
Prints and writes `tables.md`: for `paper`, Table 1 (2D linear probe: CheXpert and RSNA AUROC, COVIDx accuracy),
Table 2 (CC-CCII linear probe) and Table 3 (CC-CCII and LUNA16 fine-tuned on all labels); for `groundtruth`, the
same protocol on the benchmark's X-rays and CTs.
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

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


def cell_dir(output_dir: Path, model_name: str, dataset: str, freeze_encoder: bool, fraction: float) -> Path:
    return output_dir / model_name / f"{dataset}-{'probe' if freeze_encoder else 'finetune'}-{fraction:g}"


def run_grid(
    grid: str,
    models: dict[str, str | None],
    output_dir: Path,
    data_root: str | None,
    overrides: list[str],
    datasets: set[str] | None = None,
):
    """Run every missing cell of `grid` (of `datasets` only, when given) for every model."""
    for table in GRIDS[grid]:
        for model_name, model in models.items():
            for dataset in (d for d in table.datasets if datasets is None or d in datasets):
                for fraction in table.fractions:
                    folder = cell_dir(output_dir, model_name, dataset, table.freeze_encoder, fraction)
                    if not (folder / "results.json").is_file():
                        settings = [
                            f"model={json.dumps(model)}",
                            f"label_fraction={fraction}",
                            f"freeze_encoder={str(table.freeze_encoder).lower()}",
                            f"output_dir={folder}",
                            "overwrite_output_dir=true",
                            *([f"data={Path(data_root) / dataset}"] if data_root else []),
                            *overrides,
                        ]
                        train(load_settings(CONFIG_DIR / CONFIG_FILES[dataset], settings))


def markdown_tables(grid: str, models: dict[str, str | None], output_dir: Path) -> str:
    """One markdown table per `Table`: a row per model, a column per dataset and label fraction, values in % ("-":
    a cell not run)."""
    blocks = []
    for table in GRIDS[grid]:
        columns = [(d, f) for d in table.datasets for f in table.fractions]
        header = "| Method | " + " | ".join(f"{d} {100 * f:g} %" for d, f in columns) + " |"
        rows = [f"**{table.title}**", "", header, "|---" * (len(columns) + 1) + "|"]
        for model_name in models:
            cells = []
            for dataset, fraction in columns:
                results = cell_dir(output_dir, model_name, dataset, table.freeze_encoder, fraction) / "results.json"
                found = json.loads(results.read_text()) if results.is_file() else None
                value = None if found is None else found["test"][found["metric"]]
                cells.append("-" if value is None else f"{100 * value:.1f}")
            rows.append(f"| {model_name} | " + " | ".join(cells) + " |")
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
    parser.add_argument("--tables-only", action="store_true", help="print the tables of the finished cells only")
    parser.add_argument("overrides", nargs="*", help="key=value settings for every run")
    args = parser.parse_args(argv)
    models = parse_models(args.models)
    datasets = set(args.datasets.split(",")) if args.datasets else None
    if not args.tables_only:
        run_grid(args.grid, models, args.output_dir, args.data_root, args.overrides, datasets)
    tables = markdown_tables(args.grid, models, args.output_dir)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "tables.md").write_text(tables)
    print(tables)
    return tables


if __name__ == "__main__":
    main()
