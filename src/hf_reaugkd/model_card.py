"""Model cards for ReAugKD students: Hub metadata (model-index) plus a README rendered from `model_card_template.md`.

The template lives at the repository root; `hf_reaugkd/model_card_template.md` is a symlink to it, so there is one
copy to edit, and setuptools copies the target into wheels.
"""

import os
import platform
import re
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .caching import atomic_path
from .settings_reaugkd import MULTI_LABEL, REGRESSION, SINGLE_LABEL

TAGS = ["reaugkd", "knowledge-distillation", "custom_code", "text-classification"]
# (metrics key, row label in the evaluation table); "student" is the same checkpoint with β = 0.
MODEL_ROWS = [
    ("teacher", "Teacher"),
    ("student", "Student, β = 0"),
    ("student_retrieval", "Student + retrieval"),
    ("student_retrieval_gated", "Student + retrieval, per-query β(x)"),
]
# Per task type: (metrics key, model-index metric type, pretty name, metric args, a fraction shown as %). Regression
# reports GLUE's STS-B metrics, correlations in [-1, 1], and the squared error in the labels' unit.
METRICS = {
    SINGLE_LABEL: [
        ("accuracy", "accuracy", "Accuracy", None, True),
        ("macro_f1", "f1", "Macro-F1", {"average": "macro"}, True),
    ],
    MULTI_LABEL: [
        ("micro_f1", "f1", "Micro-F1", {"average": "micro"}, True),
        ("macro_f1", "f1", "Macro-F1", {"average": "macro"}, True),
        ("exact_match", "exact_match", "Exact match", None, True),
    ],
    REGRESSION: [
        ("pearson", "pearsonr", "Pearson", None, False),
        ("spearman", "spearmanr", "Spearman", None, False),
        ("mse", "mse", "MSE", None, False),
    ],
}
RETRIEVAL_KEYS = ("knn_k", "retrieval_weight", "retrieval_temperature", "index_type", "kb_size", "kb_dim")
LOCAL_PATH_PLACEHOLDER = "path/to/checkpoint"
EXAMPLE_TEXT = "A gripping story with a wonderful cast."


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def hub_id(name: str | None) -> str | None:
    """`name` if it can be a Hub repo id (`org/name` or `name`) and is not a local folder; else None. Local paths
    never go into the card's metadata or links: they mean nothing on the Hub and may reveal the user's machine."""
    if not name or not _HUB_ID.match(name) or os.path.exists(name):
        return None
    return name


def _reference(name: str, kind: str = "") -> str:
    """A Markdown link to a Hub repo, or the plain name of a local checkpoint / a described dataset."""
    if hub_id(name):
        return f"[{name}](https://huggingface.co/{kind}{name})"
    if os.path.exists(name):
        return f"a local checkpoint (`{os.path.basename(os.path.normpath(name))}`)"
    return name


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:  # e.g. running from a source tree that is not installed
        return "unknown"


def _framework_versions() -> dict[str, str]:
    """Versions read from package metadata, so writing a card does not import torch."""
    return {
        "Python": platform.python_version(),
        "Transformers": _package_version("transformers"),
        "PyTorch": _package_version("torch"),
        "hf-reaugkd": _package_version("hf-reaugkd"),
    }


def _eval_results(
    metrics: dict[str, dict[str, dict[str, float]]],
    dataset_name: str | None,
    model_key: str = "student_retrieval",
    problem_type: str = SINGLE_LABEL,
) -> list[EvalResult]:
    """One result per split × metric for the retrieval-augmented student: the model this checkpoint serves."""
    dataset = hub_id(dataset_name) or "custom"
    if dataset_name and os.path.exists(dataset_name):  # a local folder: its name only, as in the card's text
        dataset_name = os.path.basename(os.path.normpath(dataset_name))
    results = []
    for split, per_model in metrics.items():
        for key, metric_type, pretty_name, metric_args, _ in METRICS[problem_type]:
            if key not in per_model.get(model_key, {}):
                continue
            results.append(
                EvalResult(
                    task_type="text-classification",
                    task_name="Text Classification",
                    dataset_type=dataset,
                    dataset_name=dataset_name or dataset,
                    dataset_split=split,
                    metric_type=metric_type,
                    metric_name=pretty_name,
                    metric_args=metric_args,
                    metric_value=float(per_model[model_key][key]),
                )
            )
    return results


def _check_inputs(
    metrics: dict[str, dict[str, dict[str, float]]], retrieval: dict[str, Any], problem_type: str
) -> None:
    """Fail early instead of rendering blanks (missing retrieval keys) or 8130% (metrics passed as percentages)."""
    missing = [key for key in RETRIEVAL_KEYS if key not in retrieval]
    if missing:
        raise ValueError(f"`retrieval` is missing {missing}")
    fractions = {key for key, *_, is_fraction in METRICS[problem_type] if is_fraction}
    for split, per_model in metrics.items():
        for model_key, values in per_model.items():
            for name, value in values.items():
                if name in fractions and not 0.0 <= value <= 1.0:
                    raise ValueError(
                        f"metrics[{split!r}][{model_key!r}][{name!r}] = {value} is not a fraction in [0, 1]"
                    )


def create_model_card(
    *,
    model_id: str | None,
    base_model: str,
    teacher_model: str,
    dataset_name: str | None,
    id2label: dict[int, str],
    metrics: dict[str, dict[str, dict[str, float]]],
    retrieval: dict[str, Any],
    hyperparameters: dict[str, Any],
    num_parameters: int | None = None,
    license: str | None = None,
    language: str | None = "en",
    problem_type: str = SINGLE_LABEL,
) -> ModelCard:
    r"""
    Build the model card of a ReAugKD student: YAML metadata for the Hub and a README with usage, results and settings.

    Args:
        model_id (`str`, *optional*):
            Hub id of the checkpoint; `None` puts a local-path placeholder in the usage snippets.
        base_model (`str`):
            The student encoder's initialisation, e.g. `"sentence-transformers/all-MiniLM-L6-v2"`. A local path is
            named in the text, never linked or put in the metadata.
        teacher_model (`str`):
            The fine-tuned teacher whose knowledge base the checkpoint carries.
        dataset_name (`str`, *optional*):
            Hub dataset id, or a description of local data (named in the text, `"custom"` in the model-index);
            `None` for local files.
        id2label (`dict[int, str]`):
            Label names, as in the model config.
        metrics (`dict`):
            `{split: {model: {"accuracy": a, "macro_f1": f}}}` with splits like `"validation"` / `"test"`, models
            `"teacher"`, `"student"` (β = 0) and `"student_retrieval"`, and the task type's `METRICS` (accuracy,
            F1 and exact match as fractions in [0, 1]). The
            model-index reports the model the checkpoint serves by default: `"student_retrieval"`, or
            `"student_retrieval_gated"` when `retrieval["retrieval_gate"]` is set.
        retrieval (`dict`):
            The inference settings chosen on validation, `knn_k`, `retrieval_weight`, `retrieval_temperature`,
            `index_type`, and the KB shape, `kb_size`, `kb_dim`.
        hyperparameters (`dict`):
            Training hyperparameters, shown as a table in the order given.
        num_parameters (`int`, *optional*):
            Student parameter count, mentioned in the summary when given.
        license (`str`, *optional*), language (`str`, *optional*, defaults to `"en"`):
            Hub metadata, written when given.
        problem_type (`str`, *optional*, defaults to single-label classification):
            The task type (`config.problem_type`): which metrics the card reports and how its snippets read outputs.

    Returns:
        `huggingface_hub.ModelCard`: save it with [`save_model_card`] or `card.push_to_hub(...)`.
    """
    _check_inputs(metrics, retrieval, problem_type)
    model_name = model_id or f"ReAugKD student of {os.path.basename(os.path.normpath(teacher_model))}"
    card_data = ModelCardData(
        language=language,
        license=license,
        library_name="transformers",
        tags=list(TAGS),
        base_model=hub_id(base_model),
        datasets=[hub_id(dataset_name)] if hub_id(dataset_name) else None,
        pipeline_tag="text-classification",
        model_name=model_name,
        # the model the checkpoint serves: with the per-query β(x) when the gate was kept
        eval_results=_eval_results(
            metrics,
            dataset_name,
            "student_retrieval_gated" if retrieval.get("retrieval_gate") else "student_retrieval",
            problem_type,
        )
        or None,
    )
    with resources.as_file(resources.files(__package__) / "model_card_template.md") as template_path:
        return ModelCard.from_template(
            card_data,
            template_path=str(template_path),
            model_name=model_name,
            model_path=model_id or LOCAL_PATH_PLACEHOLDER,
            example_text=EXAMPLE_TEXT,
            base_ref=_reference(base_model),
            teacher_ref=_reference(teacher_model),
            dataset_name=dataset_name,
            dataset_ref=_reference(dataset_name, "datasets/") if dataset_name else None,
            id2label=dict(sorted((int(i), label) for i, label in id2label.items())),
            metrics=metrics,
            metric_columns=[(key, name, is_fraction) for key, _, name, _, is_fraction in METRICS[problem_type]],
            problem_type=problem_type,
            model_rows=MODEL_ROWS,
            retrieval=retrieval,
            hyperparameters=hyperparameters,
            num_parameters=num_parameters,
            versions=_framework_versions(),
        )


def save_model_card(card: ModelCard, output_dir: str | os.PathLike) -> None:
    """Write `output_dir/README.md` atomically, so a crash never leaves half a README."""
    with atomic_path(Path(output_dir) / "README.md") as tmp:
        tmp.write_text(str(card), encoding="utf-8")
