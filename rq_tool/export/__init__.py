"""``rq export``: rq's measurements in the formats real serving engines read.

README
------
Serving engines (SGLang, vLLM) run the ORIGINAL checkpoint with expert parallelism; they cannot
load rq's rewritten directory (per-expert replicas and per-expert schemes). What carries over is
what rq measured and planned:

- a placement (``location``, ``engines``): how many redundant slots R per MoE layer, which
  experts they replicate and which GPU holds each slot, planned from the profile's loads with
  ``rq_tool.plan.placement`` -- the same code the simulator (``rq_tool.eval.ep``) scores, so the
  predicted per-GPU max/mean rq prints is the simulator's number. SGLang loads it as
  ``--init-expert-location`` (``physical_to_logical_map [num_hidden_layers, E + R]``, absolute
  layer ids, dense layers filled with the engine's identity + round-robin default) or takes the
  raw counts (``logical_count [num_hidden_layers, E]``) and plans itself. vLLM cannot load a
  placement yet: rq gives the ``--eplb-config`` with its recommended R, and vLLM learns the
  load online from identity + round-robin redundancy.
- a per-layer precision (``precision``): engines run ONE quantization scheme per MoE layer
  (mixed across layers is fine), so rq chooses which layers' experts to quantize within a
  memory budget at the lowest predicted error and writes a compressed-tensors
  ``quantization_config`` the engines accept (per-expert projections targeted by the
  checkpoint's own names, every other Linear ignored, top-level format = the groups' format). Out of scope: writing the
  re-quantized checkpoint itself -- quantize with those ``config_groups`` (e.g. llm-compressor)
  and put the dict in the checkpoint's config.json.

Pure functions (``location``, ``engines``, ``precision``) take tensors and return tensors or
dicts; ``source`` does the reading and the atomic writing; ``cli`` is the click command.
When to use which output: ``USAGE.md`` beside this file.
"""

from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "ENGINES": ".engines", "EngineExport": ".engines", "PlacementPlan": ".engines", "get_engine": ".engines",
    "plan_placement": ".engines",
    "balanced_phy2log": ".location", "check_redundant": ".location", "engine_default_phy2log": ".location",
    "gpu_max_mean": ".location", "logical_count_map": ".location", "physical_to_logical_map": ".location",
    "recommend_redundant": ".location", "valid_redundant": ".location",
    "ENGINE_WEIGHT_SCHEMES": ".precision", "choose_layer_precision": ".precision",
    "compressed_tensors_config": ".precision", "expert_target": ".precision", "plan_layer_precision": ".precision",
    "precision_summary": ".precision", "ServingNames": ".precision", "ignore_patterns": ".precision",
    "EPLB_SUPPORT": ".engines", "eplb_warning": ".engines",
    "ExportSource": ".source", "read_source": ".source",
})
__all__ = [
    "ENGINES", "ENGINE_WEIGHT_SCHEMES", "EPLB_SUPPORT", "EngineExport", "ServingNames", "eplb_warning",
    "ignore_patterns", "ExportSource", "PlacementPlan", "balanced_phy2log",
    "check_redundant", "choose_layer_precision", "compressed_tensors_config", "engine_default_phy2log",
    "expert_target", "get_engine", "gpu_max_mean", "logical_count_map", "physical_to_logical_map",
    "plan_layer_precision", "plan_placement", "precision_summary", "read_source", "recommend_redundant",
    "valid_redundant",
]
