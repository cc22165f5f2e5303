"""Shared test fixtures: tiny random models and a tiny tokenizer built in code (nothing is downloaded)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hub_server import hub_server  # noqa: F401 (fixture)
from transformers import BertConfig, BertModel, BertTokenizerFast

from hf_reaugkd import KnowledgeBase, ReAugKDForSequenceClassification

WORDS = [
    "the",
    "a",
    "movie",
    "film",
    "good",
    "bad",
    "great",
    "awful",
    "plot",
    "actor",
    "scene",
    "boring",
    "fun",
    "loved",
    "hated",
    "story",
    "music",
    "long",
    "short",
]
ID2LABEL = {0: "negative", 1: "neutral", 2: "positive"}


def tiny_encoder(seed: int = 0, vocab_size: int = 64) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    return BertModel(config)


def random_kb(size: int, dim: int = 16, num_labels: int = 3, index_type: str = "torch", seed: int = 0, **params):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(size, dim, generator=generator)
    values = torch.softmax(3 * torch.randn(size, num_labels, generator=generator), dim=-1)
    return KnowledgeBase.build(keys, values, index_type, **params)


def tiny_student(kb_size: int = 50, index_type: str = "torch", seed: int = 0, **config_kwargs):
    """A random student with a random KB of `kb_size` entries (no KB when 0), in eval mode."""
    kb = random_kb(kb_size, index_type=index_type, seed=seed, ivf_nlist=8) if kb_size else None
    model = ReAugKDForSequenceClassification.from_encoder(
        tiny_encoder(seed), ID2LABEL, knowledge_base=kb, kb_dim=16, **config_kwargs
    )
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer() -> BertTokenizerFast:
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    return BertTokenizerFast(vocab=vocab, model_max_length=32)


SENTENCES = ["the movie was good", "a boring long plot", "great actor and music", "awful", "the film"]


def run_fresh_python(code: str, cwd: Path, block: tuple[str, ...] = ("hf_reaugkd",), env: dict | None = None):
    """Run `code` in a new interpreter where importing the `block`ed top-level packages fails; return its
    stdout parsed as JSON. This proves saved checkpoints load without hf-reaugkd (and optionally faiss).
    Offline (`HF_HUB_OFFLINE=1`) unless an `env` is given."""
    blocker = cwd / "_import_blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""
            import sys

            class _Block:
                def find_spec(self, name, path=None, target=None):
                    if name.split(".")[0] in {set(block)!r}:
                        raise ImportError(f"{{name}} is blocked in this test process")

            sys.meta_path.insert(0, _Block())
            """
        )
    )
    run_env = {**(env if env is not None else {**os.environ, "HF_HUB_OFFLINE": "1"}), "PYTHONPATH": str(blocker)}
    run_env.setdefault("HF_MODULES_CACHE", str(cwd / "hf_modules"))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        raise AssertionError(f"fresh process failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def tiny_distillation_data(tokenizer, size: int = 32, kb_dim: int = 16, num_labels: int = 3, seed: int = 0):
    """A tokenized train set with the columns ReAugKDTrainer reads: labels, teacher_logits, teacher_keys."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(2 + i % 5)) for i in range(size)]
    encoded = tokenizer(texts, truncation=True, max_length=16)
    keys = torch.nn.functional.normalize(torch.randn(size, kb_dim, generator=generator), dim=-1)
    return Dataset.from_dict(
        {
            **encoded,
            "labels": [i % num_labels for i in range(size)],
            "teacher_logits": (2 * torch.randn(size, num_labels, generator=generator)).tolist(),
            "teacher_keys": keys.tolist(),
        }
    )


def dropout_free_student(seed: int = 0):
    """A tiny student whose training step is deterministic (no dropout), for gradient comparisons."""
    encoder = tiny_encoder(seed)
    encoder.config.hidden_dropout_prob = encoder.config.attention_probs_dropout_prob = 0.0
    torch.manual_seed(seed)
    return ReAugKDForSequenceClassification.from_encoder(
        BertModel(encoder.config), ID2LABEL, kb_dim=16, classifier_dropout=0.0
    )
