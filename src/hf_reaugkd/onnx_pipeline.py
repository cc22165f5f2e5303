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

A graph is bound to everything it serves: `onnx/export.json` (written with the graphs) records each graph file's
SHA-256 and one over what the runtime serves from the folder beside it: the weights (the knowledge base and the
weights the graph was exported from), the knowledge base's texts, the tokenizer and the config's fields that change
an answer (`UNSERVED_CONFIG_FIELDS` are the others). A folder where any of these differs from the export (a
`retrieval_weight` set in config.json, other classifier weights, a graph whose initializers were altered, a copied-in
`model.safetensors`) is refused rather than served with answers the PyTorch model would not give. The runtime reads
each file once and serves what it hashed, so a folder replaced by an edit halfway through the reads is read again.
"""

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .kb_texts import TEXT_TENSORS, TEXTS_FILE, decode_texts, load_texts
from .settings_reaugkd import (
    LOAD_ATTEMPTS,
    check_positive_integer,
    check_retrieval_weight,
    check_top_k,
    cut_to_max_chars,
)

ONNX_DIR = "onnx"  # the layout optimum and transformers.js read on the Hub: onnx/model.onnx, onnx/model_quantized.onnx
ONNX_FILE = "model.onnx"
QUANTIZED_ONNX_FILE = "model_quantized.onnx"
EXPORT_FILE = "export.json"  # in ONNX_DIR: {"settings", "served_sha256", "graphs": {file: sha256}}
WEIGHTS_FILE, WEIGHTS_INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what the runtime tokenizes with
# Config fields that change no answer of the graph: bookkeeping, `query_mean` (read by `kb add` only) and the index
# settings (the graph always scans exactly). Any other field, a new one too, binds the graph.
UNSERVED_CONFIG_FIELDS = frozenset(
    {"transformers_version", "_name_or_path", "architectures", "auto_map", "custom_pipelines", "dtype", "torch_dtype",
     "query_mean", "index_type", "index_nbytes", "index_sha256", "search_block_size", "search_query_block_size",
     "search_dtype", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ivf_nlist", "ivf_nprobe"}
)  # fmt: skip
KB_VALUES = "reaugkd.knowledge_base.values"  # the soft labels that explanations show
DEFAULT_MAX_KNN_K = (
    32  # the largest runtime k of an export: k beyond the config's without a re-export, at a negligible cost
)
OUTPUT_NAMES = (
    "logits",  # log of the mixed probabilities, first: what optimum's and transformers.js's pipelines read
    "probabilities",
    "student_probabilities",
    "retrieved_probabilities",
    "neighbor_ids",
    "neighbor_similarities",
    "neighbor_weights",
    "query_embedding",
)


class StaleGraphError(ValueError):
    """The exported graph does not belong to the folder it is in (or was altered since its export)."""


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(
            'Serving an exported student needs ONNX Runtime: pip install "hf-reaugkd[onnx]" '
            "(onnxruntime, tokenizers, numpy, safetensors)."
        ) from err
    return onnxruntime


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _inside(model_dir: Path, name: object, source: str) -> Path:
    """`model_dir / name` for a file name a checkpoint gives: a bare name, never a path out of the folder (an
    untrusted index could name `../elsewhere` or `/etc/passwd`)."""
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
        raise ValueError(f"{source} names {name!r}: a checkpoint's files must be file names in its own folder.")
    return model_dir / name


def _weight_files(model_dir: Path) -> tuple[list[Path], dict[str, Path]]:
    """The weights files (one `model.safetensors`, or the index and the shards it names) and which holds the
    knowledge base's soft labels."""
    index_file = model_dir / WEIGHTS_INDEX_FILE
    if not index_file.is_file():
        return [model_dir / WEIGHTS_FILE], {KB_VALUES: model_dir / WEIGHTS_FILE}
    weight_map = json.loads(index_file.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index_file} has no weight_map.")
    shards = {name: _inside(model_dir, name, str(index_file)) for name in sorted(set(weight_map.values()))}
    values_file = {KB_VALUES: shards[weight_map[KB_VALUES]]} if KB_VALUES in weight_map else {}
    return [index_file, *shards.values()], values_file


def served_config(config: dict) -> dict:
    """The config's fields that change the graph's answers (all but `UNSERVED_CONFIG_FIELDS`)."""
    return {key: value for key, value in config.items() if key not in UNSERVED_CONFIG_FIELDS}


@dataclass
class ServedFolder:
    """What the runtime serves from a model folder, each file read once, and the SHA-256 that binds them."""

    sha256: str
    config: dict
    soft_labels: np.ndarray  # (N, C)
    texts_file: bytes | None
    tokenizer_files: dict[str, bytes]


def read_served_folder(model_dir: str | Path) -> ServedFolder:
    """Read what the runtime serves from `model_dir` (see the module docstring) and hash it: the exporter records the
    hash, the runtime compares it. The weights are hashed as they stream by, and the knowledge base's tensors hashed
    again as they are kept, so a file replaced between those two reads changes the hash instead of going unseen. With
    numpy and safetensors only, so the runtime and the exporter compute it alike."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    digest = hashlib.sha256()

    def read(path: Path, required: bool = True) -> bytes | None:
        if not path.is_file():
            if required:
                raise FileNotFoundError(f"{model_dir} has no {path.name}.")
            digest.update(f"{path.name}: none\n".encode())
            return None
        data = path.read_bytes()
        digest.update(f"{path.name}: {len(data)}\n".encode())
        digest.update(data)
        return data

    config = json.loads((model_dir / "config.json").read_bytes())  # hashed by its served fields, not its bytes
    digest.update(json.dumps(served_config(config), sort_keys=True).encode())
    files, kb_files = _weight_files(model_dir)
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(
                f"{model_dir} has no weights file {path.name} (expected the knowledge base there)."
            )
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    name = KB_VALUES
    if name not in kb_files:
        raise ValueError(f"{model_dir}'s weights hold no {name}: not a ReAugKD student with a knowledge base.")
    with safe_open(kb_files[name], framework="numpy") as f:
        if name not in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            raise ValueError(f"{kb_files[name]} holds no {name}: not a ReAugKD student with a knowledge base.")
        soft_labels = f.get_tensor(name)  # (N, C)
    digest.update(f"{name}:{soft_labels.dtype}:{soft_labels.shape}".encode())
    digest.update(np.ascontiguousarray(soft_labels).tobytes())
    texts_file = read(model_dir / TEXTS_FILE, required=False)
    tokenizer_files = {name: read(model_dir / name, required=False) for name in TOKENIZER_FILES}
    return ServedFolder(digest.hexdigest(), config, soft_labels, texts_file, tokenizer_files)


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
        graph, served, settings = _read_export(model_dir, QUANTIZED_ONNX_FILE if quantized else ONNX_FILE)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: knn_k and β are inputs with defaults, which it warns about
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        self.session = ort.InferenceSession(graph, options, providers=providers or ["CPUExecutionProvider"])
        self.config = served.config
        self.id2label = {int(i): label for i, label in self.config["id2label"].items()}
        self._soft_labels = served.soft_labels  # (N, C), as read with the graph's hash
        if self._soft_labels.ndim != 2 or self._soft_labels.shape[1] != len(self.id2label):
            raise ValueError(
                f"{model_dir}'s knowledge base holds soft labels of shape {list(self._soft_labels.shape)}; the config "
                f"names {len(self.id2label)} labels."
            )
        self.kb_size = len(self._soft_labels)
        self.max_knn_k = min(settings["max_knn_k"], self.kb_size)
        self.input_names = [node.name for node in self.session.get_inputs()]
        self.tokenizer = self._load_tokenizer(Tokenizer, served.tokenizer_files)
        self._texts, self._encoded_texts = None, None
        if served.texts_file is not None:
            self._encoded_texts = load_texts(served.texts_file, model_dir / TEXTS_FILE)
            count = len(self._encoded_texts[TEXT_TENSORS[0]]) - 1
            if count != self.kb_size:
                raise ValueError(
                    f"{model_dir / TEXTS_FILE} holds {count} texts for {self.kb_size} knowledge-base rows: it is not "
                    "the texts file of this knowledge base."
                )

    def _load_tokenizer(self, tokenizer_class, files: dict[str, bytes | None]):
        """The saved fast tokenizer, truncating as the PyTorch pipeline does (to the encoder's positions or the
        tokenizer's limit, whichever is smaller) and padding batches on the tokenizer's side."""
        if files["tokenizer.json"] is None:
            raise FileNotFoundError(
                f"{self.model_dir} has no tokenizer.json: the ONNX runtime needs a fast tokenizer's file."
            )
        tokenizer = tokenizer_class.from_str(files["tokenizer.json"].decode("utf-8"))
        settings = json.loads(files["tokenizer_config.json"]) if files["tokenizer_config.json"] is not None else {}
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
        inputs = cut_to_max_chars(inputs)  # before tokenizing
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
        """Per-call k and β as graph inputs, accepted as the PyTorch model accepts them: k an integer >= 1, clamped to
        the knowledge base's size; a k the graph is too narrow for is refused with the flag that widens it."""
        inputs = {}
        if knn_k is not None:
            check_positive_integer("knn_k", knn_k)
            knn_k = min(knn_k, self.kb_size)
            if knn_k > self.max_knn_k:
                raise ValueError(
                    f"knn_k={knn_k} is more neighbours than this export serves ({self.max_knn_k}): export again with "
                    f"`hf-reaugkd export {self.model_dir} --max_knn_k {knn_k}`."
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
        k = int(feeds["knn_k"]) if "knn_k" in feeds else int((outputs["neighbor_ids"][0] >= 0).sum())
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
        check_positive_integer("batch_size", batch_size)
        if top_k != "legacy":
            check_top_k(top_k)
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
        if self._texts is None and self._encoded_texts is not None:
            self._texts = decode_texts(self._encoded_texts, self.model_dir / TEXTS_FILE)
            self._encoded_texts = None
        return self._soft_labels, self._texts


def _read_export(model_dir: Path, graph_name: str) -> tuple[bytes, ServedFolder, dict]:
    """The graph's bytes, what it serves from the folder and its export settings, read as one consistent snapshot:
    an edit replaces the folder whole, so reads that straddle a replacement disagree with the export's hashes and are
    made again (up to `LOAD_ATTEMPTS` times, as the PyTorch loader does) before the graph is called stale."""
    for attempt in range(1, LOAD_ATTEMPTS + 1):
        try:
            return _read_export_once(model_dir, graph_name)
        except (StaleGraphError, FileNotFoundError):
            if attempt == LOAD_ATTEMPTS:
                raise
            time.sleep(0.05 * attempt)
    raise AssertionError("unreachable: the last attempt raises")


def _read_export_once(model_dir: Path, graph_name: str) -> tuple[bytes, ServedFolder, dict]:
    graph_path, export_path = model_dir / ONNX_DIR / graph_name, model_dir / ONNX_DIR / EXPORT_FILE
    command = f"hf-reaugkd export {model_dir}{' --quantize int8' if graph_name != ONNX_FILE else ''}"
    reexport = f"Re-export it with `{command}`."
    if not graph_path.is_file():
        raise FileNotFoundError(f"{graph_path} does not exist: export the model first with `{command}`.")
    try:
        export = json.loads(export_path.read_bytes())
        settings, graphs, served_sha256 = export["settings"], export["graphs"], export["served_sha256"]
        check_positive_integer("max_knn_k", settings["max_knn_k"])
    except FileNotFoundError:
        raise StaleGraphError(f"{export_path} is missing: the graph's export is incomplete. {reexport}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise StaleGraphError(f"{export_path} is not a valid export record ({err!r}). {reexport}") from None
    graph = graph_path.read_bytes()
    served = read_served_folder(model_dir)
    if graphs.get(graph_name) != _sha256(graph):
        raise StaleGraphError(f"{graph_path} is not the graph that was exported (its SHA-256 differs). {reexport}")
    if served_sha256 != served.sha256:
        raise StaleGraphError(
            f"{graph_path} was exported from other weights, knowledge base, texts, tokenizer or config settings than "
            f"those in {model_dir} now (export: {served_sha256}, folder: {served.sha256}): it would not give the "
            f"answers the model gives. {reexport}"
        )
    return graph, served, settings


__all__ = ["ONNXTextClassificationPipeline", "StaleGraphError", "read_served_folder"]
