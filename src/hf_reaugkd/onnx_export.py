"""`hf-reaugkd export`: the student and its knowledge base as one ONNX graph, for serving without PyTorch.

One graph does the whole prediction, `(B, T)` token ids → encoder → pooling → projection → exact scan of the
knowledge base's keys (stored in the graph) → neighbour vote → mixing, with the model file's own functions
(`neighbor_label_distribution`, `mix_retrieval`): the exported arithmetic is the served arithmetic.

- **Every index type gets the exact scan.** An HNSW or IVF index is a FAISS structure whose search is a data-dependent
  walk, which a traced graph would replay with the export-time neighbours; the exact scan finds the same or better
  neighbours and its cost is measured in `benchmarks/deploy.py` (also at 1M keys).
- **int8** (`quantize="int8"`): every MatMul with a constant weight in int8 with one scale per weight column and
  one per activation row (`onnx_quantization.py`), so a text's answer does not depend on the texts batched with it,
  the scan included (int8 keys with one scale each, each query with its own), and the scan's best `k + max(k, 16)`
  candidates re-scored from the fp32 keys kept in the graph, as the torch search does: similarities stay exact, and a
  true neighbour is lost only if 16 others outscore it by less than the int8 rounding error. The fp32 graph scans in
  fp32 and needs no re-scoring.
- **Runtime inputs** besides the tokenizer's tensors: `knn_k` (int64, 1 to the export's `max_knn_k`) and
  `retrieval_weight` (float); both default to the config's values (graph initializers ONNX Runtime lets a caller
  override). With a per-query gate in the config, the default β is `GATE_SENTINEL` (-1): any β in [0, 1] replaces it.
  Neighbour columns past `knn_k` hold id -1 (weight 0).
- **Nothing stale**: `onnx/export.json` records the export's settings, each graph file's SHA-256 and the hash of what
  the graphs serve from the folder (`onnx_pipeline.read_served_folder`), which the runtime compares; `kb add` /
  `kb remove` / `kb retune` export again with the recorded settings.
"""

import contextlib
import json
import logging
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .caching import atomic_path, hash_files
from .errors import InputError
from .exact_search import RESCORE_EXTRA
from .loading_reaugkd import non_finite_tensors
from .modeling_reaugkd import (
    ReAugKDForSequenceClassification,
    mix_retrieval,
    mixture_logits,
    neighbor_label_distribution,
)
from .onnx_pipeline import (
    DEFAULT_MAX_KNN_K,
    EXPORT_FILE,
    ONNX_DIR,
    ONNX_FILE,
    OUTPUT_NAMES,
    QUANTIZED_ONNX_FILE,
    read_served_folder,
)
from .onnx_quantization import quantize_per_row
from .settings_reaugkd import GATE_SENTINEL, SINGLE_LABEL, problem_type_of

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "int8")
MAX_GRAPH_BYTES = 3 * 2**29  # 1.5 GiB of knowledge base, under protobuf's 2 GiB with the encoder beside it
# Similarities closer than this are a tie: fp32 rounding of a dot product of unit vectors is ~1e-7 per term.
TIE_TOLERANCE = 1e-5
# The example batch traced: neither 0 nor 1 (which the exporter would specialize), unlike any other dimension.
EXAMPLE_BATCH, EXAMPLE_LENGTH = 3, 7


class ServingGraph(nn.Module):
    """What the exported graph computes, written with the model's own retrieval and mixing functions.

    Args:
        model (`ReAugKDForSequenceClassification`): the student with its knowledge base, in eval mode.
        max_knn_k (`int`): the largest `knn_k` a caller may ask for (the neighbour outputs' width).
        rescore_candidates (`int`, *optional*): scan candidates re-scored from the fp32 keys (for a quantized scan);
            `None` ranks by the scan's own fp32 scores.
    """

    def __init__(self, model: ReAugKDForSequenceClassification, max_knn_k: int, rescore_candidates: int | None = None):
        super().__init__()
        self.student = model
        knowledge_base = model.knowledge_base
        self.max_knn_k = min(max_knn_k, knowledge_base.size)
        self.candidates = None if rescore_candidates is None else min(rescore_candidates, knowledge_base.size)
        self.retrieval_temperature = float(model.config.retrieval_temperature)
        self.gate = model.config.retrieval_gate
        # (d, N): the scan's right-hand side, a MatMul weight that int8 quantization turns into int8 keys
        self.register_buffer("scan_keys", knowledge_base.keys.T.contiguous().clone(), persistent=False)
        self.register_buffer("keys", knowledge_base.keys.clone(), persistent=False)  # (N, d) fp32: re-scoring
        self.register_buffer("soft_labels", knowledge_base.values.float().clone(), persistent=False)  # (N, C)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        knn_k: torch.Tensor,
        retrieval_weight: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        base = self.student.reaugkd
        encoder_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            encoder_inputs["token_type_ids"] = token_type_ids
        hidden_states = base.encoder(**encoder_inputs).last_hidden_state  # (B, T, H)
        sentence_embedding = base.pool(hidden_states, attention_mask)  # (B, H)
        query = nn.functional.normalize(base.projection(sentence_embedding), dim=-1)  # (B, d)
        student_probs = torch.softmax(self.student.classifier(sentence_embedding).float(), dim=-1)  # (B, C)

        scores = query @ self.scan_keys  # (B, N)
        if self.candidates is None:
            similarities, ids = scores.topk(self.max_knn_k, dim=1)  # (B, K)
        else:
            _, candidates = scores.topk(self.candidates, dim=1)  # (B, c)
            exact = (self.keys[candidates] * query.unsqueeze(1)).sum(-1)  # (B, c, d) -> (B, c): fp32 similarities
            similarities, order = exact.topk(self.max_knn_k, dim=1)  # (B, K)
            ids = candidates.gather(1, order)  # (B, K)
        knn_k = knn_k.clamp(1, self.max_knn_k)
        beyond_k = torch.arange(self.max_knn_k, device=ids.device).unsqueeze(0) >= knn_k  # (1, K)
        ids = ids.masked_fill(beyond_k, -1)  # (B, K): "no hit" past k, which the vote weighs 0
        similarities = similarities.masked_fill(beyond_k, float("-inf"))  # (B, K)
        retrieved_probs, weights = neighbor_label_distribution(
            similarities, ids, self.soft_labels, self.retrieval_temperature
        )  # (B, C), (B, K)
        beta = retrieval_weight.clamp(max=1.0).reshape(1, 1)  # (1, 1): below 0, the gate's β(x) when there is one
        mixed = mix_retrieval(student_probs, retrieved_probs, similarities[:, 0], beta, self.gate)  # (B, C)
        logits = mixture_logits(mixed, SINGLE_LABEL)  # (B, C): log p, as the PyTorch model's logits
        return logits, mixed, student_probs, retrieved_probs, ids, similarities, weights, query


def export_onnx(
    model: ReAugKDForSequenceClassification,
    tokenizer,
    model_dir: str | Path,
    quantize: str = "none",
    opset: int | None = None,
    max_knn_k: int = DEFAULT_MAX_KNN_K,
) -> list[Path]:
    """Write `onnx/model.onnx` (and with `quantize="int8"` `onnx/model_quantized.onnx`) into `model_dir`, the saved
    folder of `model` (whose knowledge base hash the graphs record). The `onnx/` folder is replaced whole, only once
    every graph is written: a failed export leaves the previous one as it was. Returns the written paths."""
    onnx = _import_exporter()
    if quantize not in QUANTIZATIONS:
        raise InputError(f"--quantize takes one of {QUANTIZATIONS}, got {quantize!r}")
    if not isinstance(max_knn_k, int) or max_knn_k < 1:
        raise InputError(f"--max_knn_k must be an integer >= 1, got {max_knn_k!r}")
    if model.config.kb_size == 0:
        raise InputError(f"{model_dir} has no knowledge base: there is nothing to retrieve from in the graph.")
    if problem_type_of(model.config) != SINGLE_LABEL:
        raise InputError(
            f"The ONNX graph serves single-label classifiers; {model_dir} is a {model.config.problem_type} model. "
            "Serve it with transformers' pipeline (trust_remote_code=True)."
        )
    non_finite = non_finite_tensors(model)
    if non_finite:
        raise InputError(
            f"The model to export holds NaN or infinite weights ({', '.join(non_finite[:5])}): it would answer NaN. "
            "Export a model whose training did not diverge."
        )
    model_dir = Path(model_dir)
    graph_bytes = model.config.kb_size * model.config.kb_dim * 5  # fp32 keys + their int8 copy, per graph at most
    if graph_bytes > MAX_GRAPH_BYTES:
        raise InputError(
            f"A knowledge base of {model.config.kb_size:,} keys of dim {model.config.kb_dim} needs "
            f"{graph_bytes / 2**30:.1f} GiB inside the graph, over ONNX's 2 GiB single-file limit: export a smaller "
            "knowledge base (kb remove) or a smaller --kb_dim."
        )
    model = model.eval().float()
    max_knn_k = max(max_knn_k, model.config.knn_k)
    settings = {"quantize": quantize, "opset": opset, "max_knn_k": max_knn_k}
    served_sha256 = read_served_folder(model_dir).sha256
    defaults = {
        "knn_k": torch.tensor(min(model.config.knn_k, max_knn_k), dtype=torch.int64),
        "retrieval_weight": torch.tensor(
            GATE_SENTINEL if model.config.retrieval_gate is not None else model.config.retrieval_weight,
            dtype=torch.float32,
        ),
    }
    with atomic_path(model_dir / ONNX_DIR, directory=True) as out, tempfile.TemporaryDirectory() as scratch:
        written = [out / ONNX_FILE]
        _export_graph(ServingGraph(model, max_knn_k), tokenizer, written[0], defaults, opset, onnx)
        if quantize == "int8":
            candidates = max_knn_k + max(max_knn_k, RESCORE_EXTRA[torch.int8])  # as the torch int8 scan
            fp32 = Path(scratch) / "rescoring.onnx"
            _export_graph(ServingGraph(model, max_knn_k, candidates), tokenizer, fp32, defaults, opset, onnx)
            written.append(out / QUANTIZED_ONNX_FILE)
            quantized = onnx.load(fp32)
            quantize_per_row(quantized, onnx)
            onnx.save(quantized, written[1])
        graphs = {path.name: hash_files([path]) for path in written}
        record = {"settings": settings, "served_sha256": served_sha256, "graphs": graphs}
        (out / EXPORT_FILE).write_text(json.dumps(record, indent=2))
    return [model_dir / ONNX_DIR / path.name for path in written]


def _export_graph(graph: ServingGraph, tokenizer, path: Path, defaults: dict, opset, onnx) -> None:
    """Trace `graph` with dynamic batch and length, make `knn_k` / `retrieval_weight` overridable defaults, and check
    that the file runs in ONNX Runtime as the module does on a batch other than the traced one."""
    names = [name for name in tokenizer.model_input_names if name in ("input_ids", "attention_mask", "token_type_ids")]
    example = tokenizer(
        ["hello world"] * EXAMPLE_BATCH, padding="max_length", max_length=EXAMPLE_LENGTH, return_tensors="pt"
    )
    kwargs = {name: example[name] for name in names}
    kwargs.update(defaults)
    batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic_shapes = {name: ({0: batch, 1: length} if name in names else None) for name in kwargs}
    try:
        with _quiet():
            program = torch.onnx.export(
                graph,
                (),
                kwargs=kwargs,
                input_names=list(kwargs),
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                dynamo=True,
                verbose=False,
                report=False,
            )
    except Exception as err:  # the exporter's own errors are pages long: name the encoder and the first line
        encoder = type(graph.student.reaugkd.encoder).__name__
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"The ONNX exporter could not trace the {encoder} encoder: {first_line}") from err
    program.save(str(path))
    model = onnx.load(str(path))
    for name, value in defaults.items():  # an initializer named like an input is that input's default
        model.graph.initializer.append(onnx.numpy_helper.from_array(value.numpy(), name))
    onnx.save(model, str(path))
    _check_against_torch(graph, tokenizer, path, names)


def _check_against_torch(graph: ServingGraph, tokenizer, path: Path, names: list[str]) -> None:
    """Run the written graph in ONNX Runtime on a batch and length other than the traced ones and compare it with the
    module it was traced from: an exporter that specialized a shape or baked a value fails here, not in serving.

    Keys with equal similarity (the same text added twice) may come out in any order in either runtime, so the
    neighbours are compared by similarity: rank by rank, and each id ONNX returns has the similarity of its rank. The
    probabilities are compared on the rows where no tie straddles the k-th place (there, either vote is right)."""
    import onnxruntime

    texts = ["hello world", "a longer example sentence than the traced one, to change the length", "x", "y z", "w"]
    inputs = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    k = min(3, graph.max_knn_k)
    knn_k, beta = torch.tensor(k), torch.tensor(0.5)
    with torch.no_grad():
        expected = graph(**{name: inputs[name] for name in names}, knn_k=knn_k, retrieval_weight=beta)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {name: inputs[name].numpy() for name in names} | {"knn_k": knn_k.numpy(), "retrieval_weight": beta.numpy()}
    found = [torch.from_numpy(output) for output in session.run(list(OUTPUT_NAMES), feeds)]
    found, expected = dict(zip(OUTPUT_NAMES, found, strict=True)), dict(zip(OUTPUT_NAMES, expected, strict=True))
    probabilities, ids = expected["probabilities"], expected["neighbor_ids"]
    similarities, query = expected["neighbor_similarities"], expected["query_embedding"]
    similarity_gap = float((found["neighbor_similarities"][:, :k] - similarities[:, :k]).abs().max())  # rank by rank
    own = (graph.keys[found["neighbor_ids"][:, :k]] * query.unsqueeze(1)).sum(-1)  # (B, k): the ids' similarities
    id_gap = float((own - similarities[:, :k]).abs().max())
    ranked = (query @ graph.keys.T).sort(dim=1, descending=True).values  # (B, N)
    tied = torch.zeros(len(ids), dtype=torch.bool)  # (B,): a tie straddles the k-th place
    if ranked.shape[1] > k:
        tied = (ranked[:, k - 1] - ranked[:, k]).abs() <= TIE_TOLERANCE
    gaps = (found["probabilities"] - probabilities).abs().max(dim=1).values[~tied]  # (B',)
    probability_gap = float(gaps.max()) if len(gaps) else 0.0
    if max(similarity_gap, id_gap) > TIE_TOLERANCE or probability_gap > 1e-4:
        raise InputError(
            f"The exported graph {path.name} disagrees with the model on a batch of {len(texts)} (max |Δp| "
            f"{probability_gap:.2e}, neighbour similarities off by {max(similarity_gap, id_gap):.2e}): the exporter "
            "specialized something it should not have."
        )


@contextlib.contextmanager
def _quiet():
    """The exporter's and quantizer's progress lines and deprecation warnings are about their internals, not the
    user's model: errors still raise."""
    noisy = [logging.getLogger(name) for name in ("", "torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [each.level for each in noisy]
    with warnings.catch_warnings(), contextlib.redirect_stdout(None):
        warnings.simplefilter("ignore")
        for each in noisy:
            each.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for each, level in zip(noisy, levels, strict=True):
                each.setLevel(level)


def _import_exporter():
    try:
        import onnx
        import onnxruntime  # noqa: F401 (the exported graph is checked in it)
        import onnxscript  # noqa: F401 (torch.onnx's exporter needs it)
    except ImportError as err:
        raise InputError(
            f'Exporting to ONNX needs onnx, onnxscript and onnxruntime ({err.name} is missing): pip install "hf-reaugkd[export]"'
        ) from err
    return onnx


def exported_settings(model_dir: str | Path) -> dict | None:
    """The settings the folder's graphs were exported with (`quantize`, `opset`, `max_knn_k`), or None if there are
    none. Raises `InputError` when the exporter is not installed (the settings are read to export again)."""
    record = Path(model_dir) / ONNX_DIR / EXPORT_FILE
    _import_exporter()
    if not record.is_file():
        return None if not (Path(model_dir) / ONNX_DIR / ONNX_FILE).is_file() else {}
    return json.loads(record.read_text()).get("settings", {})


__all__ = ["ServingGraph", "export_onnx", "exported_settings"]
