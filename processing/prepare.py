"""Preparing the pretraining and downstream sources as sharded parquet datasets: the command line over ``processing.pipeline``.

    python -m processing.prepare mimic-cxr --root /data/mimic-cxr-jpg --reports /data/mimic-cxr-reports \
        --out data/mimic --records-per-shard 256
    python -m processing.prepare bimcv --root /data/bimcv/covid19_posi --translations en.json --out data/bimcv
    python -m processing.prepare ct-rate --root /data/CT-RATE/dataset --out data/ct-rate --num-proc 8
    python -m processing.prepare chexpert --root /data/CheXpert-v1.0 --out data/chexpert  # also rsna, covidx, ...
    python -m processing.prepare rsna --root /data/rsna --task dense --out data/rsna-dense  # boxes and masks
    python -m processing.prepare bcv --root /data/bcv/Abdomen --out data/bcv  # CTs and 13-organ masks, 48x224x224
    python -m processing.prepare amos --root /data/amos22 --out data/amos  # CTs and 15-organ masks, as BCV

Each dataset is one reader module exposing a ``COMMAND`` (``processing.pipeline.DatasetCommand``); listing it in
``DATASETS`` below is all a new reader needs to appear here. Layouts: README.md.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

from . import amos, bcv, bimcv, cc_ccii, chexpert, covidx, ct_rate, luna16, mimic_cxr, rsna
from .pipeline import SUMMARY_FILE, DatasetCommand, prepare

DATASETS: dict[str, DatasetCommand] = {
    command.name: command
    for command in (
        mimic_cxr.COMMAND,
        bimcv.COMMAND,
        ct_rate.COMMAND,
        chexpert.COMMAND,
        rsna.COMMAND,
        covidx.COMMAND,
        cc_ccii.COMMAND,
        luna16.COMMAND,
        bcv.COMMAND,
        amos.COMMAND,
    )
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m processing.prepare", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="dataset", required=True)
    for command in DATASETS.values():
        command.add_arguments(_add_dataset(subparsers, command))
    return parser


def _add_dataset(subparsers, command: DatasetCommand) -> argparse.ArgumentParser:
    """The options every dataset has; the reader's own are added by its ``add_arguments``."""
    parser = subparsers.add_parser(command.name, help=command.help, description=command.help)
    parser.add_argument("--root", required=True, type=Path, help="dataset folder (layout: processing/README.md)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the parquet shards and the summary")
    parser.add_argument("--records-per-shard", type=int, default=command.records_per_shard)
    parser.add_argument("--num-proc", type=int, default=1, help="processes decoding images/volumes")
    parser.add_argument("--overwrite", action="store_true", help="replace shards of an earlier run in --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    command = DATASETS[args.dataset]
    options, read_split = command.open_reader(args)
    inputs = {name: str(getattr(args, name)) for name in command.input_files if getattr(args, name, None)}
    summary = prepare(
        read_split,
        command.splits,
        args.out,
        records_per_shard=args.records_per_shard,
        description={"dataset": args.dataset, "root": str(args.root), "options": {**options, **inputs}},
        overwrite=args.overwrite,
    )
    print(json.dumps({key: summary[key] for key in ("kept", "dropped", "shards")}, indent=2))
    if summary["kept_total"] == 0:
        print(f"no record was kept; see {args.out / SUMMARY_FILE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
