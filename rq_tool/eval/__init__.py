"""Evaluation: held-out quality, measured LIS, expert bytes, simulated expert parallelism, baselines, reports.

``evaluate(original, rewritten)`` is the library call behind ``rq eval``; ``baseline_results``
builds the same-memory baselines table; ``write_report`` draws ``rq report``'s PNGs.
"""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "BASELINES": ".baselines", "baseline_results": ".baselines", "markdown_table": ".baselines",
    "target_checks": ".baselines",
    "score_original": ".compare", "score_rewritten": ".compare",
    "HeldOut": ".heldout", "load_heldout": ".heldout",
    "write_report": ".report",
    "evaluate": ".run",
})
__all__ = [
    "BASELINES", "HeldOut", "baseline_results", "evaluate", "load_heldout", "markdown_table", "score_original",
    "score_rewritten", "target_checks", "write_report",
]
