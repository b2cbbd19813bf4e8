"""Ground-truth benchmark: pretrain UniMedI on the synthetic benchmark's train split, then measure its test split.

    python -m benchmarks.groundtruth --quick                       # one run of the full method (demo settings)
    python -m benchmarks.groundtruth                               # + the VL and VL+SD ablations, 2D-only and 3D-only
    python -m benchmarks.groundtruth --set max_steps=1000          # enough steps for the demo ViT to learn (README)
    python -m benchmarks.groundtruth --evaluate outputs/demo/final # measure an existing model, no training
    python -m benchmarks.groundtruth --gpu-scale --data data/groundtruth_large   # bigger model, more steps (GPU)

Training is `training.pretrain.train` with the demo settings (`training/configs/demo.yaml`, or `--config`) plus each
run's overrides and any `--set key=value`; measuring is `training.evaluate.evaluate` (zero-shot AUROC per finding,
report -> X-ray/CT retrieval, slice-selection hit rate against the exact random expectation, 2D<->3D alignment,
t-SNE and slice figures). Runs (default mode; `--quick` trains the first only):

- ``vl_sd_attn``: the full method (VL + self-distillation with attention-guided masking + attentive slice
  selection), one joint 2D+3D model;
- ``vl``, ``vl_sd``: the ablation rows of the paper's Table 7 (``ablation=vl``: L_vl with random slices; ``vl+sd``:
  + L_icl and L_pcl with attention-guided masking, still random slices); ``vl_sd_random_mask``: an extra row,
  ``vl+sd`` with random masking (``ablation=vl+sd(random-mask)``);
- ``xray_only``, ``ct_only``: separate 2D and 3D models (``ct_fraction=0`` / ``1``) against the joint one (Fig. 6).
  Each run takes the same number of steps and batch size, so the 3D-only model sees 4x the CTs the joint model does.

Writes ``benchmark.md`` and ``benchmark.json`` to ``--out`` (default ``outputs/groundtruth_benchmark``), each run under
``runs/<name>/`` (its pretraining output, ``final/`` and ``evaluation/`` with metrics and figures).

``--gpu-scale`` (for one GPU; not a paper-scale run): a ViT with 384 hidden units, 6 layers and the paper's patch sizes
(16 for X-rays, 4x16x16 for CTs: 8 depth slabs, k = 2), projection 256, batch 64, 2,000 steps, bf16. That many steps
repeat the default 720 training samples ~180 times; generate a larger benchmark first, e.g.
``python -m processing.groundtruth --out data/groundtruth_large --num-xrays 6000 --num-cts 3000``.

This is a functional benchmark on synthetic findings in one real anatomy, never a clinical result: it shows whether
training and evaluation work and whether each design choice does what it should on data whose answer is known.
"""

import argparse
import itertools
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from processing.groundtruth import DISCLAIMER
from processing.schema import CT, XRAY
from training.config import load_config
from training.evaluate import evaluate
from training.evaluation.markdown import percent, table
from training.evaluation.report import markdown_report
from training.evaluation.slice_selection import ANY_LESION
from training.pretrain import train

LOGGER = logging.getLogger("unimedi.benchmark")
DEFAULT_OUT = "outputs/groundtruth_benchmark"
NOT_CLINICAL = (
    f"{DISCLAIMER} The numbers check that training and evaluation work and whether each design does what it should "
    "on data whose answer is known; they are NOT a clinical result."
)
GPU_SCALE_OVERRIDES = [
    "model_config.vision_config="
    + json.dumps(
        {
            "hidden_size": 384,
            "num_hidden_layers": 6,
            "num_attention_heads": 6,
            "intermediate_size": 1536,
            "patch_size": 16,
            "volume_patch_size": [4, 16, 16],
        }
    ),
    "model_config.projection_dim=256",
    "model_config.num_selected_slices=2",
    "model_config.dino_out_dim=4096",
    "model_config.dino_hidden_dim=1024",
    "model_config.dino_bottleneck_dim=256",
    "batch_size=64",
    "max_steps=2000",
    "learning_rate=2.0e-4",
    "mixed_precision=bf16",
    "save_every_steps=500",
    "log_every_steps=50",
]


@dataclass(frozen=True)
class Run:
    name: str
    label: str
    overrides: tuple[str, ...]


FULL = Run("vl_sd_attn", "VL+SD+Attn (UniMedI, joint 2D+3D)", ("ablation=vl+sd+attn",))
RUNS = (
    FULL,
    Run("vl", "VL (joint)", ("ablation=vl",)),
    Run("vl_sd", "VL+SD (joint)", ("ablation=vl+sd",)),
    Run("vl_sd_random_mask", "VL+SD(random-mask) (joint)", ("ablation=vl+sd(random-mask)",)),
    Run("xray_only", "separate 2D model (X-rays only)", ("ablation=vl+sd+attn", "ct_fraction=0")),
    Run("ct_only", "separate 3D model (CTs only)", ("ablation=vl+sd+attn", "ct_fraction=1")),
)
ABLATION_ORDER = ("vl", "vl_sd", "vl_sd_attn")


# --- running ---------------------------------------------------------------------------------------------------------


def prepare_run_dir(run_dir: Path, reuse: bool, overwrite: bool) -> bool:
    """True when the run's trained model can be reused; clears or refuses a folder left by an earlier run."""
    if reuse and (run_dir / "final" / "config.json").is_file():
        return True
    if run_dir.exists():
        if not overwrite:
            hint = "it has no final/ model (unfinished or failed)" if reuse else "pass --reuse to keep its model"
            raise FileExistsError(f"{run_dir} exists from an earlier run: {hint}, or --overwrite to train it again")
        shutil.rmtree(run_dir)
    return False


def train_and_evaluate(run: Run, args) -> dict:
    """Train one run (unless reused) and evaluate its final model; returns the metrics with wall times."""
    run_dir = Path(args.out) / "runs" / run.name
    overrides = [f"train_data={args.data}", f"output_dir={run_dir}", "report_to=none", *run.overrides]
    overrides += GPU_SCALE_OVERRIDES if args.gpu_scale else []
    overrides += args.set
    config = load_config(args.config, overrides)
    train_seconds = None
    if not prepare_run_dir(run_dir, args.reuse, args.overwrite):
        LOGGER.info("=== training %s: %s", run.name, " ".join(overrides))
        started = time.perf_counter()
        train(config)
        train_seconds = round(time.perf_counter() - started, 1)
    metrics = evaluate(run_dir / "final", args.data, args.split, run_dir / "evaluation", args.batch_size)
    return {"label": run.label, "overrides": overrides, "train_seconds": train_seconds, **metrics}


def run_all(runs, args) -> dict[str, dict]:
    """Every run's metrics; a run that fails is recorded with its error (and logged) so the others still report."""
    results = {}
    for run in runs:
        try:
            results[run.name] = train_and_evaluate(run, args)
        except Exception as error:  # reported in the output, and the exit status is 1
            LOGGER.exception("run %s failed", run.name)
            results[run.name] = {"label": run.label, "error": f"{type(error).__name__}: {error}"}
    if all("error" in result for result in results.values()):
        raise RuntimeError(f"every benchmark run failed: {[result['error'] for result in results.values()]}")
    return results


def completed(results: dict[str, dict]) -> dict[str, dict]:
    return {name: result for name, result in results.items() if "error" not in result}


def evaluate_existing(args) -> dict:
    out = Path(args.out) / "evaluation"
    metrics = evaluate(args.evaluate, args.data, args.split, out, args.batch_size)
    return {"label": f"model at {args.evaluate}", "overrides": [], "train_seconds": None, **metrics}


# --- summary ---------------------------------------------------------------------------------------------------------


def main_selection_row(metrics: dict, lesion: str) -> dict | None:
    """The slice-selection row of `lesion` for the model's configured k (the first rule evaluated)."""
    rows = metrics["slice_selection"]["rows"]
    rule = rows[0]["rule"] if rows else None
    return next((row for row in rows if row["lesion"] == lesion and row["rule"] == rule), None)


def _hit_cell(row: dict | None) -> str:
    if row is None:
        return "n/a"
    rates = f"{percent(row['hit_rate'])} vs {percent(row['random_hit_rate'])}"
    return f"{rates} (k={row['k']}, n={row['cts']}, p={row['p_value']:.2f})"


def summary_tables(results: dict[str, dict]) -> list[str]:
    findings = ("nodule", "pleural_effusion", "consolidation", "mean")
    auroc_header = ["run", *(f"X-ray {name}" for name in findings), *(f"CT {name}" for name in findings)]
    auroc_rows = [
        [
            result["label"],
            *(percent(result["zero_shot_auroc"][modality][name]) for modality in (XRAY, CT) for name in findings),
        ]
        for result in results.values()
    ]
    header = [
        "run",
        "nodule slabs hit",
        "any lesion hit",
        "report->X-ray R@1/R@5",
        "report->CT R@1/R@5",
        "X-ray->CT NN",
        "CT->X-ray NN",
        "X-ray/CT/report cosine",
        "train min",
    ]
    return [
        "### Zero-shot AUROC (%), one finding vs rest, positive vs negative prompt ensembles",
        "",
        *table(auroc_header, auroc_rows),
        "",
        "### Slice selection (hit % vs exact random %), retrieval (same-text Recall@1/@5 %), alignment (% vs random)",
        "",
        "Cosine: mean pairwise cosine of the test X-ray, CT and X-ray report embeddings (near 1: collapsed).",
        "",
        *table(header, [_summary_row(result) for result in results.values()]),
    ]


def _summary_row(result: dict) -> list[str]:
    """One run's cells of the second summary table."""
    retrieval = [
        "/".join(percent(result["retrieval"][f"report_to_{modality}"][f"R@{k}"]["same_text"]) for k in (1, 5))
        for modality in (XRAY, CT)
    ]
    alignment = [
        f"{percent(result['alignment'][direction]['rate'])} vs {percent(result['alignment'][direction]['random_rate'])}"
        for direction in ("xray_to_ct", "ct_to_xray")
    ]
    spread = result["embedding_spread"]
    cosines = "/".join(
        f"{value:.3f}" for value in (spread["xray_vision"], spread["ct_vision"], spread["xray_reports"])
    )
    minutes = "not trained here" if result["train_seconds"] is None else f"{result['train_seconds'] / 60:.1f}"
    hits = [_hit_cell(main_selection_row(result, kind)) for kind in ("nodule", ANY_LESION)]
    return [result["label"], *hits, *retrieval, *alignment, cosines, minutes]


def _order_check(results: dict, metric_name: str, value_of) -> str:
    values = {name: value_of(results[name]) for name in ABLATION_ORDER}
    shown = ", ".join(f"{results[name]['label'].split(' ')[0]} {percent(values[name])}" for name in ABLATION_ORDER)
    if any(value is None for value in values.values()):
        return f"Ablation order on {metric_name}: undefined ({shown})."
    ordered = all(values[a] < values[b] for a, b in itertools.pairwise(ABLATION_ORDER))
    verdict = "holds" if ordered else "does NOT hold"
    return f"Ablation order VL < VL+SD < VL+SD+Attn on {metric_name} {verdict}: {shown}."


def _hit_rate(result: dict, lesion: str) -> float | None:
    row = main_selection_row(result, lesion)
    return None if row is None else row["hit_rate"]


def findings(results: dict) -> list[str]:
    """Plain statements: selection vs random (full model), ablation order, joint vs separate models."""
    failures = [f"Run {result['label']} FAILED: {result['error']}" for result in results.values() if "error" in result]
    results = completed(results)
    main = results.get(FULL.name) or next(iter(results.values()))
    statements = failures + list(main["verdicts"])
    if all(name in results for name in ABLATION_ORDER):
        statements += [
            _order_check(results, "X-ray mean AUROC", lambda r: r["zero_shot_auroc"][XRAY]["mean"]),
            _order_check(results, "CT mean AUROC", lambda r: r["zero_shot_auroc"][CT]["mean"]),
            _order_check(results, "the nodule slice hit rate", lambda r: _hit_rate(r, "nodule")),
        ]
    elif failures and any(name in results for name in ABLATION_ORDER[:2]):
        statements.append("The ablation order could not be checked: an ablation run is missing.")
    for separate, modality, name in (("xray_only", XRAY, "X-ray"), ("ct_only", CT, "CT")):
        if separate in results and FULL.name in results:
            joint = results[FULL.name]["zero_shot_auroc"][modality]["mean"]
            alone = results[separate]["zero_shot_auroc"][modality]["mean"]
            if joint is None or alone is None:
                continue
            better = "beats" if joint > alone else "does NOT beat"
            statements.append(
                f"The joint model {better} the separate {name} model on {name} mean AUROC: "
                f"{percent(joint)} vs {percent(alone)}."
            )
    if len(results) > 1:
        counts = main["counts"]
        statements.append(
            f"Test split: {counts[XRAY]} X-rays and {counts[CT]} CTs, so AUROC differences of a few points and hit "
            "rates over ~10 CTs are within noise; read the p-values."
        )
    return statements


def benchmark_markdown(all_results: dict, mode: str, args, total_seconds: float) -> str:
    results = completed(all_results)
    main_name = FULL.name if FULL.name in results else next(iter(results))
    main = results[main_name]
    figures = (
        Path("runs") / main_name / "evaluation" if main_name in {run.name for run in RUNS} else Path("evaluation")
    )
    lines = [
        f"# UniMedI ground-truth benchmark ({mode})",
        "",
        f"**{NOT_CLINICAL}**",
        "",
        (
            f"Data `{args.data}`, split `{args.split}`; settings `{args.config or 'training/configs/demo.yaml'}`"
            f"{' + --gpu-scale' if args.gpu_scale else ''}{' + ' + ' '.join(args.set) if args.set else ''}; "
            f"total wall time {total_seconds / 60:.1f} min on {_device_name()}."
        ),
        "",
        *summary_tables(results),
        "",
        "## Findings",
        "",
        *[f"- {statement}" for statement in findings(all_results)],
        "",
        (
            f"Figures of `{main['label']}`: `{figures / 'tsne.png'}` (t-SNE), `{figures / 'slice_selection.png'}` "
            "(selected vs ground-truth slabs)."
        ),
        "",
        "## Details: " + main["label"],
        "",
        markdown_report(main).split("\n", 1)[1].replace("\n## ", "\n### "),
    ]
    return "\n".join(lines)


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} torch threads)"


# --- command line ----------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=NOT_CLINICAL
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="one training run of the full method, then every measure")
    mode.add_argument("--evaluate", metavar="MODEL_DIR", help="measure this saved model folder without training")
    parser.add_argument("--gpu-scale", action="store_true", help="bigger model and more steps (see the module doc)")
    parser.add_argument(
        "--data", default="data/groundtruth", help="benchmark shards: train split to train, --split to test"
    )
    parser.add_argument("--split", default="test")
    parser.add_argument("--config", default=None, help="pretraining settings file (default: the CPU demo settings)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra pretraining overrides")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--batch-size", type=int, default=16, help="evaluation batch size")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--reuse", action="store_true", help="evaluate runs whose final/ already exists, untrained")
    parser.add_argument("--overwrite", action="store_true", help="delete earlier run folders before training")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(NOT_CLINICAL, flush=True)
    started = time.perf_counter()
    if args.evaluate:
        mode, results = "evaluation of an existing model", {"model": evaluate_existing(args)}
    else:
        runs = RUNS[:1] if args.quick else RUNS
        mode = "quick: one run" if args.quick else "all runs"
        results = run_all(runs, args)
    total = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    markdown = benchmark_markdown(results, mode + (", GPU scale" if args.gpu_scale else ""), args, total)
    summary = {"disclaimer": NOT_CLINICAL, "mode": mode, "argv": sys.argv[1:] if argv is None else list(argv),
               "total_seconds": round(total, 1), "findings": findings(results), "runs": results}  # fmt: skip
    (out / "benchmark.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "benchmark.md").write_text(markdown + "\n")
    print(markdown)
    print(f"\nwrote {out / 'benchmark.md'} and {out / 'benchmark.json'} ({total / 60:.1f} min)")
    if len(completed(results)) < len(results):
        sys.exit(f"{len(results) - len(completed(results))} run(s) failed; see the findings above")
    return summary


if __name__ == "__main__":
    main()
