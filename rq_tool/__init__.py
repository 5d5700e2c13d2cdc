"""rq: Replicate-and-Quantize load balancing for Mixture-of-Experts models.

Python API (each wraps the stage the CLI runs)::

    profile = rq_tool.calibrate("path/to/moe", "mix")          # -> Profile
    result = rq_tool.rewrite("path/to/moe", profile, "out")     # -> RewriteResult
    model = rq_tool.load("out")                                 # -> transformers CausalLM
"""

__version__ = "0.1.0"

__all__ = ["calibrate", "load", "rewrite", "verify", "__version__"]


def __getattr__(name):  # lazy: `import rq_tool` stays cheap
    if name in ("calibrate", "rewrite"):
        import importlib

        return importlib.import_module(f".{name}", __name__)  # a callable package (see _callable.py)
    if name == "verify":
        from .rewrite import verify

        return verify
    if name == "load":
        from .runtime import load

        return load
    raise AttributeError(f"module 'rq_tool' has no attribute {name!r}")
