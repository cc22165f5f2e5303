"""Regression and multi-label tasks end to end on tiny random models: how the task type is read from the labels,
distillation, the saved student served in a fresh process without hf-reaugkd, `kb add` with gold labels, the metrics
and the positive pairs of the projection head, and the one-line errors of bad input."""

import json
import random

import pytest
import torch
from conftest import (
    FILLER,
    NEGATIVE,
    POSITIVE,
    encoder_config,
    llm_tokenizer,
    pipeline_args,
    run_fresh_python,
    tiny_encoder,
    tiny_llama,
)
from transformers import AutoModel, BertForSequenceClassification

from hf_reaugkd import editing
from hf_reaugkd.data import load_task_data
from hf_reaugkd.distill import main
from hf_reaugkd.errors import InputError
from hf_reaugkd.evaluation import multi_label_metrics, regression_metrics
from hf_reaugkd.losses import pair_weights
from hf_reaugkd.modeling_reaugkd import mix_probabilities
from hf_reaugkd.settings_reaugkd import MULTI_LABEL, REGRESSION, SINGLE_LABEL
from hf_reaugkd.teacher import needs_finetuning


def write_rows(path, header: str, rows: list[str]) -> None:
    path.write_text(header + "\n" + "\n".join(rows) + "\n")


def write_tasks(root) -> None:
    """Two tasks over the same texts: regression (the number of positive words, with noise: an STS-B-like scale) and
    multi-label (`positive` / `negative` by that number, `music` when the text names it), joined by ';'."""
    rng = random.Random(0)
    for split, size in {"train": 96, "validation": 32, "test": 32}.items():
        regression, multi = [], []
        for _ in range(size):
            positives = rng.randint(0, 3)
            words = rng.sample(FILLER, 2) + rng.sample(POSITIVE, positives) + rng.sample(NEGATIVE, 3 - positives)
            music = rng.random() < 0.5
            words += ["music"] if music else []
            rng.shuffle(words)
            text = " ".join(words)
            regression.append(f"{text},{positives + rng.uniform(-0.3, 0.3):.3f}")
            labels = ["positive" if positives >= 2 else "negative"] + (["music"] if music else [])
            multi.append(f"{text},{';'.join(labels)}")
        write_rows(root / "regression" / f"{split}.csv", "text,label", regression)
        write_rows(root / "multi" / f"{split}.csv", "text,label", multi)


def task_args(root, kind: str, *extra: str, out: str = "out") -> list[str]:
    args = pipeline_args(root, root / kind / out, "--store_kb_texts", *extra)
    for split in ("train", "validation", "test"):  # this task's files instead of the shared task's
        args[args.index(str(root / f"{split}.csv"))] = str(root / kind / f"{split}.csv")
    return args


MODERN_OUT = "out-llama-modernbert"  # a Llama teacher's run into a ModernBERT student, beside the BERT pair's `out`


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("task_types")
    (root / "regression").mkdir()
    (root / "multi").mkdir()
    write_tasks(root)
    for name, seed in (("teacher", 1), ("student", 2)):
        tiny_encoder(seed=seed).save_pretrained(root / name)
        tiny_tokenizer.save_pretrained(root / name)
    torch.manual_seed(0)  # and today's pair: a decoder LLM teacher into a ModernBERT student
    AutoModel.from_config(encoder_config("modernbert", tiny_tokenizer.vocab_size)).save_pretrained(root / "modernbert")
    tiny_tokenizer.save_pretrained(root / "modernbert")
    llama_tokenizer = llm_tokenizer()
    tiny_llama(len(llama_tokenizer)).save_pretrained(root / "llama")
    llama_tokenizer.save_pretrained(root / "llama")
    modern = (
        "--teacher_model_name_or_path",
        str(root / "llama"),
        "--student_model_name_or_path",
        str(root / "modernbert"),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(task_args(root, "regression"))
        main(task_args(root, "multi", "--label_separator", ";"))
        main(task_args(root, "regression", *modern, out=MODERN_OUT))
        main(task_args(root, "multi", "--label_separator", ";", *modern, out=MODERN_OUT))
    finally:
        torch.set_num_threads(threads)
    return root


def test_regression_distils_with_sts_b_metrics_and_a_one_output_head(distilled):
    metrics = json.loads((distilled / "regression" / "out" / "metrics.json").read_text())
    config = json.loads((distilled / "regression" / "out" / "model" / "config.json").read_text())
    assert config["problem_type"] == REGRESSION and config["id2label"] == {"0": "label"}
    assert metrics["selection"]["metric"] == "mse"
    for split in ("validation", "test"):
        assert set(metrics["splits"][split]["student_retrieval"]) == {"pearson", "spearman", "mse"}
    assert metrics["splits"]["test"]["teacher"]["pearson"] > 0.5  # the teacher learned the scale, not noise
    assert "Pearson" in (distilled / "regression" / "out" / "model" / "README.md").read_text()


def test_multi_label_distils_with_f1_metrics_and_per_label_values(distilled):
    metrics = json.loads((distilled / "multi" / "out" / "metrics.json").read_text())
    config = json.loads((distilled / "multi" / "out" / "model" / "config.json").read_text())
    assert config["problem_type"] == MULTI_LABEL
    assert sorted(config["label2id"]) == ["music", "negative", "positive"]  # labels, not their combinations
    assert set(metrics["splits"]["test"]["student"]) == {"micro_f1", "macro_f1", "exact_match"}
    model, _ = editing.load_student(distilled / "multi" / "out" / "model")
    values = model.knowledge_base.values
    assert values.shape[1] == 3 and not torch.allclose(values.sum(-1), torch.ones(len(values)))  # not a softmax


def test_both_serve_in_a_fresh_process_without_the_package(distilled):
    got = run_fresh_python(
        f"""
        import json, torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
        results = {{}}
        for kind, out in [(k, o) for k in ("regression", "multi") for o in ("out", {MODERN_OUT!r})]:
            path = {str(distilled)!r} + "/" + kind + "/" + out + "/model"
            classifier = pipeline("text-classification", model=path, trust_remote_code=True)
            model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True).eval()
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
            text = "the movie was great fun music"
            with torch.no_grad():
                logits = model(**tokenizer([text], return_tensors="pt")).logits[0].tolist()
            results[kind + "/" + out] = [
                classifier(text), classifier(text, neighbors=2), logits, model.config.multi_label_threshold,
                json.load(open(path + "/config.json"))["encoder_config"]["model_type"],
            ]
        print(json.dumps(results))
        """,
        distilled,
    )  # fmt: skip
    for out, student_type in (("out", "bert"), (MODERN_OUT, "modernbert")):
        (served,), explained, logits, _, model_type = got[f"regression/{out}"]  # one text in, one result out
        assert model_type == student_type
        assert served["label"] == "label" and served["score"] == pytest.approx(logits[0], abs=1e-5)  # the number
        assert explained[0]["neighbors"] and all(isinstance(row["value"], float) for row in explained[0]["neighbors"])
        (served,), explained, logits, threshold, model_type = got[f"multi/{out}"]
        assert model_type == student_type
        assert sorted(item["label"] for item in served) == ["music", "negative", "positive"]  # every label
        for item in served:
            probability = torch.sigmoid(torch.tensor(logits[["music", "negative", "positive"].index(item["label"])]))
            assert item["score"] == pytest.approx(probability.item(), abs=1e-5)
            assert item["predicted"] == (item["score"] >= threshold)
        assert all("labels" in row and "label_scores" in row for row in explained[0]["neighbors"])


def test_kb_add_with_gold_labels_is_what_retrieval_then_returns(distilled, tmp_path):
    """A text added with its gold value is its own nearest neighbour (its key is the student's query): with β = 1
    and k = 1 the prediction is that value (the number; the smoothed label set)."""
    import shutil

    cases = (("regression", "4.25", None), ("multi", "positive;music", ["music", "positive"]))
    for (kind, label, expected), out in [(case, out) for case in cases for out in ("out", MODERN_OUT)]:
        model_dir = tmp_path / kind / out
        shutil.copytree(distilled / kind / out / "model", model_dir)
        text = "scene plot music fun fun"
        rows = tmp_path / f"{kind}.csv"
        write_rows(rows, "text,label", [f"{text},{label}"])
        size = editing.knowledge_base_info(model_dir)["size"]
        assert editing.add_rows(model_dir, rows, label_separator=";") == [size]
        assert editing.add_rows(model_dir, rows, label_separator=";", dedupe=True) == []  # same text, same label
        model, tokenizer = editing.load_student(model_dir)
        with torch.no_grad():
            logits = model(**tokenizer([text], return_tensors="pt"), knn_k=1, retrieval_weight=1.0).logits[0]
        if kind == "regression":
            assert logits.item() == pytest.approx(4.25, abs=1e-4)
        else:
            predicted = [model.config.id2label[i] for i, p in enumerate(torch.sigmoid(logits)) if p >= 0.5]
            assert sorted(predicted) == expected
            assert torch.sigmoid(logits).max().item() == pytest.approx(1 - editing.GOLD_LABEL_SMOOTHING, abs=1e-4)


def test_the_task_type_is_read_from_the_labels(tmp_path):
    def load(rows: list[str], header: str = "text,label", **kwargs):
        for split in ("train", "validation"):
            write_rows(tmp_path / f"{split}.csv", header, rows)
        files = {split: str(tmp_path / f"{split}.csv") for split in ("train", "validation")}
        return load_task_data(data_files=files, **kwargs)

    ratings = [f"text {i},{1 + i % 5}" for i in range(30)]
    assert load(ratings).problem_type == SINGLE_LABEL  # five integers: classes
    assert load(ratings, problem_type=REGRESSION).problem_type == REGRESSION  # unless forced
    scale = [f"text {i},{i / 7:.2f}" for i in range(30)]
    data = load(scale)
    assert data.problem_type == REGRESSION and data.splits["train"][3]["labels"] == pytest.approx(3 / 7, abs=1e-2)
    columns = load(
        [f"text {i},{i % 2},{i % 3 == 0}" for i in range(30)], "text,sports,music", label_column="sports,music"
    )
    assert columns.problem_type == MULTI_LABEL and columns.label_names == ["sports", "music"]
    assert columns.splits["train"][3]["labels"] == [1.0, 1.0]
    assert columns.splits["train"].column_names == ["text", "labels"]  # no other column reaches the model


def test_bad_labels_get_one_line_naming_the_file_and_row(tmp_path):
    def write(split: str, rows: list[str], header: str = "text,label") -> str:
        write_rows(tmp_path / f"{split}.csv", header, rows)
        return str(tmp_path / f"{split}.csv")

    train = write("train", [f"text {i},{i / 7:.2f}" for i in range(30)])
    validation = write("validation", ["a,0.5", "b,high"])
    with pytest.raises(InputError, match=r"line 3 of the validation .*validation\.csv.* 'high'"):
        load_task_data(data_files={"train": train, "validation": validation})

    train = write("train", ["a,music;politics", "b,sports"])
    validation = write("validation", ["c,music", "d,music;weather"])
    with pytest.raises(InputError, match=r"line 3 .* \['weather'\] never seen in training"):
        load_task_data(data_files={"train": train, "validation": validation}, label_separator=";")

    train = write("train", ["a,1,0", "b,0,2"], "text,music,sports")
    with pytest.raises(InputError, match=r"0 or 1: line 3 .* 2 in column 'sports'"):
        load_task_data(data_files={"train": train, "validation": train}, label_column="music,sports")


def test_a_teacher_head_of_another_task_type_is_refused(tmp_path):
    config = tiny_encoder().config
    config.id2label, config.label2id = {0: "similarity"}, {"similarity": 0}  # one output: an STS-B-style head
    BertForSequenceClassification(config).save_pretrained(tmp_path / "sts-teacher")
    with pytest.raises(InputError, match="regression head .* single_label_classification task"):
        needs_finetuning(str(tmp_path / "sts-teacher"), ["negative", "positive"], SINGLE_LABEL)
    assert needs_finetuning(str(tmp_path / "sts-teacher"), ["similarity"], REGRESSION) is False  # used as is


def test_positive_pairs_for_each_task_type():
    same_class = pair_weights(torch.tensor([0, 1, 0]), SINGLE_LABEL)
    assert same_class.tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    overlap = pair_weights(torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0]]), MULTI_LABEL)
    assert overlap[0, 1] == 0.5 and overlap[0, 2] == 0 and overlap[3, 4] == 1  # one of two labels shared: half
    distance = pair_weights(torch.tensor([0.0, 0.5, 1.0, 3.0]), REGRESSION, bandwidth=0.5)
    assert distance[0, 0] == 1 and distance[0, 1] > distance[0, 2] > distance[0, 3]  # closer targets, closer keys
    assert distance[0, 1].item() == pytest.approx(0.6065, abs=1e-4)  # one bandwidth apart: e^(-1/2)


def test_multi_label_and_regression_metrics_by_hand():
    probs = torch.tensor([[0.9, 0.2], [0.6, 0.7], [0.1, 0.4]])
    gold = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # predicted {0}, {0, 1}, {}: tp 2, fp 1, fn 1
    metrics = multi_label_metrics(probs, gold, threshold=0.5)
    assert metrics["micro_f1"] == pytest.approx(4 / 6)
    assert metrics["macro_f1"] == pytest.approx((1.0 + 0.0) / 2)  # label 0: F1 1; label 1: tp 0
    assert metrics["exact_match"] == pytest.approx(1 / 3)
    metrics = regression_metrics(torch.tensor([[1.0], [2.0], [10.0]]), torch.tensor([1.0, 2.0, 3.0]))
    assert metrics["spearman"] == pytest.approx(1.0) and metrics["pearson"] < 0.95  # monotone, not linear
    assert metrics["mse"] == pytest.approx(49 / 3)
    assert regression_metrics(torch.ones(3, 1), torch.tensor([1.0, 2.0, 3.0]))["pearson"] == 0.0  # constant


def test_a_query_that_retrieved_nothing_keeps_the_students_prediction_for_any_value():
    student, retrieved = torch.tensor([[2.0], [3.0]]), torch.tensor([[4.0], [0.0]])  # regression values
    mixed = mix_probabilities(student, retrieved, 0.5, top_similarity=torch.tensor([0.8, float("-inf")]))
    assert mixed.flatten().tolist() == [3.0, 3.0]  # a found 4.0 is mixed in; a missing neighbour is no 0.0
