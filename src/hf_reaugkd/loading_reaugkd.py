"""Loading a ReAugKD checkpoint, which is untrusted input, and may be a local folder that `kb add` edits meanwhile.

This file travels with saved checkpoints as remote code (a flat sibling of `modeling_reaugkd.py`, whose
`from_pretrained` uses it): the knowledge base's shapes are checked against the weights file's header before anything
is allocated, the texts file is read with the weights and bound to them by its SHA-256, and a folder whose files
disagree is read again.
"""

import copy

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedConfig
from transformers.utils import SAFE_WEIGHTS_NAME, cached_file, logging

from .configuration_reaugkd import ReAugKDConfig
from .kb_texts import TEXTS_FILE, decode_texts, read_texts_file

logger = logging.get_logger(__name__)

HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
# What a config says of the knowledge base stored beside it, not of how to use it: a config passed to `from_pretrained`
# takes these from the folder when it is read again.
STORED_KB_FIELDS = ("kb_size", "index_type", "index_nbytes", "index_sha256", "kb_has_texts", "kb_texts_sha256")


class FolderChangedError(ValueError):
    """A local checkpoint's files disagree: perhaps an edit replaced the folder while it loaded (read it again)."""


def checkpoint_shapes(source, load_kwargs: dict) -> tuple[ReAugKDConfig, dict[str, list[int]] | None]:
    """The checkpoint's config, and the shape of every tensor of its weights file by name (without the `reaugkd.`
    prefix), read from the header only; `None` when that cannot be read (a sharded or unreadable checkpoint)."""
    hub_kwargs = {k: v for k, v in load_kwargs.items() if k in HUB_KWARGS}
    config = load_kwargs.get("config")
    if not is_reaugkd_config(config):
        try:
            config = ReAugKDConfig.from_pretrained(source, **hub_kwargs)
        except (ValueError, StrictDataclassError) as err:  # a checkpoint is untrusted input: say which and why
            raise ValueError(f"The config of {source} is invalid: {err.__cause__ or err}") from err
    try:
        with safe_open(cached_file(source, SAFE_WEIGHTS_NAME, **hub_kwargs), "pt") as f:
            names = f.keys()
            return config, {name.split("reaugkd.")[-1]: list(f.get_slice(name).get_shape()) for name in names}
    except (OSError, SafetensorError):
        return config, None  # the load report lists the shapes


def kb_shape_mismatches(config: ReAugKDConfig, shapes: dict[str, list[int]] | None) -> list[str]:
    """A line for each knowledge-base tensor of the checkpoint whose shape differs from what the config records."""
    expected = {
        "knowledge_base.keys": [config.kb_size, config.kb_dim],
        "knowledge_base.values": [config.kb_size, config.num_labels],
        "knowledge_base.index_bytes": [config.index_nbytes],
    }
    found = shapes or {}
    return [
        f"{name}: config expects {shape}, checkpoint has {found.get(name, 'none' if shapes is not None else 'see the load report above')}"
        for name, shape in expected.items()
        if found.get(name) != shape
    ]


def shape_mismatches(model_class, config: ReAugKDConfig, shapes: dict[str, list[int]] | None) -> list[str]:
    """A line for each tensor of the checkpoint whose shape differs from the one the config builds (an edited
    `encoder_config`, ...), from a model made on the meta device: no memory is allocated."""
    with torch.device("meta"):
        expected = {
            name.split("reaugkd.")[-1]: list(tensor.shape) for name, tensor in model_class(config).state_dict().items()
        }
    return [
        f"{name}: config expects {expected[name]}, checkpoint has {shape}"
        for name, shape in (shapes or {}).items()
        if name in expected and expected[name] != shape
    ]


def describe_shape_mismatch(config: ReAugKDConfig, source, lines: list[str]) -> str:
    """Say which tensors of a checkpoint disagree with the shapes its config records."""
    return (
        f"The checkpoint {source} does not match its config (kb_size={config.kb_size}, kb_dim={config.kb_dim}, "
        f"num_labels={config.num_labels}, index_nbytes={config.index_nbytes}):\n  " + "\n  ".join(lines)
    )


def texts_loader(source, config: ReAugKDConfig, load_kwargs: dict, last_attempt: bool):
    """Read the knowledge base's texts file now, with the weights, and return what decodes it when an explanation
    first needs it. Read later, it could be the file of an edit made since (another row's text for every id). A file
    that cannot be read, or was not saved with these weights, is read again with the whole folder
    (`FolderChangedError`) and, on the last attempt, fails the explanations, not the predictions."""
    hub_kwargs = {k: v for k, v in load_kwargs.items() if k in HUB_KWARGS}
    try:
        path = cached_file(source, TEXTS_FILE, **hub_kwargs)
        encoded = read_texts_file(path, config.kb_texts_sha256)
    except (OSError, ValueError) as err:
        if not last_attempt:
            raise FolderChangedError(str(err)) from err
        logger.warning(str(err))
        failure = ValueError(str(err))

        def fail() -> list[str]:
            raise failure

        return fail
    return lambda: decode_texts(encoded, path)


def is_reaugkd_config(config) -> bool:
    """Duck-typed: as remote code, the config class `pipeline()` loaded may be another import of this one."""
    return isinstance(config, PreTrainedConfig) and config.model_type == ReAugKDConfig.model_type


def with_stored_kb_fields(config: ReAugKDConfig, source) -> ReAugKDConfig:
    stored = ReAugKDConfig.from_pretrained(source)
    config = copy.deepcopy(config)
    for name in STORED_KB_FIELDS:
        setattr(config, name, getattr(stored, name))
    return config


def non_finite_tensors(model: torch.nn.Module) -> list[str]:
    """The names of the model's floating-point weights that hold a NaN or an infinity: they would serve NaN scores.
    The knowledge base's buffers are left to `KnowledgeBase.validate`, which names the rows."""
    named = [*model.named_parameters(), *model.named_buffers()]
    return [
        name
        for name, tensor in named
        if "knowledge_base." not in name and tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
