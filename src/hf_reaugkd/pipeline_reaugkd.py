"""`pipeline("text-classification", model=<ReAugKD checkpoint>, trust_remote_code=True)`.

This file travels with saved checkpoints as remote code (`config.custom_pipelines` names it). It is the stock
`TextClassificationPipeline` — same `[{"label", "score"}]` output, the scores being the mixed prediction — with:
- the output of the task type (`config.problem_type`): the best class's probability, every label's probability with
  `predicted` at `config.multi_label_threshold` (multi-label; all labels unless `top_k` is given), or the predicted
  number (regression);
- long inputs truncated by default to what the encoder can take (no crash on a 2,000-token text), and cut to
  `MAX_TEXT_CHARS` characters before tokenizing (a 1 GB text is not tokenized whole);
- per-call `knn_k`, `retrieval_weight` and `retrieval_temperature`, as in the model's `forward`;
- `neighbors=K`: each result also lists the K best of the knowledge-base entries that drove the prediction
  (row id, similarity, weight, the teacher's label and label distribution — its labels and per-label
  probabilities, or its number —, and its text when the knowledge base stores texts), and the student-only and
  retrieved predictions.
"""

from typing import Any

import torch
from transformers import TextClassificationPipeline
from transformers.pipelines.text_classification import ClassificationFunction

from .knowledge_base import value_predictions
from .settings_reaugkd import (
    MULTI_LABEL,
    REGRESSION,
    check_positive_integer,
    check_top_k,
    cut_to_max_chars,
    problem_type_of,
)

# The scores of the mixture in each task type: `forward`'s logits are log-probabilities (single-label), per-label
# logits (multi-label) or the number itself (regression), whatever the config's num_labels would make the stock
# pipeline apply (it takes one label for a sigmoid).
SCORE_FUNCTIONS = {MULTI_LABEL: ClassificationFunction.SIGMOID, REGRESSION: ClassificationFunction.NONE}


def max_input_length(config, tokenizer) -> int:
    """The most tokens the student's encoder takes: its position embeddings, or the tokenizer's limit if smaller."""
    positions = getattr(config.encoder_config, "max_position_embeddings", None) or tokenizer.model_max_length
    return min(tokenizer.model_max_length, positions)


class ReAugKDTextClassificationPipeline(TextClassificationPipeline):
    """Text classification with a retrieval-augmented student; see the module docstring."""

    def check_model_type(self, supported_models) -> None:
        """Nothing to check: the model is this checkpoint's remote code, never in transformers' task mapping (the
        stock check would log that it is "not supported")."""

    def _sanitize_parameters(
        self,
        neighbors: int | None = None,
        knn_k: int | None = None,
        retrieval_weight: float | None = None,
        retrieval_temperature: float | None = None,
        **kwargs,
    ):
        problem_type = problem_type_of(self.model.config)
        if "top_k" in kwargs:
            check_top_k(kwargs["top_k"])
        if problem_type == MULTI_LABEL and "top_k" not in kwargs:
            kwargs["top_k"] = None  # every label's score: a multi-label prediction is a set
        preprocess, _, postprocess = super()._sanitize_parameters(**kwargs)
        postprocess.setdefault("function_to_apply", SCORE_FUNCTIONS.get(problem_type, ClassificationFunction.SOFTMAX))
        if "truncation" not in preprocess:
            preprocess["truncation"] = True
            preprocess.setdefault("max_length", max_input_length(self.model.config, self.tokenizer))
        if neighbors is not None:
            check_positive_integer("neighbors", neighbors)
        forward = {
            "knn_k": knn_k,
            "retrieval_weight": retrieval_weight,
            "retrieval_temperature": retrieval_temperature,
            "output_neighbors": neighbors is not None,
        }
        if neighbors is not None:
            postprocess["neighbors"] = neighbors
        return preprocess, forward, postprocess

    def preprocess(self, inputs, **tokenizer_kwargs):
        return super().preprocess(cut_to_max_chars(inputs), **tokenizer_kwargs)

    def _forward(self, model_inputs: dict, **forward_params) -> Any:
        return self.model(**model_inputs, **forward_params)

    def postprocess(self, model_outputs, neighbors: int | None = None, **kwargs):
        config = self.model.config
        problem_type = problem_type_of(config)
        result = super().postprocess(model_outputs, **kwargs)
        if problem_type == MULTI_LABEL:
            for item in [result] if isinstance(result, dict) else result:
                item["predicted"] = item["score"] >= config.multi_label_threshold
        if neighbors is None:
            return result
        id2label = config.id2label
        knowledge_base = self.model.knowledge_base
        explained = {} if isinstance(result, dict) else {"scores": result}
        if isinstance(result, dict):
            explained.update(result)
        student = value_predictions(model_outputs["student_logits"][:1], problem_type)[0]  # (C,)
        explained["student_scores"] = {id2label[i]: p for i, p in enumerate(student.tolist())}
        retrieved = model_outputs["retrieved_probs"]
        explained["retrieved_scores"] = {id2label[i]: p for i, p in enumerate(retrieved[0].tolist())}
        rows = []
        for row, similarity, weight in zip(
            model_outputs["neighbor_ids"][0].tolist(),
            model_outputs["neighbor_scores"][0].tolist(),
            model_outputs["neighbor_weights"][0].tolist(),
            strict=True,
        ):
            if row < 0:  # a missing hit of an approximate index
                continue
            value = knowledge_base.values[row].float().cpu()  # (C,)
            if problem_type == REGRESSION:
                entry = {"value": value[0].item()}
            elif problem_type == MULTI_LABEL:
                entry = {
                    "labels": [id2label[i] for i, p in enumerate(value.tolist()) if p >= config.multi_label_threshold],
                    "label_scores": {id2label[i]: p for i, p in enumerate(value.tolist())},
                }
            else:
                entry = {
                    "label": id2label[int(torch.argmax(value))],
                    "label_distribution": {id2label[i]: p for i, p in enumerate(value.tolist())},
                }
            rows.append(
                {
                    "id": row,
                    "similarity": similarity,
                    "weight": weight,
                    **entry,
                    **({"text": knowledge_base.texts[row]} if knowledge_base.has_texts else {}),
                }
            )
        explained["neighbors"] = rows[:neighbors]
        return explained


__all__ = ["ReAugKDTextClassificationPipeline", "max_input_length"]
