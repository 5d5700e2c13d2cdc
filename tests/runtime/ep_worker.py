"""torchrun worker for the expert-parallel tests (tests/runtime/test_ep.py): one rank of a gloo group.

    python -m torch.distributed.run --nproc-per-node G tests/runtime/ep_worker.py OUT CASE [CASE ...]

CASE is ``PLACED_DIR=REFERENCE_DIR``: the placed rewritten model runs expert-parallel (the first
case through ``AutoModelForCausalLM.from_pretrained(..., distributed_config=...)``, the others
through ``rq_tool.load(..., ep_size=G)``), on two steps of 8 sequences (this rank: its 8/G); the
reference (an original model, or an rq model) runs in one process on the whole steps. Every rank
writes ``OUT.rank{r}.json``: max |logit difference|, the logits' scale, its counters and expert
bytes; rank 0 adds the simulator's per-step prediction from a single-process run of the placed
model (``rq_tool.eval.ep_steps``).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist


def _load_reference(path):
    import rq_tool
    from transformers import AutoModelForCausalLM

    with open(os.path.join(path, "config.json")) as f:
        if "rq" in json.load(f):
            return rq_tool.load(path, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _predict(path, steps, G):
    """``[L][B][G]`` predicted pairs per device, from a single-process run of the placed model."""
    import rq_tool
    from rq_tool.eval.ep_steps import predicted_step_loads

    return predicted_step_loads(rq_tool.load(path, dtype=torch.float32), torch.stack(steps), G).tolist()


def main(out: str, cases: list[str]) -> None:
    import rq_tool
    from rq_tool.runtime.ep import ep_counters, local_expert_bytes
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    torch.set_num_threads(1)
    G = int(os.environ["WORLD_SIZE"])
    results = []
    for i, case in enumerate(cases):
        placed, reference = case.split("=")
        if i == 0:
            model = AutoModelForCausalLM.from_pretrained(placed, trust_remote_code=True, dtype=torch.float32,
                                                         distributed_config=DistributedConfig(ep_size=G, fsdp_size=G))
        else:
            model = rq_tool.load(placed, dtype=torch.float32, ep_size=G)
        rank = dist.get_rank()
        vocab = model.config.vocab_size
        steps = [torch.randint(1, vocab, (8, 16), generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
        per = 8 // G
        ref = _load_reference(reference)
        diff = scale = 0.0
        for ids in steps:
            with torch.no_grad():
                mine = model(ids[rank * per:(rank + 1) * per]).logits
                want = ref(ids).logits[rank * per:(rank + 1) * per]
            diff = max(diff, float((mine - want).abs().max()))
            scale = max(scale, float(want.abs().max()))
        row = {"placed": placed, "max_abs_diff": diff, "scale": scale, "expert_bytes": local_expert_bytes(model),
               "pairs": {str(k): [s["pairs"] for s in v] for k, v in ep_counters(model).items()}}
        if rank == 0:
            row["predicted"] = _predict(placed, steps, G)
        results.append(row)
    with open(f"{out}.rank{dist.get_rank()}.json", "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
