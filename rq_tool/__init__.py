"""rq: Replicate-and-Quantize load balancing for Mixture-of-Experts models.

Python API (plain functions, ``rq_tool.api``; each imports its stage when called)::

    profile = rq_tool.calibrate("path/to/moe", "mix")          # -> Profile
    result = rq_tool.rewrite("path/to/moe", profile, "out")     # -> RewriteResult
    model = rq_tool.load("out")                                 # -> transformers CausalLM
    problems = rq_tool.verify("out")                            # -> [] when intact

Legend of tensor shapes, shared by every module's docstring: T tokens, K top-k, M = T*K routed
(token, k) pairs, N rows of loads (calibration sequences, chunks or recorded steps), E logical
experts, P physical slots (``P - E`` redundant ones), L MoE layers, D decoder layers (dense
included), G devices (GPUs), S schemes, H hidden size, I expert intermediate size, B steps
(batches of rows). R is the max replicas of one expert (``log2phy``'s last dim) in the routing
map and kernels, the redundant slots ``P - E`` in export. A module that needs another letter
defines it in its own legend; it never gives one of these letters another meaning
(``tests/cli/test_code_shape.py``).
"""

__version__ = "0.1.0"

# The stage packages are imported first (their __init__s are lazy: nothing heavy runs), so that
# Python's binding of a subpackage to its parent's attribute happens now, once, and the API
# functions below are what ``rq_tool.calibrate`` / ``rq_tool.rewrite`` name from then on.
from . import calibrate, rewrite  # noqa: E402,F401  isort: skip
from .api import calibrate, load, rewrite, verify  # noqa: E402,F811

__all__ = ["calibrate", "load", "rewrite", "verify", "__version__"]
