"""Serving an exported student with ONNX Runtime: no PyTorch, no transformers, no remote code.

`pip install "hf-reaugkd[onnx]"` (onnxruntime, tokenizers, numpy, safetensors) is all this module needs. The graph
that `hf-reaugkd export` writes (`onnx_export.py`) does the whole prediction — encoder, pooling, projection, the exact
knowledge-base scan, the neighbour vote and the mixing — so this side only tokenizes, runs the session and formats the
result the way `pipeline("text-classification", model=..., trust_remote_code=True)` does:

```python
>>> from hf_reaugkd.onnx_pipeline import ONNXTextClassificationPipeline
>>> classifier = ONNXTextClassificationPipeline("outputs/demo/model", quantized=True)
>>> classifier("A gorgeous, witty, seductive movie.", neighbors=2)
```

A graph is bound to the knowledge base it was exported with: its metadata records the knowledge base's content hash
(`knowledge_base_sha256`), and a folder whose knowledge base no longer hashes the same (a `kb add` by an older
version, a copied-in `model.safetensors`) is refused rather than served with another knowledge base's neighbour ids.
"""

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from .kb_texts import TEXTS_FILE, decode_texts, load_texts
from .settings_reaugkd import check_retrieval_weight

ONNX_DIR = "onnx"  # the layout optimum and transformers.js read on the Hub: onnx/model.onnx, onnx/model_quantized.onnx
ONNX_FILE = "model.onnx"
QUANTIZED_ONNX_FILE = "model_quantized.onnx"
# ONNX metadata_props written by the exporter and read here.
KB_SHA256_KEY = "hf_reaugkd.knowledge_base_sha256"
EXPORT_SETTINGS_KEY = "hf_reaugkd.export"  # JSON: quantize, opset, max_knn_k (what a re-export repeats)
KB_TENSORS = ("reaugkd.knowledge_base.keys", "reaugkd.knowledge_base.values")
DEFAULT_MAX_KNN_K = (
    32  # the largest runtime k of an export: k beyond the config's without a re-export, at a negligible cost
)
OUTPUT_NAMES = (
    "probabilities",
    "student_probabilities",
    "retrieved_probabilities",
    "neighbor_ids",
    "neighbor_similarities",
    "neighbor_weights",
    "query_embedding",
)


class StaleGraphError(ValueError):
    """The exported graph does not belong to the knowledge base in its folder."""


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            'Serving an exported student needs ONNX Runtime: pip install "hf-reaugkd[onnx]" '
            "(onnxruntime, tokenizers, numpy, safetensors)."
        ) from err
    return onnxruntime


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Which weights file holds each knowledge-base tensor (one `model.safetensors`, or shards with an index)."""
    index_file = model_dir / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return {name: model_dir / weight_map[name] for name in KB_TENSORS if name in weight_map}
    return dict.fromkeys(KB_TENSORS, model_dir / "model.safetensors")


def knowledge_base_sha256(model_dir: str | Path) -> str:
    """SHA-256 of what a served prediction depends on in the knowledge base: the stored keys and soft labels (their
    bytes as saved) and, when stored, the entries' texts file. Read from the folder, never from a config that could
    disagree with it; with numpy and safetensors only, so the runtime and the exporter compute it alike."""
    return _digest(*_read_knowledge_base(Path(model_dir)))


def _read_knowledge_base(model_dir: Path) -> tuple[dict[str, np.ndarray], bytes | None]:
    """The knowledge base's keys and soft labels, and the texts file's bytes (`None` when it stores no texts)."""
    from safetensors import safe_open

    tensors = {}
    for name, path in _weight_files(model_dir).items():
        if not path.is_file():
            raise FileNotFoundError(
                f"{model_dir} has no weights file {path.name} (expected the knowledge base there)."
            )
        with safe_open(path, framework="numpy") as f:
            if name not in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                raise ValueError(f"{path} holds no {name}: not a ReAugKD student with a knowledge base.")
            tensors[name] = f.get_tensor(name)
    texts = model_dir / TEXTS_FILE
    return tensors, texts.read_bytes() if texts.is_file() else None


def _digest(tensors: dict[str, np.ndarray], texts_file: bytes | None) -> str:
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        digest.update(f"{name}:{tensor.dtype}:{tensor.shape}".encode())
        digest.update(np.ascontiguousarray(tensor).tobytes())
    if texts_file is not None:
        digest.update(texts_file)
    return digest.hexdigest()


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


class ONNXTextClassificationPipeline:
    """Text classification over an exported ReAugKD graph, with the output of the PyTorch pipeline.

    Args:
        model_dir (`str` or `Path`): a saved student folder holding `onnx/model.onnx` (from `hf-reaugkd export`).
        quantized (`bool`, defaults to `False`): serve `onnx/model_quantized.onnx` (`--quantize int8`) instead.
        num_threads (`int`, *optional*): ONNX Runtime's intra-op threads (its default: one per core).
        providers (`list[str]`, *optional*): ONNX Runtime execution providers (default: CPU).
    """

    def __init__(
        self,
        model_dir: str | Path,
        quantized: bool = False,
        num_threads: int | None = None,
        providers: list[str] | None = None,
    ):
        ort = _import_onnxruntime()
        from tokenizers import Tokenizer

        self.model_dir = model_dir = Path(model_dir)
        graph = model_dir / ONNX_DIR / (QUANTIZED_ONNX_FILE if quantized else ONNX_FILE)
        if not graph.is_file():
            flag = " --quantize int8" if quantized else ""
            raise FileNotFoundError(
                f"{graph} does not exist: export the model first with `hf-reaugkd export {model_dir}{flag}`."
            )
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: knn_k and β are inputs with defaults, which it warns about
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        self.session = ort.InferenceSession(str(graph), options, providers=providers or ["CPUExecutionProvider"])
        metadata = self.session.get_modelmeta().custom_metadata_map
        # read once, with the graph: an edit of the folder after loading cannot pair these ids with other rows
        tensors, texts_file = _read_knowledge_base(model_dir)
        found = _digest(tensors, texts_file)
        if metadata.get(KB_SHA256_KEY) != found:
            raise StaleGraphError(
                f"{graph} was exported from another knowledge base than the one in {model_dir} (graph: "
                f"{metadata.get(KB_SHA256_KEY, 'no hash recorded')}, folder: {found}): its neighbour ids would point at "
                f"the wrong rows. Re-export it with `hf-reaugkd export {model_dir}"
                f"{' --quantize int8' if quantized else ''}`."
            )
        self.config = json.loads((model_dir / "config.json").read_text())
        self.id2label = {int(i): label for i, label in self.config["id2label"].items()}
        self.max_knn_k = int(json.loads(metadata[EXPORT_SETTINGS_KEY])["max_knn_k"])
        self.input_names = [node.name for node in self.session.get_inputs()]
        self.tokenizer = self._load_tokenizer(Tokenizer, model_dir)
        self._soft_labels, self._texts_file, self._texts = tensors[KB_TENSORS[1]], texts_file, None

    def _load_tokenizer(self, tokenizer_class, model_dir: Path):
        """The saved fast tokenizer, truncating as the PyTorch pipeline does (to the encoder's positions or the
        tokenizer's limit, whichever is smaller) and padding batches on the tokenizer's side."""
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{model_dir} has no tokenizer.json: the ONNX runtime needs a fast tokenizer's file."
            )
        tokenizer = tokenizer_class.from_file(str(tokenizer_file))
        settings_file = model_dir / "tokenizer_config.json"
        settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        limits = [settings.get("model_max_length"), self.config["encoder_config"].get("max_position_embeddings")]
        limits = [int(limit) for limit in limits if isinstance(limit, int | float) and 0 < limit < 1e9]
        tokenizer.no_truncation()
        if limits:
            tokenizer.enable_truncation(min(limits))
        pad_token = settings.get("pad_token") or "[PAD]"
        pad_token = pad_token["content"] if isinstance(pad_token, dict) else pad_token
        pad_id = tokenizer.token_to_id(pad_token)
        tokenizer.enable_padding(
            pad_id=0 if pad_id is None else pad_id,
            pad_token=pad_token,
            direction=settings.get("padding_side", "right"),
        )
        return tokenizer

    def _encode(self, inputs: list) -> dict[str, np.ndarray]:
        pairs = [(item["text"], item.get("text_pair")) if isinstance(item, dict) else (item, None) for item in inputs]
        if any(pair is not None for _, pair in pairs):
            encodings = self.tokenizer.encode_batch([(text, pair) if pair else text for text, pair in pairs])
        else:
            encodings = self.tokenizer.encode_batch([text for text, _ in pairs])
        features = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        return {name: np.asarray(features[name], dtype=np.int64) for name in self.input_names if name in features}

    def _retrieval_inputs(self, knn_k: int | None, retrieval_weight: float | None) -> dict[str, np.ndarray]:
        inputs = {}
        if knn_k is not None:
            if isinstance(knn_k, bool) or not isinstance(knn_k, int) or not 1 <= knn_k <= self.max_knn_k:
                raise ValueError(
                    f"knn_k must be an integer from 1 to {self.max_knn_k} (the export's --max_knn_k), got {knn_k!r}"
                )
            inputs["knn_k"] = np.asarray(knn_k, dtype=np.int64)
        if retrieval_weight is not None:
            check_retrieval_weight(retrieval_weight)
            inputs["retrieval_weight"] = np.asarray(retrieval_weight, dtype=np.float32)
        return inputs

    def run(
        self, inputs: list, knn_k: int | None = None, retrieval_weight: float | None = None
    ) -> dict[str, np.ndarray]:
        """One session run over a batch of texts (or `{"text", "text_pair"}` dicts): the graph's outputs by name,
        the neighbour columns cut to the `knn_k` in use."""
        feeds = {**self._encode(inputs), **self._retrieval_inputs(knn_k, retrieval_weight)}
        outputs = dict(zip(OUTPUT_NAMES, self.session.run(list(OUTPUT_NAMES), feeds), strict=True))
        k = knn_k if knn_k is not None else int((outputs["neighbor_ids"][0] >= 0).sum())
        for name in ("neighbor_ids", "neighbor_similarities", "neighbor_weights"):
            outputs[name] = outputs[name][:, :k]
        return outputs

    def __call__(
        self,
        inputs: str | dict | list,
        top_k: int | None | str = "legacy",
        neighbors: int | None = None,
        knn_k: int | None = None,
        retrieval_weight: float | None = None,
        batch_size: int = 1,
    ) -> list | dict:
        """Classify one text or a list of texts; the same results as the PyTorch pipeline's `__call__`.

        Args:
            inputs: a text, a `{"text", "text_pair"}` dict, or a list of them.
            top_k (`int` or `None`, *optional*): as `TextClassificationPipeline`: not given, the best label per input;
                an int, that many labels, best first; `None`, every label.
            neighbors (`int`, *optional*): also explain each prediction by its `neighbors` best knowledge-base
                entries (id, similarity, weight, teacher label and distribution, text when stored), with the
                student-only and retrieved distributions.
            knn_k, retrieval_weight (*optional*): per-call k and β; a given β replaces a per-query gate.
            batch_size (`int`, defaults to 1): texts per session run (padded to the longest).
        """
        if neighbors is not None and (isinstance(neighbors, bool) or not isinstance(neighbors, int) or neighbors < 1):
            raise ValueError(f"neighbors must be an integer >= 1, got {neighbors!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        single = not isinstance(inputs, list)
        items = [inputs] if single else inputs
        results = []
        for start in range(0, len(items), batch_size):
            outputs = self.run(items[start : start + batch_size], knn_k, retrieval_weight)
            results += [
                self._postprocess(outputs, row, top_k, neighbors) for row in range(len(outputs["probabilities"]))
            ]
        if single:
            return [results[0]] if isinstance(inputs, str) and top_k == "legacy" else results[0]
        return results

    def _postprocess(self, outputs: dict[str, np.ndarray], row: int, top_k, neighbors: int | None) -> Any:
        scores = outputs["probabilities"][row].astype(np.float64)
        scores = _softmax(np.log(np.maximum(scores, np.finfo(np.float32).tiny)))  # as the pipeline's softmax(logits)
        if top_k == "legacy":
            result = {"label": self.id2label[int(scores.argmax())], "score": float(scores.max())}
        else:
            result = sorted(
                ({"label": self.id2label[i], "score": float(p)} for i, p in enumerate(scores)),
                key=lambda item: item["score"],
                reverse=True,
            )[:top_k]
        if neighbors is None:
            return result
        explained = dict(result) if isinstance(result, dict) else {"scores": result}
        explained["student_scores"] = self._by_label(outputs["student_probabilities"][row])
        explained["retrieved_scores"] = self._by_label(outputs["retrieved_probabilities"][row])
        soft_labels, texts = self._knowledge_base_rows()
        rows = []
        for kb_row, similarity, weight in zip(
            outputs["neighbor_ids"][row].tolist(),
            outputs["neighbor_similarities"][row].tolist(),
            outputs["neighbor_weights"][row].tolist(),
            strict=True,
        ):
            distribution = soft_labels[kb_row]
            rows.append(
                {
                    "id": kb_row,
                    "similarity": similarity,
                    "weight": weight,
                    "label": self.id2label[int(distribution.argmax())],
                    "label_distribution": self._by_label(distribution),
                    **({"text": texts[kb_row]} if texts is not None else {}),
                }
            )
        explained["neighbors"] = rows[:neighbors]
        return explained

    def _by_label(self, probabilities: np.ndarray) -> dict[str, float]:
        return {self.id2label[i]: float(p) for i, p in enumerate(probabilities.tolist())}

    def _knowledge_base_rows(self) -> tuple[np.ndarray, list[str] | None]:
        """The soft labels and texts the neighbour explanations show, as read with the graph; the texts are decoded
        on the first `neighbors` call."""
        if self._texts is None and self._texts_file is not None:
            source = self.model_dir / TEXTS_FILE
            self._texts = decode_texts(load_texts(self._texts_file, source), source)
            self._texts_file = None
        return self._soft_labels, self._texts


__all__ = ["ONNXTextClassificationPipeline", "StaleGraphError", "knowledge_base_sha256"]
