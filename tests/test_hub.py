"""push_to_hub to a Hub-compatible server on 127.0.0.1, then from_pretrained/pipeline over HTTP in a fresh
process without hf-reaugkd, with an empty cache."""

import torch
from conftest import SENTENCES, run_fresh_python, tiny_student

PUSH = """
from transformers import AutoTokenizer
from hf_reaugkd import ReAugKDForSequenceClassification
model = ReAugKDForSequenceClassification.from_pretrained({path!r})
model.push_to_hub("user/student")
AutoTokenizer.from_pretrained({path!r}).push_to_hub("user/student")
print("pushed")
"""

PULL = """
import json, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
model = AutoModelForSequenceClassification.from_pretrained("user/student", trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained("user/student", trust_remote_code=True)
with torch.no_grad():
    logits = model(**tokenizer({sentences!r}, padding=True, return_tensors="pt")).logits
scores = pipeline("text-classification", model="user/student", trust_remote_code=True, top_k=None)({sentences!r})
print(json.dumps({{"module": type(model).__module__, "logits": logits.tolist(),
                  "pipeline": [{{s["label"]: s["score"] for s in row}} for row in scores]}}))
"""


def test_push_to_hub_then_load_over_http(hub_server, tmp_path, tiny_tokenizer):
    model = tiny_student(kb_size=40, index_type="hnsw")
    model.save_pretrained(tmp_path / "local")
    tiny_tokenizer.save_pretrained(tmp_path / "local")
    hub_server.run_python(PUSH.format(path=str(tmp_path / "local")), tmp_path / "push_home")
    sha = hub_server.store.resolve("model", "user/student", "main")
    pushed = set(hub_server.store.files("model", "user/student", sha))
    assert {"config.json", "model.safetensors", "modeling_reaugkd.py", "configuration_reaugkd.py"} <= pushed
    assert {"knowledge_base.py", "tokenizer_config.json"} <= pushed

    env = hub_server.env(tmp_path / "pull_home")
    got = run_fresh_python(PULL.format(sentences=SENTENCES), tmp_path, env=env)
    assert got["module"].startswith("transformers_modules.")
    with torch.no_grad():
        logits = model(**tiny_tokenizer(SENTENCES, padding=True, return_tensors="pt")).logits
    assert (torch.tensor(got["logits"]) - logits).abs().max() <= 1e-5
    probs = logits.softmax(-1)
    labels = [model.config.id2label[i] for i in range(3)]
    pipeline_probs = torch.tensor([[row[label] for label in labels] for row in got["pipeline"]])
    assert (pipeline_probs - probs).abs().max() <= 1e-5
    assert any(
        method == "GET" and "/user/student/resolve/" in path and "model.safetensors" in path
        for method, path in hub_server.log
    )


PUSH_SAVED = """
from hf_reaugkd.saving import push_saved
push_saved({first!r}, "user/student")
push_saved({second!r}, "user/student")
push_saved({first!r}, "user/student", revision="dev")
"""


def test_push_saved_leaves_exactly_the_saved_files_and_pushes_to_the_branch_asked(hub_server, tmp_path):
    """A run pushed again without `--store_kb_texts` must not leave the earlier push's texts public; `--hub_revision`
    must leave main as it was."""
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, files in ((first, ["config.json", "knowledge_base_texts.safetensors"]), (second, ["config.json"])):
        folder.mkdir()
        for name in files:
            (folder / name).write_text(f"{folder.name} {name}")
    hub_server.run_python(PUSH_SAVED.format(first=str(first), second=str(second)), tmp_path / "home")
    store = hub_server.store
    main = store.files("model", "user/student", store.resolve("model", "user/student", "main"))
    dev = store.files("model", "user/student", store.resolve("model", "user/student", "dev"))
    assert "knowledge_base_texts.safetensors" not in main
    assert store.blob("model", "user/student", main["config.json"]) == b"second config.json"
    assert (
        store.blob("model", "user/student", dev["knowledge_base_texts.safetensors"])
        == b"first knowledge_base_texts.safetensors"
    )
