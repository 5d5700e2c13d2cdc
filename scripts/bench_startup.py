"""Start-up cost of rq's entry points: ``rq --help``, ``rq rewrite --dry-run``, and the imports
transformers runs for a rewritten model (``rq_tool.runtime.routing_map``, ``rq_tool.runtime.hf``).

Each case runs in a fresh interpreter, alternating between the trees compared, medians of
``--repeats`` runs. A tree is a source checkout (``git archive REV | tar -x -C DIR``; its
``kernels/`` and ``calibration_sets/`` are linked into ``rq_tool/`` so it imports as installed);
with no ``--tree`` the installed rq_tool is timed alone.

    OMP_NUM_THREADS=1 python scripts/bench_startup.py --profile profile.json \\
        --tree before=/tmp/rq_main --tree after=.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cases(profile: str | None) -> dict[str, str]:
    out = {"get_family (meta model)": ("from rq_tool.arch import get_family; "
                                       "from rq_tool.source import read_config_dict, resolve_model_path; "
                                       "get_family(read_config_dict(resolve_model_path(None)))"),
           "rq --help": "import sys; sys.argv = ['rq', '--help']; from rq_tool.cli import main; main()",
           "import rq_tool.runtime.routing_map": "import rq_tool.runtime.routing_map",
           "import rq_tool.runtime.hf": "import rq_tool.runtime.hf",
           # floors of the dry-run: what planning cannot avoid (torch) and what the profile's config
           # fingerprint needs (transformers' config class, no modeling code)
           "floor: import torch": "import torch",
           "floor: torch + AutoConfig": ("import torch; from rq_tool.source import resolve_model_path; "
                                         "from transformers import AutoConfig; "
                                         "AutoConfig.from_pretrained(resolve_model_path(None))")}
    if profile:
        out["rq rewrite --dry-run"] = (f"import sys; sys.argv = ['rq', 'rewrite', '--profile', {profile!r}, '--dry-run']; "
                                       "from rq_tool.cli import main; main()")
    return out


def prepare(tree: Path, scratch: Path) -> Path:
    """A directory to put on PYTHONPATH so that ``rq_tool`` (and ``rq_tool.kernels``) come from ``tree``."""
    root = scratch / tree.name
    (root / "rq_tool").mkdir(parents=True)
    for p in (tree / "rq_tool").iterdir():
        (root / "rq_tool" / p.name).symlink_to(p.resolve())
    for name in ("kernels", "calibration_sets"):
        if not (root / "rq_tool" / name).exists():
            (root / "rq_tool" / name).symlink_to((tree / name).resolve())
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=DIR", help="a source tree to time")
    ap.add_argument("--profile", default=None, help="a profile of the bundled model (adds the dry-run case)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rq-startup-") as scratch:
        trees = {"installed": None}
        if args.tree:
            trees = {}
            for spec in args.tree:
                name, _, path = spec.partition("=")
                (Path(scratch) / name).mkdir()
                trees[name] = prepare(Path(path), Path(scratch) / name)
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeats):
            for case, code in cases(args.profile).items():
                for name, path in trees.items():
                    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
                    if path is not None:
                        env["PYTHONPATH"] = str(path)
                    t0 = time.perf_counter()
                    r = subprocess.run([sys.executable, "-c", code], cwd=scratch, env=env, capture_output=True,
                                       text=True)
                    dt = time.perf_counter() - t0
                    if r.returncode != 0:
                        sys.exit(f"{case} ({name}) failed:\n{r.stderr[-2000:]}")
                    times.setdefault((case, name), []).append(dt)
    names = list(trees)
    print(f"median (min-max) of {args.repeats} runs, fresh interpreter each (load average {os.getloadavg()[0]:.1f})")
    print(f"| case | {' | '.join(names)} |" + (f" {names[-1]} / {names[0]} |" if len(names) > 1 else ""))
    print("|---|" + "---|" * (len(names) + (len(names) > 1)))
    for case in cases(args.profile):
        med = [statistics.median(times[(case, n)]) for n in names]
        ratio = f" {med[-1] / med[0]:.2f}x |" if len(names) > 1 else ""
        spread = ["{:.2f}-{:.2f}".format(min(times[(case, n)]), max(times[(case, n)])) for n in names]
        print(f"| {case} | " + " | ".join(f"{m:.2f} s ({r})" for m, r in zip(med, spread)) + " |" + ratio)


if __name__ == "__main__":
    main()
