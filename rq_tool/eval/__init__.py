"""Evaluation: held-out quality, measured LIS, expert bytes, simulated expert parallelism, baselines, reports.

``evaluate(original, rewritten)`` is the library call behind ``rq eval``; ``baseline_results``
builds the same-memory baselines table; ``write_report`` draws ``rq report``'s PNGs.
"""

from .baselines import BASELINES, baseline_results, markdown_table, target_checks
from .compare import compare, score_original, score_rewritten
from .heldout import HeldOut, load_heldout
from .report import write_report
from .run import evaluate

__all__ = ["BASELINES", "HeldOut", "baseline_results", "compare", "evaluate", "load_heldout", "markdown_table",
           "score_original", "score_rewritten", "target_checks", "write_report"]
