"""`pipeline("text-classification", model=<ReAugKD checkpoint>, trust_remote_code=True)`.

This file travels with saved checkpoints as remote code (`config.custom_pipelines` names it). It is the stock
`TextClassificationPipeline` — same `[{"label", "score"}]` output, the scores being the mixed probabilities — with:
- long inputs truncated by default to what the encoder can take (no crash on a 2,000-token text);
- per-call `knn_k`, `retrieval_weight` and `retrieval_temperature`, as in the model's `forward`;
- `neighbors=K`: each result also lists the K best of the knowledge-base entries that drove the prediction
  (row id, similarity, weight, the teacher's label and label distribution, and its text when the knowledge base
  stores texts), and the student-only and retrieved distributions.
"""

from typing import Any

import torch
from transformers import TextClassificationPipeline
from transformers.pipelines.text_classification import ClassificationFunction

from .settings_reaugkd import check_positive_integer


def max_input_length(config, tokenizer) -> int:
    """The most tokens the student's encoder takes: its position embeddings, or the tokenizer's limit if smaller."""
    positions = getattr(config.encoder_config, "max_position_embeddings", None) or tokenizer.model_max_length
    return min(tokenizer.model_max_length, positions)


class ReAugKDTextClassificationPipeline(TextClassificationPipeline):
    """Text classification with a retrieval-augmented student; see the module docstring."""

    def _sanitize_parameters(
        self,
        neighbors: int | None = None,
        knn_k: int | None = None,
        retrieval_weight: float | None = None,
        retrieval_temperature: float | None = None,
        **kwargs,
    ):
        preprocess, _, postprocess = super()._sanitize_parameters(**kwargs)
        # The logits are log-probabilities of the mixture: softmax gives it back, whatever the config's num_labels or
        # problem_type would make the stock pipeline apply (a sigmoid for one label or multi-label).
        postprocess.setdefault("function_to_apply", ClassificationFunction.SOFTMAX)
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

    def _forward(self, model_inputs: dict, **forward_params) -> Any:
        return self.model(**model_inputs, **forward_params)

    def postprocess(self, model_outputs, neighbors: int | None = None, **kwargs):
        result = super().postprocess(model_outputs, **kwargs)
        if neighbors is None:
            return result
        id2label = self.model.config.id2label
        knowledge_base = self.model.knowledge_base
        explained = {} if isinstance(result, dict) else {"scores": result}
        if isinstance(result, dict):
            explained.update(result)
        student = model_outputs["student_logits"][0].float().softmax(-1)  # (C,)
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
            soft_label = knowledge_base.values[row].float().cpu()  # (C,)
            rows.append(
                {
                    "id": row,
                    "similarity": similarity,
                    "weight": weight,
                    "label": id2label[int(torch.argmax(soft_label))],
                    "label_distribution": {id2label[i]: p for i, p in enumerate(soft_label.tolist())},
                    **({"text": knowledge_base.texts[row]} if knowledge_base.has_texts else {}),
                }
            )
        explained["neighbors"] = rows[:neighbors]
        return explained


__all__ = ["ReAugKDTextClassificationPipeline", "max_input_length"]
