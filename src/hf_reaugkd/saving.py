"""Saving the distilled student, and pushing exactly what was saved."""

import logging
from pathlib import Path

from huggingface_hub import ModelCard, create_branch, create_repo, upload_folder
from torch import nn
from transformers import PreTrainedTokenizerBase

from .caching import atomic_path, write_json
from .model_card import save_model_card
from .modeling_reaugkd import ReAugKDForSequenceClassification
from .teacher import save_projection

logger = logging.getLogger(__name__)

TEACHER_PROJECTION = "teacher_projection.safetensors"


def save_student(
    directory: str | Path,
    model: ReAugKDForSequenceClassification,
    tokenizer: PreTrainedTokenizerBase,
    card: ModelCard,
    metrics: dict,
    teacher_projection: nn.Linear | None = None,
    projection_metadata: dict[str, str] | None = None,
) -> Path:
    """Write model (weights, knowledge base, remote code), tokenizer, model card and metrics to a temporary folder
    that replaces `directory` whole, only once complete: a failed save leaves the earlier model intact. The teacher's
    projection head goes beside it (`teacher_projection.safetensors`), so `kb add --teacher` keys new rows as in
    training."""
    directory = Path(directory)
    with atomic_path(directory, directory=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_model_card(card, tmp)
        write_json(tmp / "metrics.json", metrics)
        if teacher_projection is not None:
            save_projection(teacher_projection, tmp / TEACHER_PROJECTION, projection_metadata)
    return directory


def push_saved(
    directory: str | Path,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
) -> str:
    """Upload a folder written by `save_student` as it is, so the Hub holds the files that were checked locally:
    files of an earlier push that this folder no longer has are deleted in the same commit (e.g. the knowledge
    base's texts of a run with `--store_kb_texts`, pushed again without it). `revision` names a branch, created
    from main if needed, so a push can leave main as it was."""
    create_repo(repo_id, token=token, private=private, exist_ok=True)
    if revision is not None:
        create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    upload_folder(repo_id=repo_id, folder_path=directory, token=token, revision=revision, delete_patterns="*")
    logger.info("Pushed %s to %s%s", directory, repo_id, f" (branch {revision})" if revision else "")
    return repo_id
