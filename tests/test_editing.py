"""Editing a saved student's knowledge base without retraining: `hf-reaugkd kb add/remove`, `explain`."""

import csv
import json
import logging
import shutil

import pytest
import torch
from conftest import pipeline_args, run_fresh_python

from hf_reaugkd import cli, editing
from hf_reaugkd.distill import main
from hf_reaugkd.errors import InputError


@pytest.fixture
def saved(task):
    main(pipeline_args(task, task / "out", "--num_train_epochs", "1"))
    return task, task / "out" / "model"


def predictions(model_dir, texts, **kwargs):
    model, tokenizer = editing.load_student(model_dir)
    with torch.no_grad():
        inputs = tokenizer(texts, padding=True, return_tensors="pt")
        return model(**inputs, knn_k=4, retrieval_weight=1.0, output_neighbors=True, **kwargs)


def write_rows(path, rows):
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["text", "label"], *rows])


def test_teacher_keys_new_rows_exactly_as_in_training(saved):
    """Training rows added again through the teacher and the saved projection head get the same keys and soft
    labels as the rows the pipeline distilled: the edit path is the training path."""
    root, model_dir = saved
    with (root / "train.csv").open() as f:
        train = list(csv.DictReader(f))[:5]
    write_rows(root / "again.csv", [[row["text"], row["label"]] for row in train])
    before, _ = editing.load_student(model_dir)
    teacher = next(
        p
        for p in (root / "out" / "stages").iterdir()
        if p.name.split("-")[1].isalnum() and p.name.startswith("teacher-") and "outputs" not in p.name
    )
    ids = editing.add_rows(model_dir, root / "again.csv", teacher=teacher)
    after, _ = editing.load_student(model_dir)
    assert ids == list(range(96, 101)) and after.knowledge_base.size == 101
    # the same texts are the KB's first 5 rows (train.csv's order): each new row equals its own original
    torch.testing.assert_close(after.knowledge_base.keys[96:], before.knowledge_base.keys[:5], atol=1e-5, rtol=0)
    torch.testing.assert_close(after.knowledge_base.values[96:], before.knowledge_base.values[:5], atol=1e-5, rtol=0)


def test_gold_rows_are_found_and_removing_them_restores_predictions_exactly(saved):
    """What "restores" guarantees: `kb remove` of the rows a `kb add` added gives back the knowledge base byte for
    byte (the stored rows are never normalised again), so every prediction is the same bit for bit on any CPU."""
    root, model_dir = saved
    texts = ["great fun great", "awful boring awful", "the plot"]
    original = predictions(model_dir, texts)
    original_state = editing.load_student(model_dir)[0].state_dict()
    (model_dir / ".git" / "refs").mkdir(parents=True)  # a cloned Hub repo: the edit must keep its history
    (model_dir / ".git" / "refs" / "main").write_text("abc123\n")
    write_rows(root / "new.csv", [[text, "positive"] for text in texts])
    ids = editing.add_rows(model_dir, root / "new.csv")
    edited = predictions(model_dir, texts)
    # each text's own gold row is its nearest neighbour (keyed by the student's own query) and votes "positive"
    assert edited.neighbor_ids[:, 0].tolist() == ids
    model, _ = editing.load_student(model_dir)
    positive = model.config.label2id["positive"]
    assert model.knowledge_base.values[ids, positive].tolist() == pytest.approx([0.9] * 3)
    assert not torch.equal(edited.logits, original.logits)
    removed = editing.remove_rows(model_dir, ids=ids)
    assert removed == ids
    restored = predictions(model_dir, texts)
    assert (model_dir / ".git" / "refs" / "main").read_text() == "abc123\n"
    restored_state = editing.load_student(model_dir)[0].state_dict()
    assert all(torch.equal(restored_state[name], tensor) for name, tensor in original_state.items())
    assert torch.equal(restored.neighbor_ids, original.neighbor_ids)
    torch.testing.assert_close(restored.logits, original.logits, atol=0, rtol=0)


def test_edited_model_loads_in_a_fresh_process_without_the_package(saved, tmp_path):
    root, model_dir = saved
    write_rows(root / "new.csv", [["great fun", "positive"]])
    editing.add_rows(model_dir, root / "new.csv")
    got = run_fresh_python(
        f"""
        import json
        from transformers import AutoModelForSequenceClassification
        model = AutoModelForSequenceClassification.from_pretrained({str(model_dir)!r}, trust_remote_code=True)
        print(json.dumps([model.config.kb_size, model.knowledge_base.size]))
        """,
        tmp_path,
    )
    assert got == [97, 97]
    assert json.loads((model_dir / "config.json").read_text())["kb_size"] == 97


def test_kb_cli_info_remove_by_label_explain_and_errors(saved, capsys):
    root, model_dir = saved
    write_rows(root / "new.csv", [["great fun", "positive"], ["fun great", "positive"]])
    cli.main(["kb", "add", str(model_dir), "--file", str(root / "new.csv")])
    assert "added 2 rows (ids 96–97)" in capsys.readouterr().out
    cli.main(["kb", "info", str(model_dir)])
    info = json.loads(capsys.readouterr().out)
    assert info["size"] == 98 and sum(info["rows_per_label"].values()) == 98
    assert info["teacher_projection"]["max_seq_length"] == 16
    positive = info["rows_per_label"]["positive"]
    assert positive >= 2
    cli.main(["kb", "remove", str(model_dir), "--where-label", "positive"])
    assert f"removed {positive} rows" in capsys.readouterr().out
    model, _ = editing.load_student(model_dir)
    assert model.knowledge_base.size == 98 - positive
    assert (model.knowledge_base.values.argmax(dim=1) != model.config.label2id["positive"]).all()
    cli.main(["explain", str(model_dir), "great fun", "--neighbors", "2"])
    assert capsys.readouterr().out.startswith("prediction: ")
    for argv, message in (
        (["kb", "remove", str(model_dir), "--ids", "1.7"], "--ids takes comma-separated row numbers"),
        (["kb", "remove", str(model_dir), "--ids", "5000"], "Ids to remove must be in"),
        (["kb", "remove", str(model_dir), "--where-label", "neutral"], "Unknown label 'neutral'"),
        (["kb", "add", str(model_dir), "--file", str(root / "train.csv"), "--label_column_name", "gold"], "gold"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_stored_texts_explain_neighbours_and_follow_edits(task, tmp_path):
    """--store_kb_texts: the training texts travel in their own safetensors file, are read only when an explanation
    needs them, show up with the neighbours in a fresh process, and stay in step with kb add / remove."""
    main(pipeline_args(task, task / "out", "--num_train_epochs", "1", "--store_kb_texts"))
    model_dir = task / "out" / "model"
    assert (model_dir / "knowledge_base_texts.safetensors").is_file()
    with (task / "train.csv").open() as f:
        train_texts = [row["text"] for row in csv.DictReader(f)]
    model, _ = editing.load_student(model_dir)
    kb = model.knowledge_base
    assert kb._texts is None and kb.has_texts  # not read with the weights
    assert sorted(kb.texts) == sorted(train_texts)  # (the KB follows the training split's order)
    got = run_fresh_python(
        f"""
        import json
        from transformers import pipeline
        classifier = pipeline("text-classification", model={str(model_dir)!r}, trust_remote_code=True)
        print(json.dumps(classifier("great fun", neighbors=3)))
        """,
        tmp_path,
    )
    assert all(row["text"] == kb.texts[row["id"]] for row in got[0]["neighbors"])

    write_rows(task / "new.csv", [["great great fun", "positive"]])
    [new_id] = editing.add_rows(model_dir, task / "new.csv")
    edited, _ = editing.load_student(model_dir)
    assert edited.knowledge_base.texts[new_id] == "great great fun"
    editing.remove_rows(model_dir, ids=[0, new_id])
    trimmed, _ = editing.load_student(model_dir)
    assert trimmed.knowledge_base.texts == kb.texts[1:]

    (model_dir / "knowledge_base_texts.safetensors").write_bytes(b"not safetensors")
    broken, _ = editing.load_student(model_dir)  # the weights load; the texts fail when read, saying where
    with pytest.raises(ValueError, match="Could not read the knowledge-base texts"):
        _ = broken.knowledge_base.texts


def test_pair_task_rows_are_keyed_from_both_texts(task):
    """A model trained on text pairs: `kb add --text_pair_column_name` keys new rows from both texts, exactly as the
    pipeline keyed the training rows, and stores their texts the same way; `explain --text_pair` runs."""
    for split in ("train", "validation", "test"):
        with (task / f"{split}.csv").open() as f:
            rows = list(csv.DictReader(f))
        with (task / f"{split}.csv").open("w", newline="") as f:
            csv.writer(f).writerows(
                [["text", "second", "label"]] + [[r["text"], r["text"][::-1], r["label"]] for r in rows]
            )
    args = pipeline_args(task, task / "out", "--num_train_epochs", "1", "--text_pair_column_name", "second")
    main([*args, "--store_kb_texts"])
    model_dir = task / "out" / "model"
    teacher = next(
        p for p in (task / "out" / "stages").iterdir() if p.name.startswith("teacher-") and "outputs" not in p.name
    )
    with (task / "train.csv").open() as f:
        first = list(csv.DictReader(f))[:3]
    with (task / "again.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["text", "second", "label"]] + [[r["text"], r["second"], r["label"]] for r in first])
    before, _ = editing.load_student(model_dir)
    ids = editing.add_rows(model_dir, task / "again.csv", teacher=teacher, text_pair_column="second")
    after, _ = editing.load_student(model_dir)
    # keyed from both texts, as in training: each new row equals its own original (the KB's first 3 rows)
    torch.testing.assert_close(after.knowledge_base.keys[ids], before.knowledge_base.keys[:3], atol=1e-5, rtol=0)
    assert [after.knowledge_base.texts[i] for i in ids] == [f"{r['text']}\n{r['second']}" for r in first]
    assert cli.explain(str(model_dir), "great fun", 2, text_pair="nuf taerg").startswith("prediction: ")


@pytest.fixture
def saved_with_texts(task):
    main(pipeline_args(task, task / "out", "--num_train_epochs", "1", "--store_kb_texts"))
    return task, task / "out" / "model"


def test_rows_from_python_a_dataset_and_a_file_get_the_same_keys(saved_with_texts, tmp_path):
    """`add_texts` (Python lists), `add_rows` with a `datasets.Dataset` (a 🤗 split) and with a file are one path: the
    same rows get the same keys, soft labels and texts whichever way they come."""
    from datasets import Dataset

    root, model_dir = saved_with_texts
    rows = [["great great fun", "positive"], ["awful awful plot", "negative"]]
    write_rows(root / "new.csv", rows)
    copies = {}
    for name in ("file", "dataset", "python"):
        copy = tmp_path / name
        shutil.copytree(model_dir, copy)
        copies[name] = copy
    editing.add_rows(copies["file"], root / "new.csv")
    editing.add_rows(
        copies["dataset"], Dataset.from_dict({"text": [t for t, _ in rows], "label": [lb for _, lb in rows]})
    )
    ids = editing.add_texts(copies["python"], [t for t, _ in rows], [lb for _, lb in rows])
    assert ids == [96, 97]
    kbs = {name: editing.load_student(path)[0].knowledge_base for name, path in copies.items()}
    for name in ("dataset", "python"):
        assert torch.equal(kbs[name].keys, kbs["file"].keys) and torch.equal(kbs[name].values, kbs["file"].values)
        assert kbs[name].texts == kbs["file"].texts and kbs[name].texts[-2:] == [t for t, _ in rows]
    with pytest.raises(InputError, match="differ in length"):
        editing.add_texts(copies["python"], ["one", "two"], ["positive"])
    with pytest.raises(InputError, match=r"labels \['so-so'\] that the model does not know \(first at row 1\)"):
        editing.add_texts(copies["python"], ["one", "two"], ["positive", "so-so"])


def test_dedupe_skips_texts_already_in_the_knowledge_base_and_repeats(saved_with_texts, capsys):
    root, model_dir = saved_with_texts
    with (root / "train.csv").open() as f:
        known = next(csv.DictReader(f))  # a training row: its text is in the knowledge base
    write_rows(
        root / "new.csv",
        [[known["text"], known["label"]], ["brand new text", "positive"], ["brand new text", "positive"]],
    )
    before = (model_dir / "model.safetensors").read_bytes()
    assert editing.add_rows(model_dir, root / "new.csv", dedupe=True) == [96]  # one new text, once
    kb = editing.load_student(model_dir)[0].knowledge_base
    assert kb.size == 97 and kb.texts[96] == "brand new text"
    after = (model_dir / "model.safetensors").read_bytes()
    cli.main(["kb", "add", str(model_dir), "--file", str(root / "new.csv"), "--dedupe"])  # all there now
    assert "added no rows (all were there)" in capsys.readouterr().out
    assert (model_dir / "model.safetensors").read_bytes() == after != before  # nothing rewritten the second time


def test_dedupe_needs_stored_texts(saved):
    root, model_dir = saved
    write_rows(root / "new.csv", [["brand new text", "positive"]])
    with pytest.raises(InputError, match="--dedupe compares texts, and this knowledge base stores none"):
        editing.add_rows(model_dir, root / "new.csv", dedupe=True)


def test_kb_add_from_a_dataset_that_cannot_be_loaded_says_which(saved, capsys):
    _, model_dir = saved
    with pytest.raises(SystemExit):
        cli.main(
            ["kb", "add", str(model_dir), "--dataset_name", str(model_dir / "no-such-dataset"), "--split", "test"]
        )
    assert "Could not load split 'test' of --dataset_name" in capsys.readouterr().err


def test_retune_chooses_k_and_beta_on_fresh_rows_and_writes_them(saved_with_texts, capsys):
    """`kb retune` scores the grid on fresh labelled rows, as the pipeline does on validation, and writes the best
    setting into the saved config; rows the knowledge base holds are left out (a query finding itself flatters
    retrieval), and rows that are all in it are refused."""
    root, model_dir = saved_with_texts
    result = editing.retune(model_dir, root / "validation.csv", [1, 2, 4], [0.0, 0.5, 1.0], fit_gate=False)
    assert result["rows"] == 32 and result["after"]["accuracy"] >= result["before"]["accuracy"] - 1e-9
    config = json.loads((model_dir / "config.json").read_text())
    chosen = (result["after"]["knn_k"], result["after"]["retrieval_weight"])
    assert (config["knn_k"], config["retrieval_weight"]) == chosen and config["retrieval_gate"] is None
    # the same rows again: the setting now written scores what was reported as chosen; a gate is kept only if it wins
    again = editing.retune(model_dir, root / "validation.csv", [1, 2, 4], [0.0, 0.5, 1.0])
    assert again["before"]["accuracy"] == pytest.approx(result["after"]["accuracy"])
    config = json.loads((model_dir / "config.json").read_text())
    assert (config["retrieval_gate"] is not None) == again["gate"]["used"]
    with pytest.raises(InputError, match="No row of the rows file .* is outside the knowledge base"):
        editing.retune(model_dir, root / "train.csv", [1], [0.5])
    cli.main(["kb", "retune", str(model_dir), "--file", str(root / "validation.csv"), "--knn_k_grid", "1,4"])
    assert "on 32 rows: k=" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(
            ["kb", "retune", str(model_dir), "--file", str(root / "validation.csv"), "--retrieval_weight_grid", "2"]
        )
    assert "--retrieval_weight_grid takes comma-separated β in [0, 1], got '2'" in capsys.readouterr().err


def test_a_hub_split_with_class_ids_is_added_by_label_name(saved):
    """A 🤗 dataset stores labels as `ClassLabel` ids: they are the model's label names, not the strings "0" / "1"."""
    from datasets import ClassLabel, Dataset, Features, Value

    _, model_dir = saved
    features = Features({"text": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    split = Dataset.from_dict({"text": ["great great fun", "awful awful plot"], "label": [1, 0]}, features=features)
    assert editing.add_rows(model_dir, split) == [96, 97]
    values = editing.load_student(model_dir)[0].knowledge_base.values[96:]
    config = json.loads((model_dir / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in values.argmax(dim=1).tolist()] == ["positive", "negative"]


def test_dedupe_keeps_a_known_text_given_another_label(saved_with_texts):
    """A correction (a known text with a new gold label) is added; the same text with its stored label is not."""
    root, model_dir = saved_with_texts
    kb = editing.load_student(model_dir)[0].knowledge_base
    config = json.loads((model_dir / "config.json").read_text())
    stored = config["id2label"][str(kb.values[0].argmax().item())]
    other = "negative" if stored == "positive" else "positive"
    assert editing.add_texts(model_dir, [kb.texts[0], kb.texts[0]], [stored, other], dedupe=True) == [96]


def test_retune_on_rows_of_one_label_warns(saved_with_texts, caplog):
    """Rows that all carry one label (a new sub-topic's validation rows) reward any lean towards it: retune says so
    and names the label; rows of every label pass without a word."""
    root, model_dir = saved_with_texts
    with (root / "validation.csv").open(newline="") as f:
        rows = [(row["text"], row["label"]) for row in csv.DictReader(f)]
    write_rows(root / "positive.csv", [row for row in rows if row[1] == "positive"])
    with caplog.at_level(logging.WARNING, logger="hf_reaugkd.editing"):
        editing.retune(model_dir, root / "validation.csv", [1], [0.0, 1.0], fit_gate=False)
        assert "are labelled" not in caplog.text
        editing.retune(model_dir, root / "positive.csv", [1], [0.0, 1.0], fit_gate=False)
    assert "rows of the rows file" in caplog.text and "are labelled 'positive'" in caplog.text


def test_retune_chooses_only_among_the_ks_it_is_given(saved_with_texts):
    root, model_dir = saved_with_texts
    config = json.loads((model_dir / "config.json").read_text())
    grid = [k for k in (1, 2) if k != config["knn_k"]][:1]
    result = editing.retune(model_dir, root / "validation.csv", grid, [0.0, 1.0], fit_gate=False)
    assert (
        result["after"]["knn_k"] == grid[0] and json.loads((model_dir / "config.json").read_text())["knn_k"] == grid[0]
    )


def test_gold_rows_are_found_by_their_own_texts_not_by_every_query(saved_with_texts):
    """A gold row is keyed by its text's query minus the mean query the pipeline recorded: the text itself finds it,
    while the test split's texts (nothing like the new rows) keep their teacher-keyed neighbours. Keyed by raw
    queries, which share a common direction, the same rows would be nearly every test query's nearest neighbour."""
    root, model_dir = saved_with_texts
    config = json.loads((model_dir / "config.json").read_text())
    assert len(config["query_mean"]) == config["kb_dim"]
    # the task's words, in runs no training text has (each training text is three filler words and one sentiment)
    new_texts = [
        "actor actor actor actor actor",
        "scene scene scene",
        "plot story plot story",
        "the the the the",
        "movie",
    ]
    ids = editing.add_texts(model_dir, new_texts, ["positive"] * len(new_texts))
    own = predictions(model_dir, new_texts)
    assert own.neighbor_ids[:, 0].tolist() == ids
    with (root / "test.csv").open() as f:
        test_texts = [row["text"] for row in csv.DictReader(f)]
    nearest = predictions(model_dir, test_texts).neighbor_ids[:, 0]
    share = (nearest >= ids[0]).float().mean().item()  # 5 rows of 101: found by chance ~5% of the time
    assert share < 0.25, f"the new rows are the nearest neighbour of {share:.0%} of the test queries"


def test_a_checkpoint_without_a_query_mean_measures_it_on_its_stored_texts_or_says_what_to_do(saved_with_texts):
    _, model_dir = saved_with_texts
    config = json.loads((model_dir / "config.json").read_text())
    recorded, config["query_mean"] = config["query_mean"], None  # as an earlier hf-reaugkd saved it
    (model_dir / "config.json").write_text(json.dumps(config))
    measured = editing.record_query_mean(model_dir)
    assert json.loads((model_dir / "config.json").read_text())["query_mean"] == measured
    # measured on the training texts, recorded on validation: the same domain, so nearly the same direction
    assert torch.nn.functional.cosine_similarity(torch.tensor(measured), torch.tensor(recorded), dim=0) > 0.9
    config["kb_has_texts"] = False
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "knowledge_base_texts.safetensors").unlink()
    with pytest.raises(InputError, match="records no query_mean .* add the rows with --teacher"):
        editing.add_texts(model_dir, ["great"], ["positive"])
