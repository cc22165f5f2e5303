"""The retrieval-augmented student: encoder → projection head → knowledge-base retrieval → mixed prediction.

This file travels with saved checkpoints as remote code, with its flat siblings (the config, the knowledge base and its
search modules, the loading checks, the pipeline; `save_pretrained` copies every file they import), so
`AutoModel*.from_pretrained(..., trust_remote_code=True)` works without hf-reaugkd installed.

Class layout, the transformers way:
- `ReAugKDModel` (behind `AutoModel`): encoder + projection head + knowledge base. It returns the sentence
  embedding, the normalised query in the teacher's KB space, and what retrieval found (neighbour ids, scores,
  weights and the retrieved label distribution). It has no student classifier: users who want an embedding
  model or a pure kNN classifier over the teacher's KB get exactly that, and the head class below adds the
  classifier, like `BertModel` / `BertForSequenceClassification`.
- `ReAugKDForSequenceClassification` (behind `AutoModelForSequenceClassification` and `pipeline`):
  `ReAugKDModel` + classifier; mixes `β · retrieved + (1 − β) · student` in the knowledge base's value space and
  returns logits that give the mixture back: `log(mixed)` for single-label classification (softmax of the student's
  logits; the pipeline's softmax yields the mixed probabilities), `logit(mixed)` for multi-label (a sigmoid per label)
  and the mixed number itself for regression (`config.problem_type`, see `value_predictions`).
"""

import math
import os
from dataclasses import dataclass

import torch
from safetensors.numpy import save_file
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from .configuration_reaugkd import ReAugKDConfig
from .kb_texts import TEXTS_FILE, encode_texts, texts_sha256
from .knowledge_base import KnowledgeBase, value_predictions
from .loading_reaugkd import (
    FolderChangedError,
    checkpoint_shapes,
    describe_shape_mismatch,
    is_reaugkd_config,
    kb_shape_mismatches,
    non_finite_tensors,
    shape_mismatches,
    texts_loader,
    with_stored_kb_fields,
)
from .pipeline_reaugkd import ReAugKDTextClassificationPipeline  # noqa: F401 (travels with the checkpoint)
from .settings_reaugkd import (
    GATE_SENTINEL,
    INDEX_SETTINGS,
    LOAD_ATTEMPTS,
    MULTI_LABEL,
    REGRESSION,
    SINGLE_LABEL,
    check_positive_integer,
    check_retrieval_gate,
    check_retrieval_temperature,
    check_retrieval_weight,
    problem_type_of,
)

logger = logging.get_logger(__name__)


@dataclass
class ReAugKDModelOutput(ModelOutput):
    """
    Outputs of `ReAugKDModel`.

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(B, T, H)`): encoder token states.
        sentence_embedding (`torch.FloatTensor` of shape `(B, H)`): pooled encoder output.
        query_embedding (`torch.FloatTensor` of shape `(B, kb_dim)`): L2-normalised projection into the
            teacher's KB space; the KB query.
        retrieved_probs (`torch.FloatTensor` of shape `(B, C)`, *optional*): `Σ_j w_j · y_j` over the
            retrieved neighbours' soft labels. `None` when retrieval was skipped.
        neighbor_ids (`torch.LongTensor` of shape `(B, k)`, *optional*): KB rows of the neighbours, best first.
        neighbor_scores (`torch.FloatTensor` of shape `(B, k)`, *optional*): their cosine similarities.
        neighbor_weights (`torch.FloatTensor` of shape `(B, k)`, *optional*): `softmax(scores / τ_r)`.
        hidden_states, attentions (*optional*): the encoder's, with `output_hidden_states` / `output_attentions`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    sentence_embedding: torch.FloatTensor | None = None
    query_embedding: torch.FloatTensor | None = None
    retrieved_probs: torch.FloatTensor | None = None
    neighbor_ids: torch.LongTensor | None = None
    neighbor_scores: torch.FloatTensor | None = None
    neighbor_weights: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ReAugKDSequenceClassifierOutput(ModelOutput):
    """
    Outputs of `ReAugKDForSequenceClassification`.

    Args:
        loss (`torch.FloatTensor`, *optional*): the loss of `labels` under the mixed prediction: negative
            log-likelihood (single-label), binary cross-entropy (multi-label) or squared error (regression).
        logits (`torch.FloatTensor` of shape `(B, C)`): the mixture `β · retrieved + (1 − β) · student` as logits
            (`mixture_logits`): their softmax (single-label) or sigmoid (multi-label) gives back the mixed
            probabilities, which is what `pipeline` shows; for regression `(B, 1)`, the mixed prediction itself.
        student_logits (`torch.FloatTensor` of shape `(B, C)`): the student classifier's own logits.
        retrieved_probs (`torch.FloatTensor` of shape `(B, C)`, *optional*): the retrieved label distribution.
        query_embedding (`torch.FloatTensor` of shape `(B, kb_dim)`): the normalised KB query.
        neighbor_ids, neighbor_scores, neighbor_weights (*optional*, `(B, k)`): returned with
            `output_neighbors=True`.
        hidden_states, attentions (*optional*): the encoder's, with `output_hidden_states` / `output_attentions`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    student_logits: torch.FloatTensor | None = None
    retrieved_probs: torch.FloatTensor | None = None
    query_embedding: torch.FloatTensor | None = None
    neighbor_ids: torch.LongTensor | None = None
    neighbor_scores: torch.FloatTensor | None = None
    neighbor_weights: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def neighbor_label_distribution(
    scores: torch.Tensor,
    ids: torch.Tensor,
    soft_labels: torch.Tensor,
    retrieval_temperature: float,
    all_found: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The label distribution the retrieved neighbours vote for: `Σ_j softmax(s_j / τ_r) · y_j`.

    The values `y_j` are whatever the knowledge base holds: class distributions, per-label probabilities, or the
    teacher's numbers for regression (the similarity-weighted mean of the neighbours' values). Missing hits (id -1,
    score -inf: an approximate index may find fewer than k) get weight 0; a query with no hit at all gets an all-zero
    row, and a top similarity of -inf, which `mix_probabilities` reads as "nothing retrieved". This is the only
    implementation: `forward` and the package's evaluation (the k/β grid on validation) both call it.

    Args:
        scores, ids (`torch.Tensor` of shape `(B, k)`): search results, best first.
        soft_labels (`torch.Tensor` of shape `(N, C)`): the knowledge base's values.
        retrieval_temperature (`float`): τ_r.
        all_found (`bool`, defaults to `False`): no id is -1, as with an exhaustive search
            (`KnowledgeBase.exhaustive`). The masking of missing hits is then skipped: the same result with four ops
            fewer (with `mix_probabilities`' own check, 0.075–0.085 ms inside a batch-1 forward on 2 CPU cores, in
            two probes).

    Returns:
        `(retrieved_probs (B, C), weights (B, k))`.
    """
    # shifted by each query's best score before dividing: the best neighbour's logit is 0, never inf, for any τ_r
    scores = scores.float()
    logits = (scores - scores.amax(dim=-1, keepdim=True)) / retrieval_temperature  # (B, k)
    if all_found:
        weights = torch.softmax(logits, dim=-1)  # (B, k)
    else:
        logits = logits.masked_fill(ids < 0, float("-inf"))  # (B, k)
        weights = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # (B, k); a row without hits is NaN: 0
        ids = ids.clamp_min(0)  # (B, k): any valid row for the missing hits, which weigh 0
    neighbor_labels = soft_labels.index_select(0, ids.flatten()).view(*ids.shape, -1)  # (B, k, C)
    retrieved_probs = torch.bmm(weights.unsqueeze(1), neighbor_labels.float()).squeeze(1)  # (B, C)
    return retrieved_probs, weights


def mix_probabilities(
    student_probs: torch.Tensor,
    retrieved_probs: torch.Tensor,
    retrieval_weight: float | torch.Tensor,
    top_similarity: torch.Tensor | None = None,
) -> torch.Tensor:
    """`β · retrieved + (1 − β) · student` `(B, C)`, with one β or one per query (`(B, 1)`, see
    `gated_retrieval_weight`), for any kind of value (probabilities or regression outputs). A query for which
    retrieval found nothing (its nearest similarity `top_similarity` `(B,)` is -inf) keeps the student's own
    prediction; without `top_similarity` every query has hits (an exhaustive search), and the check is skipped. In
    fp32, whatever the inputs' dtypes. The only implementation of the mixing."""
    student_probs, retrieved_probs = student_probs.float(), retrieved_probs.float()  # lerp takes one dtype
    mixed = torch.lerp(student_probs, retrieved_probs, retrieval_weight)  # (B, C): one op, not four
    if top_similarity is None:
        return mixed
    found = (top_similarity > float("-inf")).unsqueeze(-1)  # (B, 1): a comparison exports to ONNX, isfinite not
    return torch.where(found, mixed, student_probs)


def mixture_logits(mixed: torch.Tensor, problem_type: str) -> torch.Tensor:
    """Logits `(B, C)` whose `value_predictions` are `mixed` `(B, C)`: `log p` (softmax gives `p` back), `logit p`
    (sigmoid does), or the regression output as it is."""
    if problem_type == REGRESSION:
        return mixed
    if problem_type == MULTI_LABEL:
        return torch.logit(mixed, eps=1e-7)  # eps: a neighbour vote of exactly 0 or 1 stays finite
    return mixed.clamp_min(torch.finfo(mixed.dtype).tiny).log()


def retrieval_gate_features(
    top_similarity: torch.Tensor, retrieved_probs: torch.Tensor, student_probs: torch.Tensor
) -> torch.Tensor:
    """The features `(B, 4)` of `settings_reaugkd.RETRIEVAL_GATE_FEATURES`: how close the nearest teacher example is (cosine), how
    strongly the neighbours vote (largest retrieved probability), and how unsure the retrieved vote and the student
    are (entropies divided by log C, so the same gate reads the same on any number of classes). A query without hits
    reads 0 for its similarity and retrieved features."""
    log_classes = math.log(max(student_probs.shape[-1], 2))

    def entropy(probs: torch.Tensor) -> torch.Tensor:  # (B, C) -> (B,)
        return -(probs * probs.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(-1) / log_classes

    top_similarity = top_similarity.float().nan_to_num(0.0, posinf=0.0, neginf=0.0)  # (B,): no hit is -inf
    features = [top_similarity, retrieved_probs.amax(-1), entropy(retrieved_probs), entropy(student_probs)]
    return torch.stack(features, dim=-1)  # (B, 4)


def gated_retrieval_weight(features: torch.Tensor, gate: list[float]) -> torch.Tensor:
    """Per-query β(x) = σ(w · features + b) `(B, 1)`, from `gate` = `[w_1, ..., w_F, b]`. The only implementation:
    `forward` and the fitting on validation both call it."""
    gate = torch.as_tensor(gate, dtype=features.dtype, device=features.device)  # (F + 1,)
    return torch.sigmoid(features @ gate[:-1] + gate[-1]).unsqueeze(-1)  # (B, 1)


def mix_retrieval(
    student_probs: torch.Tensor,
    retrieved_probs: torch.Tensor,
    top_similarity: torch.Tensor,
    retrieval_weight: float | torch.Tensor,
    gate: list[float] | torch.Tensor | None = None,
    all_found: bool = False,
) -> torch.Tensor:
    """The prediction `(B, C)`: the student `(B, C)` mixed with its retrieved labels `(B, C)` at the β
    `retrieval_weight` or, with `gate` and a `retrieval_weight` below 0 (`GATE_SENTINEL`), at the per-query β(x) read
    from the gate's features (`top_similarity` `(B,)` is each query's nearest similarity). β may be a tensor: the ONNX
    graph takes it as a run-time input whose default is the sentinel. The one place gate and mixing are chained:
    `forward`, the evaluation of a fitted gate and the exported graph all call it."""
    if gate is None and not torch.is_tensor(retrieval_weight) and retrieval_weight < 0:
        raise ValueError(f"retrieval_weight {retrieval_weight} < 0 stands for a per-query gate, and none is given.")
    if gate is not None:
        features = retrieval_gate_features(top_similarity, retrieved_probs, student_probs)  # (B, F)
        gated = gated_retrieval_weight(features, gate)  # (B, 1)
        given = torch.as_tensor(retrieval_weight, dtype=gated.dtype, device=gated.device).reshape(-1, 1)  # (1, 1)
        retrieval_weight = torch.where(given < 0, gated, given)  # (B, 1)
    return mix_probabilities(student_probs, retrieved_probs, retrieval_weight, None if all_found else top_similarity)


def prediction_loss(logits: torch.Tensor, labels: torch.Tensor, problem_type: str) -> torch.Tensor:
    """The loss of gold `labels` under `logits` as `forward` returns them: negative log-likelihood of class ids
    `(B,)`, binary cross-entropy per label of 0/1 targets `(B, C)`, or the squared error of numbers `(B,)`."""
    if problem_type == REGRESSION:
        return nn.functional.mse_loss(logits.squeeze(-1), labels.float())
    if problem_type == MULTI_LABEL:
        return nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
    return nn.functional.nll_loss(logits, labels)


def mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Attention-masked mean of token states `(B, T, H)` → `(B, H)` (the sentence-transformers pooling)."""
    if attention_mask is None:
        return hidden_states.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)  # (B, T, 1)
    return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)  # (B, H)


def knowledge_base_from_config(config: ReAugKDConfig) -> KnowledgeBase:
    """An empty KB with the shapes and index settings the config records (filled by loading or by build)."""
    index_params = {name: getattr(config, name) for name in INDEX_SETTINGS}
    return KnowledgeBase(
        config.kb_size,
        config.kb_dim,
        config.num_labels,
        config.index_type,
        config.index_nbytes,
        config.index_sha256,
        problem_type_of(config),
        **index_params,
    )


class ReAugKDPreTrainedModel(PreTrainedModel):
    config_class = ReAugKDConfig
    base_model_prefix = "reaugkd"
    # Keys and soft labels stay fp32 when loading with `dtype=torch.float16/bfloat16`: similarities between unit
    # vectors lose neighbour order in half precision. (The uint8 index bytes are never cast.)
    _keep_in_fp32_modules_strict = ["knowledge_base.keys", "knowledge_base.values"]
    _supports_sdpa = True
    # The encoder's layers checkpoint themselves (`--activation_checkpointing`); the heads are single linear layers.
    supports_gradient_checkpointing = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, KnowledgeBase):
            init.zeros_(module.keys)
            init.zeros_(module.values)
            init.zeros_(module.index_bytes)
        else:
            super()._init_weights(module)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then a check that the loaded knowledge base is valid.

        Invalid keys or soft labels, and index bytes that are not a well-formed index of the knowledge base, raise a
        ValueError. A well-formed HNSW/IVF index that does not hold what was built (checksum, FAISS read or
        consistency check fails) is rebuilt from the keys with a warning; see `knowledge_base.py`. A local folder
        whose config, weights and texts disagree is read again (up to `LOAD_ATTEMPTS` times) before that is an
        error: `kb add` may have replaced it, whole, between two of the files being read.
        """
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        attempts = LOAD_ATTEMPTS if os.path.isdir(str(source)) else 1  # Hub snapshots never change
        for attempt in range(1, attempts + 1):
            try:
                return cls._load_checked(source, args, kwargs, last_attempt=attempt == attempts)
            except FolderChangedError:
                logger.info("%s changed while it was loading (an edit?): reading it again", source)
                if is_reaugkd_config(kwargs.get("config")):  # `pipeline()` passes the config it read first
                    kwargs = {**kwargs, "config": with_stored_kb_fields(kwargs["config"], source)}
        raise AssertionError("unreachable: the last attempt raises ValueError")

    @classmethod
    def _load_checked(cls, source, args: tuple, kwargs: dict, last_attempt: bool):
        error = ValueError if last_attempt else FolderChangedError
        # Before anything is allocated: the config sizes the knowledge base, and an untrusted one could ask for far
        # more memory than the weights file holds.
        config, shapes = checkpoint_shapes(source, kwargs)
        mismatches = kb_shape_mismatches(config, shapes)
        if shapes is not None and mismatches:
            raise error(describe_shape_mismatch(config, source, mismatches))
        try:
            loaded = super().from_pretrained(*args, **kwargs)
        except RuntimeError as err:
            if "ignore_mismatched_sizes" not in str(err):
                raise
            mismatches = mismatches or shape_mismatches(cls, config, shapes) or ["see the load report above"]
            raise error(describe_shape_mismatch(config, source, mismatches)) from err
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        non_finite = non_finite_tensors(model)
        if non_finite:
            raise ValueError(
                f"The weights of {source} hold NaN or infinite values in {', '.join(non_finite[:5])}"
                f"{f' (and {len(non_finite) - 5} more)' if len(non_finite) > 5 else ''}: the model would answer NaN. "
                "The checkpoint is corrupt (or was trained into NaN): save or download it again."
            )
        if model.config.kb_size > 0:
            knowledge_base = model.knowledge_base
            try:
                knowledge_base.validate(model.config.num_labels, repair_index=True)
            except ValueError as err:
                raise ValueError(f"The knowledge base stored in {source} is invalid: {err}") from err
            # A rebuilt index (or the checksum of a verified older one) is what saving the model must record.
            model.config.index_nbytes = knowledge_base.index_bytes.numel()
            model.config.index_sha256 = knowledge_base.index_sha256
            if model.config.kb_has_texts:
                knowledge_base.set_texts(None, loader=texts_loader(source, model.config, kwargs, last_attempt))
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, plus the knowledge base's texts (when stored) in their own file, their
        SHA-256 in the config."""
        knowledge_base = getattr(self, self.base_model_prefix, self).knowledge_base
        encoded = encode_texts(knowledge_base.texts) if knowledge_base.has_texts else None
        self.config.kb_texts_sha256 = texts_sha256(encoded) if encoded is not None else None
        super().save_pretrained(save_directory, *args, **kwargs)
        if encoded is not None and kwargs.get("is_main_process", True):
            save_file(encoded, os.path.join(save_directory, TEXTS_FILE))  # numpy: the torch-free runtime reads it too

    def set_knowledge_base(self, knowledge_base: KnowledgeBase) -> None:
        """Attach `knowledge_base` and record its shape and index settings in the config (so saving works)."""
        config = self.config
        if knowledge_base.dim != config.kb_dim or knowledge_base.num_labels != config.num_labels:
            raise ValueError(
                f"The knowledge base has keys of dim {knowledge_base.dim} and {knowledge_base.num_labels} classes; "
                f"this model expects kb_dim={config.kb_dim} and num_labels={config.num_labels}."
            )
        if knowledge_base.problem_type != problem_type_of(config):
            raise ValueError(
                f"The knowledge base holds {knowledge_base.problem_type} values; this model is for "
                f"{problem_type_of(config)}."
            )
        config.kb_size = knowledge_base.size
        config.index_type = knowledge_base.index_type
        config.index_nbytes = knowledge_base.index_bytes.numel()
        config.index_sha256 = knowledge_base.index_sha256
        config.kb_has_texts = knowledge_base.has_texts
        for name, value in knowledge_base.index_params.items():
            setattr(config, name, value)
        base = getattr(self, self.base_model_prefix, self)
        base.knowledge_base = knowledge_base.to(self.device)


class ReAugKDModel(ReAugKDPreTrainedModel):
    """Student encoder + projection head into the teacher's KB space + the teacher's knowledge base."""

    # A classifier checkpoint loads into this base model; its head is expected to be left out.
    _keys_to_ignore_on_load_unexpected = [r"^classifier\."]

    def __init__(self, config: ReAugKDConfig):
        super().__init__(config)
        self.encoder = AutoModel.from_config(config.encoder_config)
        self.projection = nn.Linear(config.encoder_config.hidden_size, config.kb_dim)
        self.knowledge_base = knowledge_base_from_config(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.encoder.set_input_embeddings(value)

    def pool(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Sentence embedding `(B, H)` from token states `(B, T, H)`: CLS token or attention-masked mean."""
        if self.config.pooling == "cls":
            return hidden_states[:, 0]
        return mean_pool(hidden_states, attention_mask)

    def retrieve(
        self, query_embedding: torch.Tensor, knn_k: int, retrieval_temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k neighbours of each query and the label distribution they vote for.

        Returns `(retrieved_probs (B, C), neighbor_ids (B, k), neighbor_scores (B, k), neighbor_weights (B, k))`.
        """
        scores, ids = self.knowledge_base.search(query_embedding, knn_k)  # (B, k), (B, k)
        retrieved_probs, weights = neighbor_label_distribution(
            scores, ids, self.knowledge_base.values, retrieval_temperature, all_found=self.knowledge_base.exhaustive
        )
        return retrieved_probs, ids, scores, weights

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        knn_k: int | None = None,
        retrieval_temperature: float | None = None,
        retrieve: bool = True,
    ) -> ReAugKDModelOutput | tuple:
        r"""
        knn_k (`int`, *optional*): neighbours to retrieve; defaults to `config.knn_k`.
        retrieval_temperature (`float`, *optional*): τ_r; defaults to `config.retrieval_temperature`.
        retrieve (`bool`, defaults to `True`): search the KB. `False` returns embeddings only (training).
        """
        knn_k = self.config.knn_k if knn_k is None else knn_k
        retrieval_temperature = (
            self.config.retrieval_temperature if retrieval_temperature is None else retrieval_temperature
        )
        if retrieve:
            check_positive_integer("knn_k", knn_k)
            check_retrieval_temperature(retrieval_temperature)
        # Only pass what was given: not every encoder accepts e.g. token_type_ids (MPNet does not).
        encoder_inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "position_ids": position_ids,
            "inputs_embeds": inputs_embeds,
            "output_attentions": output_attentions,
            "output_hidden_states": output_hidden_states,
        }
        encoder_inputs = {name: value for name, value in encoder_inputs.items() if value is not None}
        encoded = self.encoder(**encoder_inputs, return_dict=True)
        hidden_states = encoded.last_hidden_state  # (B, T, H)
        sentence_embedding = self.pool(hidden_states, attention_mask)  # (B, H)
        query_embedding = nn.functional.normalize(self.projection(sentence_embedding), dim=-1)  # (B, kb_dim)

        retrieved = (None, None, None, None)
        if retrieve:
            retrieved = self.retrieve(query_embedding, knn_k, retrieval_temperature)
        retrieved_probs, neighbor_ids, neighbor_scores, neighbor_weights = retrieved
        output = ReAugKDModelOutput(
            last_hidden_state=hidden_states,
            sentence_embedding=sentence_embedding,
            query_embedding=query_embedding,
            retrieved_probs=retrieved_probs,
            neighbor_ids=neighbor_ids,
            neighbor_scores=neighbor_scores,
            neighbor_weights=neighbor_weights,
            hidden_states=encoded.get("hidden_states"),
            attentions=encoded.get("attentions"),
        )
        return output if _return_dict(return_dict, self.config) else output.to_tuple()


def _return_dict(return_dict: bool | None, config: ReAugKDConfig) -> bool:
    return return_dict if return_dict is not None else getattr(config, "return_dict", True)


class ReAugKDForSequenceClassification(ReAugKDPreTrainedModel):
    """The retrieval-augmented student classifier (ReAugKD, ACL 2023: retrieval-augmented inference)."""

    def __init__(self, config: ReAugKDConfig):
        super().__init__(config)
        self.reaugkd = ReAugKDModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.encoder_config.hidden_size, config.num_labels)
        self.post_init()

    @property
    def knowledge_base(self) -> KnowledgeBase:
        return self.reaugkd.knowledge_base

    @classmethod
    def from_encoder(
        cls,
        encoder: PreTrainedModel,
        id2label: dict[int, str],
        knowledge_base: KnowledgeBase | None = None,
        projection: nn.Linear | None = None,
        classifier: nn.Linear | None = None,
        **config_kwargs,
    ) -> "ReAugKDForSequenceClassification":
        """Assemble a student from a (pretrained) encoder and, optionally, a trained projection head,
        classifier and knowledge base; the parts not given start freshly initialised.

        Args:
            encoder (`PreTrainedModel`): any `AutoModel` encoder (BERT, MPNet, ...); its weights are copied.
            id2label (`dict[int, str]`): the task's labels.
            knowledge_base (`KnowledgeBase`, *optional*): the teacher's KB; sets `kb_dim` and the index settings.
            projection (`nn.Linear`, *optional*): `hidden_size → kb_dim` head, e.g. trained during distillation.
            classifier (`nn.Linear`, *optional*): `hidden_size → num_labels` head.
            config_kwargs: any other `ReAugKDConfig` field (`pooling`, `kb_dim`, `knn_k`, `retrieval_weight`, ...).
        """
        if knowledge_base is not None:
            config_kwargs["kb_dim"] = knowledge_base.dim
        elif projection is not None:
            config_kwargs["kb_dim"] = projection.out_features
        # not where the encoder was loaded from: a local path means nothing on the Hub and reveals the user's machine
        encoder_config = {key: value for key, value in encoder.config.to_dict().items() if key != "_name_or_path"}
        config = ReAugKDConfig(
            encoder_config=encoder_config,
            id2label=dict(id2label),
            label2id={label: i for i, label in id2label.items()},
            **config_kwargs,
        )
        model = cls(config)
        model.reaugkd.encoder.load_state_dict(encoder.state_dict())
        if projection is not None:
            model.reaugkd.projection.load_state_dict(projection.state_dict())
        if classifier is not None:
            model.classifier.load_state_dict(classifier.state_dict())
        if knowledge_base is not None:
            model.set_knowledge_base(knowledge_base)
        return model

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        knn_k: int | None = None,
        retrieval_weight: float | None = None,
        retrieval_temperature: float | None = None,
        output_neighbors: bool = False,
    ) -> ReAugKDSequenceClassifierOutput | tuple:
        r"""
        labels (`torch.Tensor`, *optional*): gold labels for the returned loss: class ids `(B,)` (single-label),
            0/1 per label `(B, C)` (multi-label) or numbers `(B,)` (regression).
        knn_k, retrieval_weight, retrieval_temperature (*optional*): per-call overrides of the config's k, β, τ_r.
            `retrieval_weight=0` skips retrieval: the output is the plain student. A given `retrieval_weight` also
            replaces the per-query β(x) of `config.retrieval_gate`.
        output_neighbors (`bool`, defaults to `False`): also return neighbour ids, scores and weights (searched even
            at `retrieval_weight=0`, where they explain but do not change the plain student's prediction).
        """
        beta = self.config.retrieval_weight if retrieval_weight is None else retrieval_weight
        check_retrieval_weight(beta)
        gate = self.config.retrieval_gate if retrieval_weight is None else None
        if gate is not None:  # set on the config after it was validated, perhaps
            check_retrieval_gate(gate)
        outputs = self.reaugkd(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            knn_k=knn_k,
            retrieval_temperature=retrieval_temperature,
            # neighbours on request, also to explain the plain student
            retrieve=beta > 0 or gate is not None or output_neighbors,
        )
        student_logits = self.classifier(self.dropout(outputs.sentence_embedding))  # (B, C)
        problem_type = problem_type_of(self.config)
        if beta > 0 or gate is not None:
            mixed = mix_retrieval(
                value_predictions(student_logits, problem_type),
                outputs.retrieved_probs,
                outputs.neighbor_scores[:, 0],
                GATE_SENTINEL if gate is not None else beta,
                gate,
                all_found=self.knowledge_base.exhaustive,
            )  # (B, C)
            logits = mixture_logits(mixed, problem_type)  # (B, C)
        elif problem_type == SINGLE_LABEL:
            logits = torch.log_softmax(student_logits.float(), dim=-1)  # (B, C)
        else:
            logits = student_logits.float()  # (B, C): already the logits (or the number) of the prediction

        loss = None
        if labels is not None:
            loss = prediction_loss(logits, labels.to(logits.device), problem_type)
        output = ReAugKDSequenceClassifierOutput(
            loss=loss,
            logits=logits,
            student_logits=student_logits,
            retrieved_probs=outputs.retrieved_probs,
            query_embedding=outputs.query_embedding,
            neighbor_ids=outputs.neighbor_ids if output_neighbors else None,
            neighbor_scores=outputs.neighbor_scores if output_neighbors else None,
            neighbor_weights=outputs.neighbor_weights if output_neighbors else None,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if _return_dict(return_dict, self.config) else output.to_tuple()


ReAugKDConfig.register_for_auto_class()
ReAugKDModel.register_for_auto_class("AutoModel")
ReAugKDForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "gated_retrieval_weight",
    "mix_probabilities",
    "mix_retrieval",
    "mixture_logits",
    "prediction_loss",
    "value_predictions",
    "retrieval_gate_features",
    "neighbor_label_distribution",
    "ReAugKDModel",
    "ReAugKDForSequenceClassification",
    "ReAugKDPreTrainedModel",
    "ReAugKDModelOutput",
    "ReAugKDSequenceClassifierOutput",
]
