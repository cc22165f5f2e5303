"""What a checkpoint's retrieval and index settings may be: their defaults, ranges and checks, declared once.

This file travels with saved checkpoints as remote code and imports nothing but the standard library, so the config,
the knowledge base, the command-line arguments and the torch-free ONNX runtime all check a setting the same way. A
checkpoint's config is untrusted input: a setting out of range is refused here, before it reaches FAISS (which
asserts, aborts or crashes the process on some) or sizes a buffer.
"""

import math
import numbers
from dataclasses import dataclass

# What the per-query mixing weight β(x) reads, in this order (`modeling_reaugkd.retrieval_gate_features`); the gate
# holds one weight per feature, then a bias.
RETRIEVAL_GATE_FEATURES = ("top_similarity", "retrieved_confidence", "retrieved_entropy", "student_entropy")
# Cosine similarities carry ~1e-7 of fp32 rounding: below this τ_r the neighbour weights are an argmax decided by that
# noise (and a τ_r that rounds to 0 in fp32 would divide by zero).
MIN_RETRIEVAL_TEMPERATURE = 1e-6
# The gate's |w| and |b|: σ saturates at |logit| ≈ 17 in fp32, so no fitted gate needs more, and within it w · features
# (features in [-1, 1]) stays finite in fp32, where 1e300 becomes inf and inf · 0 is NaN.
MAX_GATE_PARAMETER = 1e6
# A `retrieval_weight` below 0 means the gate's per-query β(x): what `mix_retrieval` is given when the gate applies, and
# the default β of an exported graph that serves one (any β in [0, 1] given at run time replaces it).
GATE_SENTINEL = -1.0

# The most classes a config may declare. transformers builds a label map of `num_labels` entries before anything else
# (3.3 GB and 93 s for 3M), so a crafted config could size that allocation; a knowledge base stores N × num_labels soft
# labels, so even 10,000 rows of 100,000 classes are 4 GB: no task this method serves declares more.
MAX_NUM_LABELS = 100_000
# The longest text (in characters) a pipeline reads or `kb add` stores. The student reads at most its
# max_position_embeddings tokens (512 for BERT-like encoders), and WordPiece / BPE tokens are a few characters (a word
# over 100 is one unknown token), so a text is cut here, before tokenizing, long after the tokens the model reads:
# a 1 GB cell would otherwise be tokenized whole (6 GB) and stored verbatim.
MAX_TEXT_CHARS = 100_000

# A local folder whose files disagree is read this many times before that is an error: an edit replaces the folder
# whole, so a load that straddles one reads a consistent folder the next time.
LOAD_ATTEMPTS = 3

# The task types, as transformers names them (`PretrainedConfig.problem_type`). They decide what a knowledge-base value
# is and how it is mixed: a class distribution (softmax), one probability per label (sigmoid), or the teacher's number.
SINGLE_LABEL = "single_label_classification"
MULTI_LABEL = "multi_label_classification"
REGRESSION = "regression"
PROBLEM_TYPES = (SINGLE_LABEL, MULTI_LABEL, REGRESSION)

INDEX_TYPES = ("torch", "flat", "hnsw", "ivf")
TRAINED_INDEX_TYPES = ("hnsw", "ivf")  # stored serialized; exact indexes are rebuilt from the keys
SEARCH_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")


@dataclass(frozen=True)
class IndexSetting:
    """One search setting: its default, what it does (the config's docs and the CLI's help), and for integers the
    accepted range. The upper bounds are far above any useful value and keep a crafted config from sizing the graph,
    the clusters or a search block out of memory."""

    default: int | str
    help: str
    low: int | None = None
    high: int | None = None


# The torch search's memory is at most search_query_block_size × search_block_size × 4 bytes (256 MiB at the defaults),
# whatever the number of keys and queries.
INDEX_SETTINGS = {
    "search_block_size": IndexSetting(65536, "Keys per block of the exact search.", 1, 2**24),
    "search_query_block_size": IndexSetting(1024, "Queries per block of the exact search.", 1, 2**20),
    "search_dtype": IndexSetting(
        "auto",
        "Exact-scan precision, re-scored in fp32: 'auto' (fp16 on CUDA, int8 or bf16 on CPUs with bf16 matmul, "
        "else fp32) or a dtype.",
    ),
    "hnsw_m": IndexSetting(32, "HNSW graph degree (--index_type hnsw).", 2, 256),
    "hnsw_ef_construction": IndexSetting(80, "HNSW build breadth.", 1, 2**16),
    # recall@16 >= 0.95 from 10k to 1M keys at 128 (benchmarks/kb_scaling.py)
    "hnsw_ef_search": IndexSetting(128, "HNSW search breadth: higher finds more true neighbours, slower.", 1, 2**16),
    "ivf_nlist": IndexSetting(0, "IVF clusters (0: about 4·√N for N keys).", 0, 2**20),
    "ivf_nprobe": IndexSetting(32, "IVF clusters visited per query.", 1, 2**20),
}
DEFAULT_INDEX_PARAMS = {name: setting.default for name, setting in INDEX_SETTINGS.items()}


def check_positive_integer(name: str, value) -> None:
    """Refuse anything but an integer >= 1 (`True`, `1.5`, `"3"` included) with one message for every count setting."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_retrieval_temperature(value) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not MIN_RETRIEVAL_TEMPERATURE <= value < math.inf
    ):
        raise ValueError(
            f"retrieval_temperature (τ_r) must be a finite number >= {MIN_RETRIEVAL_TEMPERATURE:g}, got {value!r}"
        )


def check_retrieval_weight(value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"retrieval_weight (β) must be a number in [0, 1], got {value!r}")


def check_retrieval_gate(gate) -> None:
    size = len(RETRIEVAL_GATE_FEATURES) + 1
    if (
        not isinstance(gate, list | tuple)
        or len(gate) != size
        or not all(isinstance(v, numbers.Real) and abs(v) <= MAX_GATE_PARAMETER for v in gate)  # NaN fails too
    ):
        raise ValueError(
            f"retrieval_gate must be {size} numbers (a weight per feature of {RETRIEVAL_GATE_FEATURES}, then a bias), "
            f"each within ±{MAX_GATE_PARAMETER:g}, got {gate!r}"
        )


def problem_type_of(config) -> str:
    """A config's task type; configs saved before regression and multi-label support have none: single-label."""
    return getattr(config, "problem_type", None) or SINGLE_LABEL


def check_problem_type(problem_type: str) -> None:
    if problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type must be one of {list(PROBLEM_TYPES)}, got {problem_type!r}")


def check_index_type(index_type: str) -> None:
    if index_type not in INDEX_TYPES:
        raise ValueError(f"Unknown index_type {index_type!r}: expected one of {INDEX_TYPES}.")


def check_search_dtype(search_dtype: str) -> None:
    if search_dtype not in SEARCH_DTYPES:
        raise ValueError(f"search_dtype must be one of {SEARCH_DTYPES}, got {search_dtype!r}")


def check_index_params(params: dict[str, int | str]) -> None:
    """Refuse unknown or out-of-range index settings (`hnsw_m` 1 segfaults FAISS, `ivf_nprobe` 0 fails at search)."""
    unknown = set(params) - set(INDEX_SETTINGS)
    if unknown:
        raise TypeError(f"Unknown index parameters {sorted(unknown)}; expected some of {list(INDEX_SETTINGS)}.")
    for name, value in params.items():
        setting = INDEX_SETTINGS[name]
        if setting.low is None:
            check_search_dtype(value)
        elif (
            not isinstance(value, numbers.Integral)
            or isinstance(value, bool)
            or not setting.low <= value <= setting.high
        ):
            raise ValueError(f"{name} must be an integer in [{setting.low}, {setting.high}], got {value!r}")


def check_num_labels(num_labels) -> None:
    """Refuse a class count that is not an integer in [1, MAX_NUM_LABELS], before anything is sized from it."""
    if (
        isinstance(num_labels, bool)
        or not isinstance(num_labels, numbers.Integral)
        or not 1 <= num_labels <= MAX_NUM_LABELS
    ):
        raise ValueError(f"num_labels must be an integer from 1 to {MAX_NUM_LABELS:,}, got {num_labels!r}")


def check_top_k(top_k) -> None:
    """The pipelines' `top_k`: an integer >= 1 (that many labels, best first) or None (every label)."""
    if top_k is not None:
        check_positive_integer("top_k", top_k)


def cut_to_max_chars(inputs):
    """A text, or the texts of a `{"text", "text_pair"}` dict or a list, cut to `MAX_TEXT_CHARS` characters: what both
    runtimes do before tokenizing."""
    if isinstance(inputs, str):
        return inputs[:MAX_TEXT_CHARS]
    if isinstance(inputs, dict):
        return {key: cut_to_max_chars(value) for key, value in inputs.items()}
    if isinstance(inputs, list | tuple):
        return type(inputs)(cut_to_max_chars(value) for value in inputs)
    return inputs
