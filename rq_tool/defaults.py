"""One source of truth for rq's defaults, file-format names and versions.

The CLI reads its defaults from here (never retyped), and every file rq writes carries a
``format`` name and an integer ``version`` from here.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# ---- file formats (name, version) -------------------------------------------------------
PROFILE_FORMAT = ("rq-profile", 2)  # v2: per-sequence loads [N, L, E] in a safetensors file beside it
PROFILE_READABLE = (1,)  # older profile versions that still load
PROFILE_LOADS_SUFFIX = ".loads.safetensors"  # profile.json -> profile.loads.safetensors
ROUTING_MAP_FORMAT = ("rq-routing-map", 2)  # v2: optional device placement, load-aware split
ROUTING_MAP_READABLE = (1,)  # older routing-map versions the runtime still reads
MANIFEST_FORMAT = ("rq-manifest", 2)  # v2: xxh3-128 file hashes (``MANIFEST_HASH``), 4-6x faster than sha256
MANIFEST_READABLE = (1,)  # v1: sha256 file hashes; still verified
MANIFEST_HASH = "xxh3_128"  # the file hash a v2 manifest records (rq_tool.rewrite.shards.new_hash)
RQ_CONFIG_FORMAT = ("rq-config", 1)
REPORT_FORMAT = ("rq-report", 1)  # rq_report.json: the files of an rq report folder
SLOT_FORMAT = ("rq-slots", 1)  # tensor layout of physical slots (see rq_tool/quant/schemes.py)

PROFILE_FILE = "rq_profile.json"
ROUTING_MAP_FILE = "routing_map.json"
MANIFEST_FILE = "rq_manifest.json"
REPORT_FILE = "rq_report.json"
REMOTE_CODE_FILE = "modeling_rq.py"
INDEX_FILE = "model.safetensors.index.json"  # the Hugging Face shard index

# ---- registry names ---------------------------------------------------------------------
# Each registry checks itself against its names here at import, so the CLI offers exactly the
# registered choices without importing the registry (and torch) to print its help.
SCHEME_NAMES = ("fp32", "bf16", "fp16", "int8", "nf4", "fp8")  # rq_tool.quant.SCHEMES
QUANT_SCHEMES = ("int8", "nf4")  # the planner's cheaper options, most precise first
STRATEGIES = ("greedy", "paper", "replicate-only")  # rq_tool.plan.STRATEGIES
EXPORT_ENGINES = ("sglang", "vllm")  # rq_tool.export.ENGINES
# what picks the experts to quantize: measured damage, or load alone (the frequency-only baseline)
IMPORTANCE = ("quant_error", "frequency")
IMPORTANCE_DEFAULT = "quant_error"

# ---- calibration ------------------------------------------------------------------------
DEFAULT_DATASET = "mix"  # a bundled set in calibration_sets/
NUM_SAMPLES = 128  # packed sequences
SEQ_LEN = 256
BATCH_SIZE = 8
SEED = 0
LIS_BATCH_SIZES = (1, 4, 16, 64)
TAG_FIELDS = ("domain", "source")  # JSONL fields naming a document's domain (kept per sequence)  # per-batch LIS is reported for these (sequences per batch)

# ---- rewrite ----------------------------------------------------------------------------
BUDGET = 1.0  # x the original expert bytes of each MoE layer
STRATEGY = "greedy"
SHARD_BYTES = 2 * 1024**3  # max bytes per output safetensors shard
# output bytes queued for the writer/hash threads at most (flat memory: the rewrite blocks, not grows)
WRITE_INFLIGHT_BYTES = 512 * 1024**2
# CPU quantize / dequantize of one matrix (int8 quantize, fp8 dequantize) works through it whole rows at
# a time, about this many values: fp32 temporaries of ~2 MB, reused from the allocator and cache-sized,
# instead of fresh page-faulted whole-matrix ones (measured 3-9x faster on DeepSeek-sized experts)
CHUNK_VALUES = 1 << 19
REWRITE_WORKERS = 2  # threads that dequantize / quantize experts (torch ops release the GIL)
MAX_REPLICAS_PER_EXPERT = 8  # the original counts as one
MAX_SLOTS_FACTOR = 3.0  # P <= 3 E physical slots per layer
MIN_GAIN = 0.005  # a replica must lower predicted LIS by >= 0.5% of its value
SPLIT_POLICY = "round-robin-by-occurrence"  # j-th occurrence of expert e -> replica j mod logcnt[e]
# per step, water-fill each expert's pairs over its replicas' devices (rq_tool.kernels.split); needs a placement
LOAD_AWARE_POLICY = "load-aware"
SPLIT_POLICIES = (SPLIT_POLICY, LOAD_AWARE_POLICY)

# ---- per-step balance planning (rq plan, rq rewrite --ep-size) ---------------------------
SEQS_PER_STEP = 8  # calibration sequences summed into one planned step (when --batch-tokens is not given)
PLAN_BUDGET = 1.125  # rq plan: physical slots per layer = this x E, rounded down to a multiple of --ep-size
MAX_ERROR = 1e-3  # default --max-error with --ep-size: predicted noise <= 0.1% of a layer's expert output power
STEP_COUNTS = (1, 8, 64)  # sequences per step the evaluation reports


# ---- evaluation ---------------------------------------------------------------------------
HELDOUT_SEQ_LEN = 256  # tokens per held-out window
HELDOUT_TOKENS = 64 * HELDOUT_SEQ_LEN  # tokens scored per domain (64 windows, as the bundled model's eval.json)
HELDOUT_BATCH_SIZE = BATCH_SIZE  # windows per forward; per-batch LIS is measured on batches of this size
DEVICE_COUNTS = (2, 4, 8)  # simulated expert-parallel device counts
LASER_EPS_HIGH = 0.3  # LASER baseline thresholds (rq_tool.eval.laser.LaserConfig)
LASER_T_FIX = 0.3


def default_model_path() -> Path:
    """The bundled tiny trained MoE (the embedded default model)."""
    return Path(str(resources.files("rq_tool") / "assets" / "tiny_moe"))


def calibration_sets_dir() -> Path:
    """Where the bundled calibration sets live (the repo's calibration_sets/, packaged)."""
    return Path(str(resources.files("rq_tool.calibration_sets")))


# ---- export (serving engines) -----------------------------------------------------------
EXPORT_FORMAT = ("rq-export", 1)  # the --json report of rq export (engine files keep the engine's own layout)
EXPORT_TARGET_MAX_MEAN = 1.10  # default --redundant: smallest R reaching this predicted per-GPU max/mean
EXPORT_SGLANG_FILE = "sglang_expert_location.json"
EXPORT_QCONFIG_FILE = "quantization_config.json"
VLLM_EPLB_WINDOW_SIZE = 1000  # steps of load history vLLM's EPLB balances on
VLLM_EPLB_STEP_INTERVAL = 3000  # steps between vLLM's EPLB rearrangements
