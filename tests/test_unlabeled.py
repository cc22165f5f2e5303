"""Unlabelled in-domain texts: read and checked like the labelled data, labelled by a teacher fine-tuned without
them, placed after the train rows in the knowledge base and the student's transfer set, and keyed into the caches
by content."""

import json
import math
import random

import pytest
from conftest import FILLER, NEGATIVE, POSITIVE, pipeline_args

from hf_reaugkd import cli
from hf_reaugkd.data import LABEL_COLUMN, UNLABELED, load_task_data, load_unlabeled_texts
from hf_reaugkd.distill import main
from hf_reaugkd.errors import InputError
from hf_reaugkd.modeling_reaugkd import ReAugKDForSequenceClassification

pytestmark = pytest.mark.usefixtures("one_thread", "datasets_cache")


def write_unlabeled(path, size: int = 40, seed: int = 1, header: str = "text") -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(size):
        words = rng.sample(FILLER, 3) + [rng.choice(POSITIVE + NEGATIVE)]
        rng.shuffle(words)
        texts.append(" ".join(words))
    path.write_text(f"{header}\n" + "".join(f"{text}\n" for text in texts))
    return texts


def labelled(task):
    return load_task_data(data_files={split: str(task / f"{split}.csv") for split in ("train", "validation", "test")})


def test_unlabelled_texts_follow_the_train_rows_with_label_minus_100(task):
    data = labelled(task)
    path = task / "unlabeled.csv"
    texts = write_unlabeled(path, size=5)
    # any other column is ignored, a label too
    path.write_text("id,text,label\n" + "".join(f"{i},{text},positive\n" for i, text in enumerate(texts)))
    with_texts = load_unlabeled_texts(data, str(path))
    assert with_texts.unlabeled.column_names == ["text", LABEL_COLUMN]
    assert list(with_texts.unlabeled[LABEL_COLUMN]) == [UNLABELED] * 5 == [-100] * 5
    transfer = with_texts.transfer_set()
    assert len(transfer) == 96 + 5 and transfer.column_names == ["text", LABEL_COLUMN]
    assert list(transfer["text"]) == list(data.splits["train"]["text"]) + texts
    assert list(transfer[LABEL_COLUMN]) == list(data.splits["train"][LABEL_COLUMN]) + [-100] * 5
    assert data.transfer_set() is data.splits["train"] and load_unlabeled_texts(data) is data

    # the teacher's fine-tuning is keyed by the labelled data only; every stage over all rows by both
    assert with_texts.fingerprint == data.fingerprint and data.content_fingerprint == data.fingerprint
    assert with_texts.content_fingerprint != data.content_fingerprint
    path.write_text("text\n" + "".join(f"{text}\n" for text in texts[:4]) + "another text\n")  # one row edited
    assert load_unlabeled_texts(data, str(path)).content_fingerprint != with_texts.content_fingerprint


def test_unlabelled_texts_from_a_dataset_split(task):
    folder = task / "unlabeled-dataset"
    folder.mkdir()
    texts = write_unlabeled(folder / "test.csv", size=6)  # a folder of data files: split "test"
    data = labelled(task)
    with_texts = load_unlabeled_texts(data, dataset_name=str(folder), split="test")
    assert list(with_texts.unlabeled["text"]) == texts and len(with_texts.transfer_set()) == 96 + 6
    again = load_unlabeled_texts(data, dataset_name=str(folder), split="test")
    assert again.content_fingerprint == with_texts.content_fingerprint
    with pytest.raises(
        InputError, match=r"Could not load split 'train' of --unlabeled_dataset_name '.*unlabeled-dataset'"
    ):
        load_unlabeled_texts(data, dataset_name=str(folder))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("sentence\nthe movie\n", "Column 'text' not found in the unlabeled file .*unlabeled.csv; its columns are "),
        (
            'text\nthe movie\n"  "\na plot\n',
            "Empty text in column 'text', line 3 of the unlabeled file .*unlabeled.csv",
        ),
        ("text\n", "The unlabeled file .*unlabeled.csv has no rows"),
    ],
)
def test_bad_unlabelled_files_are_refused_naming_file_and_line(task, content, message):
    path = task / "unlabeled.csv"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        load_unlabeled_texts(labelled(task), str(path))


def test_unlabelled_flags_are_checked_before_any_work(task, capsys):
    args = pipeline_args(task, task / "out", "--unlabeled_file", str(task / "missing.csv"))
    with pytest.raises(SystemExit):
        cli.main(["distill", *args])
    assert f"Data file not found: {task / 'missing.csv'}" in capsys.readouterr().err
    write_unlabeled(task / "unlabeled.csv")
    both = ["--unlabeled_file", str(task / "unlabeled.csv"), "--unlabeled_dataset_name", "imdb"]
    with pytest.raises(SystemExit):
        cli.main(["distill", *pipeline_args(task, task / "out", *both)])
    assert "either --unlabeled_file or --unlabeled_dataset_name" in capsys.readouterr().err
    ce_only = ["--distillation_weight", "0", "--relational_weight", "0", "--ce_weight", "1"]
    with pytest.raises(InputError, match="Unlabelled texts only reach the student through the teacher's losses"):
        main(pipeline_args(task, task / "out", "--unlabeled_file", str(task / "unlabeled.csv"), *ce_only))
    assert not (task / "out" / "stages").exists()


def test_pipeline_with_unlabelled_texts_own_key_loss_neighbours_and_the_student_keyed_baseline(task):
    write_unlabeled(task / "unlabeled.csv", size=40)
    stages = task / "stages"
    extra = [
        "--unlabeled_file", str(task / "unlabeled.csv"),
        "--own_key_weight", "1", "--relational_neighbors", "4", "--ce_weight", "1",
        "--evaluate_student_keyed_kb", "--store_kb_texts", "--stages_dir", str(stages), "--logging_steps", "1",
        "--keep_checkpoints",
    ]  # fmt: skip
    metrics = main(pipeline_args(task, task / "out", *extra))

    model = ReAugKDForSequenceClassification.from_pretrained(task / "out" / "model")
    assert model.config.kb_size == 96 + 40 and model.knowledge_base.texts[96:] == write_unlabeled(task / "u", 40)
    # 136 rows, batch 16: 9 steps per epoch, 2 epochs; every loss part logged and finite
    state = json.loads((task / "out" / "student-checkpoints" / "checkpoint-18" / "trainer_state.json").read_text())
    assert state["global_step"] == 18
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert len(logged) == 18  # --logging_steps 1
    for name in ("loss", "loss_distillation", "loss_relational", "loss_own_key", "loss_ce"):
        assert all(math.isfinite(entry[name]) for entry in logged), name
    for split in ("validation", "test"):
        assert set(metrics["splits"][split]) == {
            "teacher", "student", "student_retrieval", "student_retrieval_gated", "student_retrieval_student_keys"
        }  # fmt: skip
    assert set(metrics["selection_student_keys"]) == {"knn_k", "retrieval_weight", "accuracy", "metric"}
    assert set(metrics["validation_knn_accuracy"]) == {"student_query", "teacher_query", "student_query_student_keys"}
    card = (task / "out" / "model" / "README.md").read_text()
    assert "| unlabeled_rows | 40 |" in card and "| own_key_weight | 1.0 |" in card

    # without the unlabelled texts: the same fine-tuned teacher, other outputs and knowledge base
    main(pipeline_args(task, task / "plain", "--stages_dir", str(stages), "--num_train_epochs", "1"))
    names = sorted(path.name.rsplit("-", 1)[0] for path in stages.iterdir())
    assert names == ["knowledge-base", "knowledge-base", "teacher", "teacher-outputs", "teacher-outputs"]
