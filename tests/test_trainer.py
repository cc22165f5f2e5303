"""ReAugKDTrainer: gradient accumulation scales the loss once; DDP gathers the teacher keys across processes."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import dropout_free_student, tiny_distillation_data
from ddp_worker import one_step

from hf_reaugkd import KnowledgeBase
from hf_reaugkd.data import UNLABELED
from hf_reaugkd.losses import distillation_loss, own_key_cosine_loss, own_key_loss, relational_loss
from hf_reaugkd.trainer import TEACHER_NEIGHBORS, ReAugKDTrainer
from hf_reaugkd.training_args import ReAugKDTrainingArguments

WORKER = Path(__file__).parent / "ddp_worker.py"


def update(tmp_path, name, **kwargs):
    out = tmp_path / f"{name}.json"
    one_step(str(out), **kwargs)
    return json.loads(out.read_text())


def test_accumulation_1x32_equals_2x16_for_per_example_losses(tmp_path):
    full = update(tmp_path, "full", per_device_batch_size=32, relational_weight=0.0)
    accumulated = update(tmp_path, "accumulated", per_device_batch_size=16, accumulation=2, relational_weight=0.0)
    torch.testing.assert_close(torch.tensor(accumulated["update"]), torch.tensor(full["update"]), atol=1e-6, rtol=1e-4)
    assert accumulated["loss"] == pytest.approx(full["loss"], rel=1e-3)


def test_accumulation_averages_micro_batch_gradients_once(tmp_path):
    """The in-batch relational loss depends on the batch, so 2×16 is compared with its two halves:
    Δ(2×16 accumulated) = (Δ(first 16) + Δ(last 16)) / 2, i.e. neither summed nor divided twice."""
    accumulated = torch.tensor(update(tmp_path, "acc", per_device_batch_size=16, accumulation=2)["update"])
    first = torch.tensor(update(tmp_path, "first", per_device_batch_size=16, rows=range(0, 16))["update"])
    last = torch.tensor(update(tmp_path, "last", per_device_batch_size=16, rows=range(16, 32))["update"])
    torch.testing.assert_close(accumulated, (first + last) / 2, atol=1e-6, rtol=1e-4)


def test_two_process_ddp_equals_one_process_with_the_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    single = tmp_path / "single.json"
    subprocess.run([sys.executable, str(WORKER), str(single), "32"], env=env, check=True, timeout=300)
    ddp = tmp_path / "ddp.json"
    torchrun = [sys.executable, "-m", "torch.distributed.run"]  # `torchrun` itself may not be on PATH
    result = subprocess.run(
        [*torchrun, "--standalone", "--nproc_per_node", "2", str(WORKER), str(ddp), "16"],
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    one, two = json.loads(single.read_text()), json.loads(ddp.read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert two["loss_relational"] == pytest.approx(one["loss_relational"], rel=1e-3)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-3)
    torch.testing.assert_close(torch.tensor(two["update"]), torch.tensor(one["update"]), atol=1e-5, rtol=1e-3)


def data_with_knowledge_base_neighbors(tokenizer):
    """16 distillation rows, their knowledge base, and each row's 3 nearest other entries (`teacher_neighbor_ids`)."""
    data = tiny_distillation_data(tokenizer, size=16)
    kb = KnowledgeBase.build(
        torch.tensor(data["teacher_keys"]), torch.softmax(torch.tensor(data["teacher_logits"]), -1)
    )
    return data.add_column(TEACHER_NEIGHBORS, kb.search(kb.keys, 4)[1][:, 1:].tolist()), kb


def inputs_of(batch) -> dict:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def test_relational_neighbors_relate_each_example_to_its_knowledge_base_neighbours(tmp_path, tiny_tokenizer):
    data, kb = data_with_knowledge_base_neighbors(tiny_tokenizer)
    student = dropout_free_student()
    args = ReAugKDTrainingArguments(
        output_dir=str(tmp_path), relational_neighbors=3, per_device_train_batch_size=8, report_to="none", use_cpu=True
    )
    trainer = ReAugKDTrainer(
        model=student, args=args, train_dataset=data, processing_class=tiny_tokenizer, knowledge_base=kb
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch[TEACHER_NEIGHBORS].shape == (8, 3)
    assert student.config.kb_size == 0  # the knowledge base stays with the trainer: not broadcast, not checkpointed

    loss = trainer.compute_loss(student, dict(batch))
    outputs = student(**inputs_of(batch), retrieval_weight=0.0)
    distillation = distillation_loss(outputs.student_logits, batch["teacher_logits"], 1.0)
    keys = torch.cat([batch["teacher_keys"].expand(8, -1, -1), kb.keys[batch[TEACHER_NEIGHBORS]]], dim=1)  # (8, 11, d)
    expected = distillation + relational_loss(outputs.query_embedding, batch["teacher_keys"], keys, 0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    batch_only = distillation + relational_loss(
        outputs.query_embedding, batch["teacher_keys"], batch["teacher_keys"], 0.1
    )
    assert abs(loss.item() - batch_only.item()) > 1e-4  # the neighbours are part of the loss

    without_ids = {k: v for k, v in batch.items() if k != TEACHER_NEIGHBORS}
    with pytest.raises(ValueError, match="relational_neighbors=3 needs a 'teacher_neighbor_ids' column"):
        trainer.compute_loss(student, without_ids)


def test_own_key_loss_alone_with_knowledge_base_neighbours_as_negatives(tmp_path, tiny_tokenizer):
    data, kb = data_with_knowledge_base_neighbors(tiny_tokenizer)
    student = dropout_free_student()
    args = ReAugKDTrainingArguments(
        output_dir=str(tmp_path),
        distillation_weight=0.0,
        relational_weight=0.0,
        own_key_weight=1.0,
        own_key_temperature=0.2,
        relational_neighbors=3,
        per_device_train_batch_size=8,
        report_to="none",
        use_cpu=True,
    )
    trainer = ReAugKDTrainer(
        model=student, args=args, train_dataset=data, processing_class=tiny_tokenizer, knowledge_base=kb
    )
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(student, dict(batch))
    queries = student(**inputs_of(batch), retrieval_weight=0.0).query_embedding
    keys = torch.cat([batch["teacher_keys"].expand(8, -1, -1), kb.keys[batch[TEACHER_NEIGHBORS]]], dim=1)  # (8, 11, d)
    expected = own_key_loss(queries, keys, torch.arange(8), 0.2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    batch_only = own_key_loss(queries, batch["teacher_keys"], torch.arange(8), 0.2)
    assert abs(loss.item() - batch_only.item()) > 1e-4  # the neighbours are negatives too


def two_step_trainer(tmp_path, tokenizer, **loss_args):
    """A dropout-free student, its trainer (16 rows, batch 8, 2 steps, a log every step) and the first batch."""
    args = ReAugKDTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        **loss_args,
    )
    student = dropout_free_student()
    data = tiny_distillation_data(tokenizer, size=16)
    trainer = ReAugKDTrainer(model=student, args=args, train_dataset=data, processing_class=tokenizer)
    return student, trainer, next(iter(trainer.get_train_dataloader()))


def test_own_key_loss_combined_is_logged_and_finds_this_ranks_keys_among_the_gathered(tmp_path, tiny_tokenizer):
    """As rank 1 of 2: the gathered keys are rank 0's batch, then this one's, so example i's own key is B + i."""
    student, trainer, batch = two_step_trainer(tmp_path, tiny_tokenizer, own_key_weight=0.5)
    other_rank = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(3)), dim=-1)
    accelerator = trainer.accelerator

    def gathered(keys: torch.Tensor) -> torch.Tensor:
        return torch.cat([other_rank, keys])  # (16, d): rank 0's keys, then this rank's

    trainer.accelerator = SimpleNamespace(gather=gathered, process_index=1)
    loss = trainer.compute_loss(student, dict(batch))
    trainer.accelerator = accelerator
    outputs = student(**inputs_of(batch), retrieval_weight=0.0)
    keys = torch.cat([other_rank, batch["teacher_keys"]])  # (16, d)
    expected = (
        distillation_loss(outputs.student_logits, batch["teacher_logits"], 1.0)
        + relational_loss(outputs.query_embedding, batch["teacher_keys"], keys, 0.1)
        + 0.5 * own_key_loss(outputs.query_embedding, keys, torch.arange(8, 16), 0.1)
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    for entry in logged:
        assert {"loss_distillation", "loss_relational", "loss_own_key"} <= set(entry)
        assert "loss_ce" not in entry and math.isfinite(entry["loss_own_key"]) and entry["loss_own_key"] > 0


def test_cross_entropy_skips_unlabelled_rows_and_is_zero_without_labelled_ones(tmp_path, tiny_tokenizer):
    data = tiny_distillation_data(tiny_tokenizer, size=8)
    args = ReAugKDTrainingArguments(
        output_dir=str(tmp_path), relational_weight=0.0, ce_weight=1.0, report_to="none", use_cpu=True
    )
    student = dropout_free_student()
    trainer = ReAugKDTrainer(model=student, args=args, train_dataset=data, processing_class=tiny_tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    outputs = student(**inputs_of(batch), retrieval_weight=0.0)
    distillation = distillation_loss(outputs.student_logits, batch["teacher_logits"], 1.0)

    mixed = dict(batch, labels=batch["labels"].masked_fill(torch.arange(8) % 2 == 1, UNLABELED))  # rows 0, 2, 4, 6
    labelled = torch.arange(0, 8, 2)
    ce = torch.nn.functional.cross_entropy(outputs.student_logits[labelled], batch["labels"][labelled])
    assert trainer.compute_loss(student, mixed).item() == pytest.approx((distillation + ce).item(), rel=1e-5)

    student.zero_grad()
    unlabelled = dict(batch, labels=torch.full((8,), UNLABELED))
    loss = trainer.compute_loss(student, unlabelled)
    assert loss.item() == pytest.approx(distillation.item(), rel=1e-5)  # CE adds 0, not NaN
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    assert trainer._loss_part_sums["ce"].item() == pytest.approx(ce.item(), rel=1e-5)  # 0 from the second batch


def test_own_key_cosine_loss_is_weighted_logged_and_reads_each_rows_own_key(tmp_path, tiny_tokenizer):
    student, trainer, batch = two_step_trainer(
        tmp_path, tiny_tokenizer, relational_weight=0.0, own_key_cosine_weight=2.0
    )
    loss = trainer.compute_loss(student, dict(batch))
    outputs = student(**inputs_of(batch), retrieval_weight=0.0)
    expected = distillation_loss(outputs.student_logits, batch["teacher_logits"], 1.0) + 2.0 * (
        own_key_cosine_loss(outputs.query_embedding, batch["teacher_keys"])
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    shuffled = own_key_cosine_loss(outputs.query_embedding, batch["teacher_keys"].roll(1, dims=0))
    assert abs(shuffled.item() - own_key_cosine_loss(outputs.query_embedding, batch["teacher_keys"]).item()) > 1e-4
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(math.isfinite(entry["loss_own_key_cosine"]) for entry in logged)


def test_own_key_flags_are_checked():
    with pytest.raises(ValueError, match=r"must be >= 0 and not all 0, got \(1.0, 1.0, 0.0, -1.0, 0.0\)"):
        ReAugKDTrainingArguments(output_dir="x", own_key_weight=-1.0, report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match=r"must be >= 0 and not all 0, got \(1.0, 1.0, 0.0, 0.0, -1.0\)"):
        ReAugKDTrainingArguments(output_dir="x", own_key_cosine_weight=-1.0, report_to="none", use_cpu=True)
    only_cosine = ReAugKDTrainingArguments(
        output_dir="x", distillation_weight=0.0, relational_weight=0.0, own_key_cosine_weight=1.0, report_to="none"
    )
    assert only_cosine.uses_teacher
    with pytest.raises(ValueError, match="own_key_temperature must be > 0"):
        ReAugKDTrainingArguments(output_dir="x", own_key_temperature=0.0, report_to="none", use_cpu=True)
    only_own_key = ReAugKDTrainingArguments(
        output_dir="x", distillation_weight=0.0, relational_weight=0.0, own_key_weight=1.0, report_to="none"
    )
    assert only_own_key.uses_teacher
