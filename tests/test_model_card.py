"""The model card renders, parses back as Hub metadata that matches the given results, and is saved atomically."""

import pytest
from huggingface_hub import ModelCard

from hf_reaugkd.model_card import LOCAL_PATH_PLACEHOLDER, TAGS, create_model_card, save_model_card

METRICS = {
    "validation": {
        "teacher": {"accuracy": 0.835, "macro_f1": 0.8349},
        "student": {"accuracy": 0.813, "macro_f1": 0.8127},
        "student_retrieval": {"accuracy": 0.817, "macro_f1": 0.8168},
    },
    "test": {
        "teacher": {"accuracy": 0.8302, "macro_f1": 0.83},
        "student": {"accuracy": 0.8096, "macro_f1": 0.8091},
        "student_retrieval": {"accuracy": 0.8143, "macro_f1": 0.814},
    },
}
RETRIEVAL = {
    "knn_k": 16,
    "retrieval_weight": 0.3,
    "retrieval_temperature": 0.1,
    "index_type": "hnsw",
    "kb_size": 8530,
    "kb_dim": 384,
}
HYPERPARAMETERS = {"learning_rate": 3e-5, "num_train_epochs": 7, "relational_weight": 0.75}


def make_card(**overrides) -> ModelCard:
    kwargs = {
        "model_id": "someone/reaugkd-student",
        "base_model": "sentence-transformers/all-MiniLM-L6-v2",
        "teacher_model": "someone/teacher",
        "dataset_name": "rotten_tomatoes",
        "id2label": {0: "neg", 1: "pos"},
        "metrics": METRICS,
        "retrieval": RETRIEVAL,
        "hyperparameters": HYPERPARAMETERS,
        "license": "apache-2.0",
    }
    return create_model_card(**{**kwargs, **overrides})


def test_metadata_round_trips():
    card = ModelCard(str(make_card()))
    data = card.data
    assert data.tags == TAGS
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert data.datasets == ["rotten_tomatoes"]
    assert data.pipeline_tag == "text-classification"
    assert data.library_name == "transformers"
    assert (data.license, data.language) == ("apache-2.0", "en")
    assert data.model_name == "someone/reaugkd-student"

    got = {(r.dataset_split, r.metric_type): r.metric_value for r in data.eval_results}
    want = {}
    for split in ("validation", "test"):
        want[split, "accuracy"] = METRICS[split]["student_retrieval"]["accuracy"]
        want[split, "f1"] = METRICS[split]["student_retrieval"]["macro_f1"]
    assert got == want
    assert {(r.task_type, r.dataset_type) for r in data.eval_results} == {("text-classification", "rotten_tomatoes")}


def test_body_has_usage_results_and_settings():
    text = make_card().text
    assert 'pipeline("text-classification", model="someone/reaugkd-student", trust_remote_code=True)' in text
    assert 'from_pretrained("someone/reaugkd-student", trust_remote_code=True)' in text
    assert "knn_k=8, retrieval_weight=0.5" in text
    assert "| Student + retrieval | 81.70 | 81.68 | 81.43 | 81.40 |" in text
    assert "| Student, β = 0 | 81.30 | 81.27 | 80.96 | 80.91 |" in text
    assert "| num_train_epochs | 7 |" in text and "| relational_weight | 0.75 |" in text
    assert "- **index_type**: `hnsw`" in text and "8,530 entries × 384 dims" in text
    assert "| 1 | pos |" in text
    assert "2023.acl-short.97" in text and "1128--1136" in text


def test_local_checkpoint_card():
    card = make_card(model_id=None, dataset_name=None, license=None)
    assert f'model="{LOCAL_PATH_PLACEHOLDER}", trust_remote_code=True' in card.text
    assert "someone/reaugkd-student" not in str(card)
    data = ModelCard(str(card)).data
    assert data.datasets is None and data.license is None
    assert {r.dataset_type for r in data.eval_results} == {"custom"}


def test_rejects_percentages_and_missing_retrieval_keys():
    with pytest.raises(ValueError, match="fraction"):
        make_card(metrics={"test": {"student_retrieval": {"accuracy": 81.4}}})
    with pytest.raises(ValueError, match="kb_dim"):
        make_card(retrieval={k: v for k, v in RETRIEVAL.items() if k != "kb_dim"})


def test_save_model_card(tmp_path):
    card = make_card()
    save_model_card(card, tmp_path / "out")
    assert (tmp_path / "out" / "README.md").read_text(encoding="utf-8") == str(card)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["README.md"]  # no temp file left behind


def test_a_local_dataset_folder_is_named_not_pathed(tmp_path):
    """`--dataset_name` may be a local folder (`load_dataset` reads one): the card says its name, never the path."""
    folder = tmp_path / "home" / "alice" / "secret_corpus"
    folder.mkdir(parents=True)
    text = str(make_card(dataset_name=str(folder)))
    assert str(tmp_path) not in text
    assert "secret_corpus" in text
    assert ModelCard(text).data.datasets is None
