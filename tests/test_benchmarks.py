"""Every speed benchmark in benchmarks/ runs end to end in its short ``--smoke`` mode.

Benchmarks are part of the product: a change that breaks one (an API move, a changed normalisation that makes a
comparison disagree) must fail here, not at the next person's measurement. The smoke modes check the same agreements
as the full runs and print the same tables; their timings mean nothing.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# benchmark script -> a line its smoke output must contain (the table it exists to print)
SMOKE_RUNS = {
    "ct_preprocess.py": "| MONAI, same operations (no Spacing) |",
    "data_throughput.py": "| CT |",
    "demo_step_profile.py": "step time with the text cache / without",
    "gpu_pretrain.py": "UniMedI / naive samples/s, checkpointing on",
    "native_slices.py": "| diameter | nodule slabs | median CNR central | median CNR mean |",
    "embed_throughput.py": "UniMedI 2D / timm ratio",
    "prepare_throughput.py": "| CT-RATE (512 x 512 x 133",
    "pretrain_step.py": "| smoke |",
}


def run_smoke(script: str) -> str:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,  # catches a hang; a loaded CI machine can take minutes
        check=False,
    )
    assert done.returncode == 0, f"{script} --smoke failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.parametrize("script", sorted(SMOKE_RUNS))
def test_benchmark_smoke_mode_runs(script):
    assert SMOKE_RUNS[script] in run_smoke(script)
