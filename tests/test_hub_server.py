"""End-to-end checks of the test Hub server with plain huggingface_hub and transformers.

Every client runs in a fresh subprocess (``HF_ENDPOINT`` is read at import) with its own empty
``HF_HOME``, so a pull can only succeed through HTTP from the server, never from a shared cache.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

if TYPE_CHECKING:
    from hub_server import HubServer

# Provides the `hub_server` fixture; loading it as a plugin (not importing it) keeps pytest's
# assertion rewriting for it and is harmless if conftest.py loads it too.

TEXTS = ["the movie was great fun", "a boring plot and bad acting"]
WORDS = (
    "the a an is was good bad movie film great awful plot actor acting story fun boring love hate it this and not very"
)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS.split()]
VOCAB += [*"abcdefghijklmnopqrstuvwxyz", *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz")]


def _code(source: str, **params: object) -> str:
    """Client script with ``params`` bound as Python literals (strings and lists of strings)."""
    header = "".join(f"{name} = {value!r}\n" for name, value in params.items())
    return header + textwrap.dedent(source)


def _save_tiny_bert(directory: Path) -> tuple[BertForSequenceClassification, BertTokenizerFast]:
    """A random 2-layer BERT classifier and a WordPiece tokenizer built from a vocab written here."""
    directory.mkdir(parents=True)
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab_file))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=3,
    )
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


PUSH = """
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained(local_dir)
tokenizer = AutoTokenizer.from_pretrained(local_dir)
model.push_to_hub(repo_id, commit_message="tiny model")
tokenizer.push_to_hub(repo_id)
"""

PULL = """
import json, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained(repo_id).eval()
tokenizer = AutoTokenizer.from_pretrained(repo_id)
with torch.no_grad():
    logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
print(json.dumps({"logits": logits.tolist(), "tokenizer": type(tokenizer).__name__}))
"""


def test_push_to_hub_then_from_pretrained_roundtrip(hub_server: HubServer, tmp_path: Path) -> None:
    model, tokenizer = _save_tiny_bert(tmp_path / "local")
    with torch.no_grad():
        expected = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits

    hub_server.run_python(_code(PUSH, local_dir=str(tmp_path / "local"), repo_id="user/tiny"), tmp_path / "home-push")
    files = hub_server.store.files("model", "user/tiny", hub_server.store.resolve("model", "user/tiny", "main"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(files)

    pull_home = tmp_path / "home-pull"
    assert not pull_home.exists()
    out = hub_server.run_python(_code(PULL, repo_id="user/tiny", texts=TEXTS), pull_home)
    result = json.loads(out.strip().splitlines()[-1])

    assert result["tokenizer"] in ("BertTokenizer", "BertTokenizerFast")
    assert (pull_home / "hub" / "models--user--tiny").is_dir()
    downloads = [path for method, path in hub_server.log if method == "GET" and "/resolve/" in path]
    assert any(path.endswith("/model.safetensors") for path in downloads), downloads
    diff = (torch.tensor(result["logits"]) - expected).abs().max().item()
    assert diff <= 1e-5, diff


CARD = """
from huggingface_hub import ModelCard, create_repo, hf_hub_download
create_repo(repo_id)
ModelCard(card_text).push_to_hub(repo_id)
print(open(hf_hub_download(repo_id, "README.md")).read(), end="")
"""


def test_model_card_push_validates_yaml(hub_server: HubServer, tmp_path: Path) -> None:
    card_text = "---\nlicense: apache-2.0\ntags:\n- reaugkd\n---\n\n# Tiny card\n"
    out = hub_server.run_python(_code(CARD, repo_id="user/card", card_text=card_text), tmp_path / "home")
    assert out == card_text
    assert ("POST", "/api/validate-yaml") in hub_server.log


MISSING = """
from huggingface_hub import create_repo, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
create_repo("user/empty")
for repo, exc in [("user/empty", EntryNotFoundError), ("user/nonexistent", RepositoryNotFoundError)]:
    try:
        hf_hub_download(repo, "missing.txt")
    except exc as err:
        print(type(err).__name__)
"""


def test_missing_file_and_repo_raise_hub_errors(hub_server: HubServer, tmp_path: Path) -> None:
    out = hub_server.run_python(MISSING, tmp_path / "home")
    assert out.split() == ["RemoteEntryNotFoundError", "RepositoryNotFoundError"]


FOLDER = """
import json, os
from pathlib import Path
from huggingface_hub import HfApi, snapshot_download
api = HfApi()
api.create_repo(repo_id)
first = api.upload_folder(repo_id=repo_id, folder_path=src).oid
api.delete_file("drop.txt", repo_id)
snap = Path(snapshot_download(repo_id))
old = Path(snapshot_download(repo_id, revision=first))
print(json.dumps({
    "latest": sorted(str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file()),
    "first": sorted(str(p.relative_to(old)) for p in old.rglob("*") if p.is_file()),
    "nested": (snap / "sub" / "data.bin").read_bytes().hex(),
}))
"""


def test_upload_folder_and_snapshot_download(hub_server: HubServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "keep.txt").write_text("kept")
    (src / "drop.txt").write_text("dropped later")
    (src / "sub" / "data.bin").write_bytes(bytes(range(256)))
    out = hub_server.run_python(_code(FOLDER, repo_id="user/folder", src=str(src)), tmp_path / "home")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["latest"] == ["keep.txt", "sub/data.bin"]
    assert result["first"] == ["drop.txt", "keep.txt", "sub/data.bin"]
    assert result["nested"] == bytes(range(256)).hex()
