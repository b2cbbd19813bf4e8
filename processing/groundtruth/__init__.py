"""The ground-truth benchmark: chest X-rays, CTs and reports with KNOWN synthetic findings in one real anatomy.

A benchmark, not a dataset reader (those are ``processing``'s other modules): ``generator`` builds the cases and writes
the shards, ``lesions`` inserts the findings, ``drr`` projects X-rays, ``reports`` writes and parses the reports.
``python -m processing.groundtruth --out data/groundtruth`` generates the default data.
"""

from .generator import DISCLAIMER, GroundTruthConfig, generate

__all__ = ["DISCLAIMER", "GroundTruthConfig", "generate"]
