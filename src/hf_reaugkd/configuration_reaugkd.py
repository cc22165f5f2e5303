"""ReAugKD model configuration.

This file travels with saved checkpoints as remote code. Its one sibling import, `settings_reaugkd.py` (standard
library only), declares the retrieval and index settings' defaults, ranges and checks, which this config, the
knowledge base, the command line and the ONNX runtime share.
"""

import math
import re
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

from .settings_reaugkd import (
    INDEX_SETTINGS,
    REGRESSION,
    SINGLE_LABEL,
    check_index_params,
    check_num_labels,
    check_positive_integer,
    check_retrieval_gate,
    check_retrieval_temperature,
    check_retrieval_weight,
    problem_type_of,
)


@strict
class ReAugKDConfig(PreTrainedConfig):
    r"""
    Configuration of a retrieval-augmented student: an encoder, a projection head into the teacher's
    knowledge-base (KB) space, a classifier, and the KB itself.

    Args:
        encoder_config (`dict` or `PreTrainedConfig`):
            Config of the student encoder; any architecture `AutoModel` knows (BERT, MPNet, RoBERTa, ...).
        pooling (`str`, defaults to `"mean"`):
            How token states become one sentence embedding: `"mean"` (attention-masked mean) or `"cls"`.
        kb_size (`int`, defaults to 0):
            Number of KB entries. Stored so that loading can allocate the KB buffers before reading them.
        kb_dim (`int`, defaults to 128):
            Dimension of the KB keys, i.e. the output size of the student's projection head.
        knn_k (`int`, defaults to 16):
            Number of neighbours retrieved at inference. Clamped to `kb_size`.
        retrieval_temperature (`float`, defaults to 0.1):
            τ_r in the neighbour weights `softmax(similarity / τ_r)`; at least `MIN_RETRIEVAL_TEMPERATURE` (1e-6).
        retrieval_weight (`float`, defaults to 0.5):
            β in `β · retrieved + (1 − β) · student`. β = 0 is the plain student.
        retrieval_gate (`list[float]`, *optional*):
            A per-query β(x) = σ(w · features(x) + b) instead of the fixed `retrieval_weight`: one weight per feature of
            `RETRIEVAL_GATE_FEATURES` (top similarity, retrieved confidence, retrieved entropy, student
            entropy), then the bias, each within ±`MAX_GATE_PARAMETER` (1e6). Fitted on validation by the pipeline
            and kept only when it beats the best fixed β there; a `retrieval_weight` given to `forward` or the
            pipeline replaces it.
        index_type (`str`, defaults to `"torch"`):
            Search backend: `"torch"` (exact, blockwise matmul + top-k; runs on the model's device),
            `"flat"` (FAISS exact), `"hnsw"` or `"ivf"` (FAISS approximate). FAISS types need `faiss-cpu`.
            `KnowledgeBase.build(..., index_type="auto")` (the pipeline's default) records `"torch"` for knowledge
            bases up to 20,000 entries and `"hnsw"` above.
        index_nbytes (`int`, defaults to 0):
            Size of the serialized FAISS index stored in the checkpoint (only trained indexes, HNSW and IVF, are
            stored; exact ones are rebuilt from the keys).
        index_sha256 (`str`, *optional*):
            SHA-256 (hex) of those index bytes as built, recorded by `set_knowledge_base`. Loading compares it before
            FAISS reads the bytes, and rebuilds the index from the keys (with a warning) when it differs. Checkpoints
            saved without it load with the other checks only.
        kb_has_texts (`bool`, defaults to `False`):
            Whether the entries' texts are stored beside the weights (`knowledge_base_texts.safetensors`), to show
            with neighbour explanations. Set by `set_knowledge_base`.
        kb_texts_sha256 (`str`, *optional*):
            SHA-256 of those texts, recorded by `save_pretrained`. Loading reads the texts file with the weights and
            compares it, so explanations never pair a row with the text of another save (a concurrent `kb add`).
        search_block_size, search_query_block_size, search_dtype, hnsw_m, hnsw_ef_construction, hnsw_ef_search,
        ivf_nlist, ivf_nprobe:
            How the knowledge base is searched: blocks of the exact torch search (its memory is at most
            `search_query_block_size × search_block_size` scores), the precision it scans the keys in (`"auto"`: float16
            on CUDA, int8 on CPUs with native bf16 matmul, else float32; the best candidates are re-scored from the fp32
            keys, so similarities stay exact), and the FAISS HNSW and IVF parameters. Their defaults, ranges and help
            are declared once, in `settings_reaugkd.INDEX_SETTINGS`.
        problem_type (`str`, *optional*):
            transformers' task type, which decides what the knowledge base's values are and how they are mixed:
            `"single_label_classification"` (the default when unset: class distributions, softmax),
            `"multi_label_classification"` (one probability per label, sigmoid) or `"regression"` (`num_labels=1`:
            the teacher's predicted number, and the mixed prediction is a number too). The per-query gate is for
            single-label classification only: its features are class-distribution entropies.
        query_mean (`list[float]`, *optional*):
            The mean of the student's normalised queries on the validation split (`kb_dim` numbers), recorded by the
            pipeline. `kb add` without a teacher keys a gold row by its text's query minus this mean: the queries
            share a common direction, so a raw query is closer to every other query than any teacher key is, and a
            row keyed by one would be every query's nearest neighbour. Inference never reads it.
        multi_label_threshold (`float`, defaults to 0.5):
            A label is predicted when its mixed probability reaches this (multi-label; the pipeline marks such labels
            `predicted`, and F1 / exact match are computed with it).
        classifier_dropout (`float`, defaults to 0.1):
            Dropout before the student classifier.
        initializer_range (`float`, defaults to 0.02):
            Std of the normal init of the projection head and classifier.

    Example:

    ```python
    >>> from transformers import BertConfig
    >>> from hf_reaugkd import ReAugKDConfig
    >>> config = ReAugKDConfig(encoder_config=BertConfig(hidden_size=32).to_dict(), kb_dim=32, num_labels=2)
    ```
    """

    model_type = "reaugkd"
    sub_configs_defaults = {"encoder_config": SubConfigSpec(config_class=AutoConfig, model_type="bert")}

    encoder_config: dict | PreTrainedConfig | None = None
    pooling: Literal["mean", "cls"] = "mean"
    kb_size: int = 0
    kb_dim: int = 128
    knn_k: int = 16
    retrieval_temperature: float | int = 0.1
    retrieval_weight: float | int = 0.5
    retrieval_gate: list[float] | None = None
    index_type: Literal["torch", "flat", "hnsw", "ivf"] = "torch"
    index_nbytes: int = 0
    index_sha256: str | None = None
    kb_has_texts: bool = False
    kb_texts_sha256: str | None = None
    search_block_size: int = INDEX_SETTINGS["search_block_size"].default
    search_query_block_size: int = INDEX_SETTINGS["search_query_block_size"].default
    search_dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = INDEX_SETTINGS["search_dtype"].default
    hnsw_m: int = INDEX_SETTINGS["hnsw_m"].default
    hnsw_ef_construction: int = INDEX_SETTINGS["hnsw_ef_construction"].default
    hnsw_ef_search: int = INDEX_SETTINGS["hnsw_ef_search"].default
    ivf_nlist: int = INDEX_SETTINGS["ivf_nlist"].default
    ivf_nprobe: int = INDEX_SETTINGS["ivf_nprobe"].default
    query_mean: list[float] | None = None
    multi_label_threshold: float | int = 0.5
    classifier_dropout: float | int = 0.1
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        num_labels = kwargs.get("num_labels")
        # before transformers sizes a label map from it
        for count in (num_labels, None if self.id2label is None else len(self.id2label)):
            if count is not None:
                check_num_labels(count)
        if self.id2label is not None and num_labels is not None and len(self.id2label) != num_labels:
            # transformers would warn and rename every class LABEL_i
            raise ValueError(
                f"The config gives num_labels={num_labels} but an id2label of {len(self.id2label)} labels "
                f"({self.id2label}): give one name per class."
            )
        super().__post_init__(**kwargs)
        # Saved configs name the remote-code class for every Auto class, not only the one of the saved model's
        # class (`register_for_auto_class` records one per class), so `AutoModel` works on a classifier checkpoint.
        # `pipeline("text-classification", model=<path or Hub id>, trust_remote_code=True)` uses the pipeline that
        # travels with the checkpoint (truncation by default, per-call retrieval settings, neighbour explanations).
        if not getattr(self, "custom_pipelines", None):
            self.custom_pipelines = {
                "text-classification": {
                    "impl": "pipeline_reaugkd.ReAugKDTextClassificationPipeline",
                    "pt": ["AutoModelForSequenceClassification"],
                    "type": "text",
                }
            }
        if not getattr(self, "auto_map", None):
            self.auto_map = {
                "AutoConfig": "configuration_reaugkd.ReAugKDConfig",
                "AutoModel": "modeling_reaugkd.ReAugKDModel",
                "AutoModelForSequenceClassification": "modeling_reaugkd.ReAugKDForSequenceClassification",
            }

    def validate_reaugkd(self):
        """Part of `@strict` validation: catch settings that would only fail deep inside `forward`."""
        if self.kb_size < 0 or self.kb_dim < 1:
            raise ValueError(f"kb_size must be >= 0 and kb_dim >= 1, got kb_size={self.kb_size}, kb_dim={self.kb_dim}")
        for name in ("index_sha256", "kb_texts_sha256"):
            value = getattr(self, name)
            if value is not None and re.fullmatch(r"[0-9a-f]{64}", value) is None:
                raise ValueError(f"{name} must be 64 lowercase hex digits (a SHA-256), got {value!r}")
        check_positive_integer("knn_k", self.knn_k)
        check_retrieval_temperature(self.retrieval_temperature)
        check_retrieval_weight(self.retrieval_weight)
        if self.retrieval_gate is not None:
            check_retrieval_gate(self.retrieval_gate)
            if problem_type_of(self) != SINGLE_LABEL:
                raise ValueError(
                    f"retrieval_gate is for single-label classification (its features are class-distribution "
                    f"entropies); this config is for {self.problem_type}."
                )
        if self.query_mean is not None and (
            len(self.query_mean) != self.kb_dim or not all(math.isfinite(x) for x in self.query_mean)
        ):
            raise ValueError(f"query_mean must be {self.kb_dim} finite numbers (kb_dim), got {len(self.query_mean)}.")
        if problem_type_of(self) == REGRESSION and self.num_labels != 1:
            raise ValueError(f"A regression config has one output (num_labels=1), got num_labels={self.num_labels}.")
        if not 0 < self.multi_label_threshold < 1:
            raise ValueError(f"multi_label_threshold must be in (0, 1), got {self.multi_label_threshold}")
        if self.id2label is not None and sorted(self.id2label) != list(range(len(self.id2label))):
            raise ValueError(
                f"id2label must name every class id 0..{len(self.id2label) - 1} once, got ids {sorted(self.id2label)}"
            )
        if self.index_nbytes < 0:
            raise ValueError(f"index_nbytes must be >= 0, got {self.index_nbytes}")
        check_index_params({name: getattr(self, name) for name in INDEX_SETTINGS})


__all__ = ["ReAugKDConfig"]
