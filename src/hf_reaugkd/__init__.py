"""hf-reaugkd: retrieval-augmented knowledge distillation (ReAugKD, ACL 2023) for Hugging Face transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .configuration_reaugkd import ReAugKDConfig
from .knowledge_base import KnowledgeBase
from .modeling_reaugkd import (
    ReAugKDForSequenceClassification,
    ReAugKDModel,
    ReAugKDModelOutput,
    ReAugKDSequenceClassifierOutput,
)

# In-process registration, so `pipeline(model=<instance>)` and `AutoModel.from_config` know the classes.
# Saved checkpoints do not need it: their config's `auto_map` points at the remote-code files.
AutoConfig.register(ReAugKDConfig.model_type, ReAugKDConfig, exist_ok=True)
AutoModel.register(ReAugKDConfig, ReAugKDModel, exist_ok=True)
AutoModelForSequenceClassification.register(ReAugKDConfig, ReAugKDForSequenceClassification, exist_ok=True)

__version__ = "0.1.0"
__all__ = [
    "KnowledgeBase",
    "ReAugKDConfig",
    "ReAugKDForSequenceClassification",
    "ReAugKDModel",
    "ReAugKDModelOutput",
    "ReAugKDSequenceClassifierOutput",
]
