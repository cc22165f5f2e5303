"""hf-reaugkd: retrieval-augmented knowledge distillation (ReAugKD, ACL 2023) for Hugging Face transformers.

The model classes are imported on first use (PEP 562), so `hf_reaugkd.onnx_pipeline`, the ONNX runtime, imports in an
environment with neither PyTorch nor transformers.
"""

import importlib

_EXPORTS = {
    "KnowledgeBase": "knowledge_base",
    "ReAugKDConfig": "configuration_reaugkd",
    "ReAugKDForSequenceClassification": "modeling_reaugkd",
    "ReAugKDModel": "modeling_reaugkd",
    "ReAugKDModelOutput": "modeling_reaugkd",
    "ReAugKDSequenceClassifierOutput": "modeling_reaugkd",
}


def _register_auto_classes() -> None:
    """In-process registration, so `pipeline(model=<instance>)` and `AutoModel.from_config` know the classes. Saved
    checkpoints do not need it: their config's `auto_map` points at the remote-code files."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    from .configuration_reaugkd import ReAugKDConfig
    from .modeling_reaugkd import ReAugKDForSequenceClassification, ReAugKDModel

    AutoConfig.register(ReAugKDConfig.model_type, ReAugKDConfig, exist_ok=True)
    AutoModel.register(ReAugKDConfig, ReAugKDModel, exist_ok=True)
    AutoModelForSequenceClassification.register(ReAugKDConfig, ReAugKDForSequenceClassification, exist_ok=True)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _register_auto_classes()
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"
__all__ = list(_EXPORTS)
