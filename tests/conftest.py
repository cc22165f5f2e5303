"""Shared test fixtures: tiny random models and a tiny tokenizer built in code (nothing is downloaded)."""

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hub_server import hub_server  # noqa: F401 (fixture)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizerFast,
    DebertaV2Config,
    DistilBertConfig,
    LlamaConfig,
    LlamaModel,
    ModernBertConfig,
    MPNetConfig,
    PreTrainedTokenizerFast,
    RobertaConfig,
)

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


# Tiny random configs of every architecture users distil with ---------------------------------------------------

SIZE = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 37, "pad_token_id": 0}


def encoder_config(architecture: str, vocab_size: int):
    """A tiny random config of `architecture`, with more layers than the student keeps (the pipeline keeps 1)."""
    if architecture == "bert":
        return BertConfig(vocab_size=vocab_size, num_hidden_layers=2, max_position_embeddings=64, **SIZE)
    if architecture == "distilbert":
        return DistilBertConfig(vocab_size=vocab_size, n_layers=2, dim=32, n_heads=2, hidden_dim=37, pad_token_id=0)
    if architecture == "roberta":  # positions start after the padding id
        return RobertaConfig(vocab_size=vocab_size, num_hidden_layers=2, max_position_embeddings=66, **SIZE)
    if architecture == "deberta-v2":
        return DebertaV2Config(vocab_size=vocab_size, num_hidden_layers=2, max_position_embeddings=64, **SIZE)
    if architecture == "mpnet":
        return MPNetConfig(vocab_size=vocab_size, num_hidden_layers=2, max_position_embeddings=66, **SIZE)
    # ModernBERT: 3 layers of global, sliding, sliding attention (`layer_types`), which truncation must cut too
    return ModernBertConfig(
        vocab_size=vocab_size,
        num_hidden_layers=3,
        max_position_embeddings=64,
        local_attention=8,
        bos_token_id=2,
        eos_token_id=3,
        cls_token_id=2,
        sep_token_id=3,
        **{**SIZE, "intermediate_size": 64},
    )


def llm_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-style tokenizer: a begin and an end token, no padding token, and padding on the left."""
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", padding_side="left"
    )


def tiny_llama(vocab_size: int) -> LlamaModel:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    return LlamaModel(config)


# A tiny task for whole-pipeline runs --------------------------------------------------------------------------

POSITIVE, NEGATIVE, FILLER = (
    ["good", "great", "loved", "fun"],
    ["bad", "awful", "hated", "boring"],
    ["the", "movie", "plot", "story", "actor", "scene"],
)


def write_task(directory):
    sizes = {"train": 96, "validation": 32, "test": 32}
    rng = random.Random(0)
    for split, size in sizes.items():
        rows = ["text,label"]
        for i in range(size):
            label = ["negative", "positive"][i % 2]
            words = rng.sample(FILLER, 3) + [rng.choice(POSITIVE if label == "positive" else NEGATIVE)]
            rng.shuffle(words)
            rows.append(f"{' '.join(words)},{label}")
        (directory / f"{split}.csv").write_text("\n".join(rows) + "\n")


@pytest.fixture
def task(tmp_path, tiny_tokenizer):
    """CSV splits, an encoder checkpoint to fine-tune as teacher and one to use as student."""
    write_task(tmp_path)
    tiny_encoder(seed=1).save_pretrained(tmp_path / "teacher")
    tiny_tokenizer.save_pretrained(tmp_path / "teacher")
    tiny_encoder(seed=2).save_pretrained(tmp_path / "student")
    tiny_tokenizer.save_pretrained(tmp_path / "student")
    return tmp_path


def pipeline_args(task, output_dir, *extra):
    return [
        "--teacher_model_name_or_path", str(task / "teacher"),
        "--student_model_name_or_path", str(task / "student"),
        "--student_num_layers", "1",
        "--train_file", str(task / "train.csv"),
        "--validation_file", str(task / "validation.csv"),
        "--test_file", str(task / "test.csv"),
        "--output_dir", str(output_dir),
        "--max_seq_length", "16",
        "--num_train_epochs", "2",
        "--teacher_num_train_epochs", "3",
        "--teacher_learning_rate", "1e-3",
        "--learning_rate", "1e-3",
        "--per_device_train_batch_size", "16",
        "--projection_num_epochs", "3",
        "--knn_k_grid", "1,4",
        "--retrieval_weight_grid", "0,0.5,1",
        "--report_to", "none",
        "--save_strategy", "epoch",
        "--use_cpu",
        *extra,
    ]  # fmt: skip


@pytest.fixture
def one_thread():
    """Tiny models: threads only add overhead, and contention with other work on a small machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """datasets' cache inside the test's folder: nothing leaks between tests (or from the user's cache)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


# Which knowledge-base scan paths the suite ran: on every CPU the reduced-precision ones too (tests force them with
# an explicit `search_dtype`), and CI prints them, with what "auto" picks on this CPU.
SCAN_PATHS: set[str] = set()


@pytest.fixture(autouse=True, scope="session")
def _record_scan_paths():
    from hf_reaugkd import exact_search

    original = exact_search.ExactSearch.keys_for_scan

    def recorded(self, keys, *args):
        scan_keys, scales = original(self, keys, *args)
        int8_kernel = scales is not None and exact_search.int8_matmul(keys.device.type, keys.shape[1]) is not None
        SCAN_PATHS.add(f"{scan_keys.dtype}".removeprefix("torch.") + (" (int8 matmul)" if int8_kernel else ""))
        return scan_keys, scales

    exact_search.ExactSearch.keys_for_scan = recorded
    yield
    exact_search.ExactSearch.keys_for_scan = original


def pytest_terminal_summary(terminalreporter):
    from hf_reaugkd import exact_search

    terminalreporter.write_line(
        f"knowledge-base scan on this CPU: native bf16 {exact_search.cpu_has_native_bf16()}, int8 matmul "
        f"{exact_search.int8_matmul('cpu', 128) is not None}, search_dtype='auto' scans in "
        f"{exact_search.scan_dtype('auto', 'cpu', 128)}; scan paths run: {', '.join(sorted(SCAN_PATHS)) or 'none'}"
    )
