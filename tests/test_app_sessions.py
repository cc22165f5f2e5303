"""examples/app.py's edits from two browser sessions at once, through the app's own handlers (no browser needed)."""

import importlib.util
from pathlib import Path

import pytest
from conftest import tiny_student
from test_faults_edits import labelled_texts

from hf_reaugkd import editing

pytest.importorskip("gradio")
APP = Path(__file__).parents[1] / "examples" / "app.py"


@pytest.fixture
def handlers(tmp_path, tiny_tokenizer):
    """The app's `add` and `remove` handlers over a tiny student whose knowledge base stores texts."""
    spec = importlib.util.spec_from_file_location("app", APP)
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    model = tiny_student(kb_size=24, knn_k=4)
    model.knowledge_base.set_texts(labelled_texts(model))
    model.set_knowledge_base(model.knowledge_base)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    blocks = app.build_app(model_dir)
    found = {block.fn.__name__: block.fn for block in blocks.fns.values()}
    return found["add"], found["remove"], model_dir


def stored_texts(model_dir) -> list[str]:
    return editing.load_student(model_dir)[0].knowledge_base.texts


def test_a_session_removes_its_own_rows_after_another_removed_one(handlers):
    """The issue's sequence: A adds, B adds, A removes, A adds, B removes. Remembered by id, B's click removed A's
    second row (ids had shifted) and said the knowledge base was as it was; A's next remove raised."""
    add, remove, model_dir = handlers
    a, b = [], []
    *_, a = add("first of a", "positive", a)
    *_, b = add("only row of b", "negative", b)
    *_, a = remove("first of a", a)
    *_, a = add("second of a", "positive", a)
    *_, message, b = remove("only row of b", b)
    texts = stored_texts(model_dir)
    assert "second of a" in texts and "only row of b" not in texts and "first of a" not in texts
    assert message.startswith("Removed this session's rows (1)") and b == []
    *_, message, a = remove("second of a", a)
    assert stored_texts(model_dir)[24:] == [] and a == [] and "(1)" in message


def test_an_oversized_text_is_refused_not_stored(handlers):
    add, _, model_dir = handlers
    *_, message, added = add("x" * 200_000, "positive", [])
    assert message.startswith("Not added:") and "limited to 100,000" in message and added == []
    assert len(stored_texts(model_dir)) == 24
