"""The teacher's side: knowledge-base neighbours, the projection head, the keys and soft labels, and the check that
decides whether the teacher is fine-tuned."""

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import random_kb, tiny_encoder
from transformers import BertConfig

import hf_reaugkd.teacher as teacher
from hf_reaugkd import KnowledgeBase
from hf_reaugkd.arguments import ModelArguments
from hf_reaugkd.teacher import (
    StackedRows,
    knowledge_base_neighbors,
    needs_finetuning,
    project,
    soft_labels,
    train_teacher_projection,
)


def unit(n: int, d: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def duplicated_kb() -> KnowledgeBase:
    """20 keys where rows 0, 1 and 2 are one key three times and rows 10 and 11 another one twice."""
    keys = unit(20)
    keys[1] = keys[2] = keys[0]
    keys[11] = keys[10]
    values = torch.softmax(torch.randn(20, 3, generator=torch.Generator().manual_seed(2)), dim=-1)
    return KnowledgeBase.build(keys, values)


def others_in_rank_order(kb: KnowledgeBase, num_neighbors: int) -> torch.Tensor:
    """Reference: each row's exact ranking (num_neighbors + 1 hits) with the row's own id removed."""
    _, ids = kb.search(kb.keys, num_neighbors + 1)
    return torch.stack([row[row != i][:num_neighbors] for i, row in enumerate(ids)])


@pytest.mark.parametrize("chunk_rows", [65_536, 3])
def test_own_rows_drop_the_row_itself_even_behind_a_tied_duplicate(monkeypatch, chunk_rows):
    monkeypatch.setattr(teacher, "CHUNK_ROWS", chunk_rows)  # 3: rows are numbered across chunks
    kb = duplicated_kb()
    _, ids = kb.search(kb.keys, 5)
    # the duplicates tie: for some row a copy of its key is ranked before the row itself
    assert any(ids[i, 0].item() != i for i in (0, 1, 2, 10, 11))
    neighbors = knowledge_base_neighbors(kb, kb.keys, 4, own_rows=True)
    assert neighbors.shape == (20, 4) and neighbors.dtype == torch.long
    for i, row in enumerate(neighbors.tolist()):
        assert i not in row, (i, row)
        assert len(set(row)) == 4, (i, row)
    assert torch.equal(neighbors, others_in_rank_order(kb, 4))
    # the tied copies are each other's nearest rows
    assert set(neighbors[0, :2].tolist()) == {1, 2} and set(neighbors[1, :2].tolist()) == {0, 2}
    assert neighbors[10, 0].item() == 11 and neighbors[11, 0].item() == 10


def test_own_rows_with_every_other_row_as_neighbour():
    kb = random_kb(6)
    neighbors = knowledge_base_neighbors(kb, kb.keys, 5, own_rows=True)
    for i, row in enumerate(neighbors.tolist()):
        assert sorted(row) == [j for j in range(6) if j != i]
    assert torch.equal(neighbors, others_in_rank_order(kb, 5))


def test_queries_outside_the_knowledge_base_get_the_plain_top_n(monkeypatch):
    monkeypatch.setattr(teacher, "CHUNK_ROWS", 4)
    kb = random_kb(30)
    queries = unit(9, seed=5)
    neighbors = knowledge_base_neighbors(kb, queries, 3, own_rows=False)
    assert torch.equal(neighbors, (queries @ kb.keys.T).topk(3, dim=1).indices)


def fake_search(results: list[list[int]]):
    """A search that returns the given ids (-1: missing, with score -inf) for row i of the whole key set."""
    table, served = torch.tensor(results), [0]

    def search(queries, k):
        start = served[0]  # the next chunk continues where the previous one stopped
        ids = table[start : start + len(queries), :k].clone()
        served[0] += len(queries)
        scores = torch.linspace(0.9, 0.1, k).expand(len(queries), k).masked_fill(ids < 0, float("-inf"))
        return scores, ids

    return search


def exact_neighbors(kb, queries, n, exclude=None):
    """Brute force: the n best inner products, optionally without each query's own row."""
    scores = queries @ kb.keys.T  # (B, N)
    if exclude is not None:
        scores[torch.arange(len(queries)), exclude] = float("-inf")
    return scores.topk(n, dim=1).indices.tolist()


def test_rows_with_missing_hits_are_searched_again_exactly(monkeypatch):
    """An approximate index: rows whose hits are complete keep its ranking (own row dropped wherever it is);
    rows with a -1 are searched again exactly, so no -1 (which would read `keys[-1]`) ever comes back."""
    monkeypatch.setattr(teacher, "CHUNK_ROWS", 2)
    kb = random_kb(10)
    monkeypatch.setattr(
        kb,
        "search",
        fake_search(
            [
                [0, 5, -1, -1],  # self first, one other hit: exact search again
                [7, 1, 3, 2],  # a tie ranked before self: the index's order without self
                [4, 6, -1, -1],  # self not found, missing hits: exact search again
                [8, 9, 2, 3],  # all found, self absent: plain top 3
            ]
        ),
    )
    neighbors = knowledge_base_neighbors(kb, kb.keys[:4], 3, own_rows=True)
    exact = exact_neighbors(kb, kb.keys[:4], 3, exclude=torch.arange(4))
    assert neighbors.tolist() == [exact[0], [7, 3, 2], exact[2], [8, 9, 2]]


@pytest.mark.parametrize("own_rows", [True, False])
def test_a_row_without_any_hit_gets_its_exact_neighbours(monkeypatch, own_rows):
    kb = random_kb(10)
    monkeypatch.setattr(kb, "search", fake_search([[0, -1, -1], [-1, -1, -1], [2, 4, 5]]))
    neighbors = knowledge_base_neighbors(kb, kb.keys[:3], 2, own_rows=own_rows)
    exact = exact_neighbors(kb, kb.keys[:3], 2, exclude=torch.arange(3) if own_rows else None)
    assert neighbors[:2].tolist() == exact[:2]
    assert neighbors[2].tolist() == ([4, 5] if own_rows else [2, 4])
    assert ((neighbors >= 0) & (neighbors < kb.size)).all()


def test_more_neighbours_than_other_entries_is_refused():
    kb = random_kb(4)
    with pytest.raises(ValueError, match="relational_neighbors=4 needs a knowledge base of more entries; it has 4"):
        knowledge_base_neighbors(kb, kb.keys, 4, own_rows=True)


# Projection head ------------------------------------------------------------------------------------------------


def clustered_embeddings(n_per_class: int = 20, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """Three classes told apart by a small signal in dims 0–1, hidden under large per-example noise in dims 2–9."""
    rng = np.random.default_rng(seed)
    centres = np.array([[1.0, 0.0], [-0.5, 0.87], [-0.5, -0.87]])
    labels = np.repeat(np.arange(3), n_per_class)
    signal = centres[labels] + 0.05 * rng.standard_normal((len(labels), 2))
    noise = 3.0 * rng.standard_normal((len(labels), 8))
    return np.concatenate([signal, noise], axis=1).astype(np.float32), torch.from_numpy(labels)


def cosine_margin(keys: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean same-label cosine (without self-pairs) minus mean cross-label cosine."""
    cos = keys @ keys.T
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~torch.eye(len(labels), dtype=torch.bool)
    return (cos[same & off_diagonal].mean() - cos[~same].mean()).item()


def test_projection_learns_label_clusters_from_a_read_only_memmap(tmp_path):
    embeddings, labels = clustered_embeddings()
    np.save(tmp_path / "embeddings.npy", embeddings)
    mapped = np.load(tmp_path / "embeddings.npy", mmap_mode="r")
    assert not mapped.flags.writeable
    untrained = train_teacher_projection(mapped, labels, kb_dim=4, num_epochs=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. torch's "non-writable NumPy array"
        projection = train_teacher_projection(
            mapped, labels, kb_dim=4, num_epochs=60, learning_rate=3e-2, batch_size=16
        )
    keys = project(projection, mapped)
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(len(keys)))
    before, after = cosine_margin(project(untrained, mapped), labels), cosine_margin(keys, labels)
    assert before < 0.3 < 0.6 < after, (before, after)
    # and every key's nearest other key shares its label
    cos = keys @ keys.T - 2 * torch.eye(len(keys))
    assert (labels[cos.argmax(dim=1)] == labels).float().mean() > 0.95
    assert np.array_equal(np.load(tmp_path / "embeddings.npy"), embeddings)  # the file is only read


def test_project_is_normalised_linear_map_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(teacher, "CHUNK_ROWS", 3)
    rng = np.random.default_rng(1)
    np.save(tmp_path / "h.npy", rng.standard_normal((8, 5)).astype(np.float32))
    embeddings = np.load(tmp_path / "h.npy", mmap_mode="r")
    projection = torch.nn.Linear(5, 4)
    keys = project(projection, embeddings)
    assert keys.shape == (8, 4) and keys.dtype == torch.float32
    weight, bias = projection.weight.detach().double().numpy(), projection.bias.detach().double().numpy()
    for i in range(8):
        y = [sum(weight[r, c] * float(embeddings[i, c]) for c in range(5)) + bias[r] for r in range(4)]
        norm = math.sqrt(sum(v * v for v in y))
        assert keys[i].tolist() == pytest.approx([v / norm for v in y], abs=1e-6)
    # a worked example: W = [[1, 0], [0, 2]], b = (0, 1): h = (3, 1.5) → (3, 4) → (0.6, 0.8)
    hand = torch.nn.Linear(2, 2)
    with torch.no_grad():
        hand.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        hand.bias.copy_(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(project(hand, np.array([[3.0, 1.5]], dtype=np.float32)), torch.tensor([[0.6, 0.8]]))


def test_soft_labels_are_tempered_softmax_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(teacher, "CHUNK_ROWS", 3)
    # T = 2: (0, 2 ln 3) → e^0, e^{ln 3} = 1, 3 → (1/4, 3/4); equal logits → uniform; huge logits stay finite
    logits = np.array(
        [[0.0, 2 * math.log(3), -1e30], [5.0, 5.0, 5.0], [1000.0, 0.0, 0.0], [0.0, 0.0, 2 * math.log(2)]]
        + np.random.default_rng(2).standard_normal((3, 3)).tolist(),
        dtype=np.float32,
    )
    np.save(tmp_path / "logits.npy", logits)
    mapped = np.load(tmp_path / "logits.npy", mmap_mode="r")
    values = soft_labels(mapped, temperature=2.0)
    assert values.shape == (7, 3) and torch.isfinite(values).all()
    torch.testing.assert_close(values[0], torch.tensor([0.25, 0.75, 0.0]))
    torch.testing.assert_close(values[1], torch.full((3,), 1 / 3))
    torch.testing.assert_close(values[2], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(values[3], torch.tensor([1 / 4, 1 / 4, 2 / 4]))  # e^0, e^0, e^{ln 2}
    for i in range(4, 7):
        exps = [math.exp(float(v) / 2.0) for v in logits[i]]
        assert values[i].tolist() == pytest.approx([e / sum(exps) for e in exps], abs=1e-6)


# Fine-tuning decision -------------------------------------------------------------------------------------------


def save_config(path, architecture: str | None, id2label: dict | None = None):
    config = BertConfig(**{**tiny_encoder().config.to_dict(), "architectures": None})
    if architecture:
        config.architectures = [architecture]
    if id2label is not None:
        config.id2label = id2label
        config.label2id = {label: i for i, label in id2label.items()}
    config.save_pretrained(path)
    return str(path)


def test_needs_finetuning(tmp_path):
    labels = ["negative", "positive"]
    classifier = "BertForSequenceClassification"
    tiny_encoder().save_pretrained(tmp_path / "encoder")
    assert needs_finetuning(str(tmp_path / "encoder"), labels) is True  # an encoder: no classifier at all
    assert needs_finetuning(save_config(tmp_path / "generic", classifier), labels) is True  # LABEL_0, LABEL_1
    generic_3 = save_config(tmp_path / "generic-3", classifier, {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"})
    assert needs_finetuning(generic_3, labels) is True
    matching = save_config(tmp_path / "matching", classifier, {0: "negative", 1: "positive"})
    assert needs_finetuning(matching, labels) is False
    foreign = save_config(tmp_path / "foreign", classifier, {0: "sports", 1: "politics"})
    with pytest.raises(ValueError, match=r"classifier for the labels \['sports', 'politics'\]"):
        needs_finetuning(foreign, labels)
    swapped = save_config(tmp_path / "swapped", classifier, {0: "positive", 1: "negative"})  # ids would be crossed
    with pytest.raises(ValueError, match=r"in another order \(\['positive', 'negative'\]; the data's ids follow"):
        needs_finetuning(swapped, labels)


def test_encoder_saved_with_the_task_labels_still_needs_finetuning(tmp_path):
    """An encoder (no classification head) whose config carries the task's label names, e.g. the `.bert` of a
    fine-tuned classifier saved on its own: there is no head to use, and its labels do not differ from the data's."""
    encoder = save_config(tmp_path / "encoder", "BertModel", {0: "negative", 1: "positive"})
    assert needs_finetuning(encoder, ["negative", "positive"]) is True


# Unlabelled rows: read beside the train rows, keyed by the head trained on labelled rows ------------------------


def test_stacked_rows_read_like_the_concatenation(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 3)).astype(np.float32) for n in (5, 1, 4)]
    for i, part in enumerate(parts):
        np.save(tmp_path / f"{i}.npy", part)
    stacked = StackedRows([np.load(tmp_path / f"{i}.npy", mmap_mode="r") for i in range(3)])
    whole = np.concatenate(parts)
    assert len(stacked) == 10 and stacked.shape == (10, 3) and stacked.dtype == np.float32
    for rows in (slice(0, 10), slice(3, 7), slice(8, 100), slice(6, 6)):
        assert np.array_equal(stacked[rows], whole[rows])
    rows = np.array([9, 0, 5, 5, 4, 6])  # any order, repeats, across every part
    assert np.array_equal(stacked[rows], whole[rows])


def test_knowledge_base_holds_unlabelled_rows_after_the_train_rows(tmp_path, monkeypatch):
    embeddings, labels = clustered_embeddings(n_per_class=8)  # 24 labelled rows
    rng = np.random.default_rng(3)
    arrays = {
        "train": (embeddings, rng.standard_normal((24, 3)).astype(np.float32)),
        "unlabeled": (rng.standard_normal((7, 10)).astype(np.float32), rng.standard_normal((7, 3)).astype(np.float32)),
    }
    outputs = {}
    for name, (split_embeddings, logits) in arrays.items():
        np.save(tmp_path / f"{name}-embeddings.npy", split_embeddings)
        np.save(tmp_path / f"{name}-logits.npy", logits)
        outputs[name] = teacher.TeacherOutputs(
            logits=np.load(tmp_path / f"{name}-logits.npy", mmap_mode="r"),
            embeddings=np.load(tmp_path / f"{name}-embeddings.npy", mmap_mode="r"),
            fingerprint="same-stage",
        )
    trained_on = []
    original = teacher.train_teacher_projection

    def spy(embeddings, labels, *args, **kwargs):
        trained_on.append((len(embeddings), len(labels)))
        return original(embeddings, labels, *args, **kwargs)

    monkeypatch.setattr(teacher, "train_teacher_projection", spy)
    model_args = ModelArguments(projection_num_epochs=2)
    projection, kb = teacher.knowledge_base_stage(outputs, labels, model_args, 4, 2.0, 0, tmp_path / "stages")
    assert trained_on == [(24, 24)]  # the SupCon head sees the labelled rows only
    assert kb.size == 31
    torch.testing.assert_close(kb.keys[:24], project(projection, outputs["train"].embeddings))
    torch.testing.assert_close(kb.keys[24:], project(projection, outputs["unlabeled"].embeddings))
    torch.testing.assert_close(kb.values[24:], soft_labels(outputs["unlabeled"].logits, 2.0))
    # a knowledge base over the train rows alone is another stage
    _, train_only = teacher.knowledge_base_stage(
        {"train": outputs["train"]}, labels, model_args, 4, 2.0, 0, tmp_path / "stages"
    )
    assert train_only.size == 24 and len(list((tmp_path / "stages").glob("knowledge-base-*"))) == 2


def test_cached_neighbour_column_follows_the_neighbours_not_only_the_stage_inputs(tmp_path):
    """The same keys and stage inputs can give other neighbours (an HNSW/IVF search setting changed): a dataset with
    a cache of its own (Hub or saved to disk) must not serve the earlier run's column."""
    from datasets import Dataset, load_from_disk

    Dataset.from_dict({"text": ["a", "b", "c"], "labels": [0, 1, 0]}).save_to_disk(tmp_path / "data")
    dataset = load_from_disk(tmp_path / "data")  # has cache files, so `map` results are cached
    outputs = teacher.TeacherOutputs(np.zeros((3, 2), np.float32), np.zeros((3, 4), np.float32), "teacher")
    stage_inputs = ("train", "keys", 3, "hnsw", 1)
    teacher.with_teacher_columns(dataset, outputs, torch.zeros(3, 2), torch.tensor([[1], [2], [0]]), stage_inputs)
    second = teacher.with_teacher_columns(
        dataset, outputs, torch.zeros(3, 2), torch.tensor([[2], [0], [1]]), stage_inputs
    )
    assert second[teacher.TEACHER_NEIGHBORS] == [[2], [0], [1]]
