"""ReAugKDTrainer: gradient accumulation scales the loss once; DDP gathers the teacher keys across processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import dropout_free_student, tiny_distillation_data
from ddp_worker import one_step

from hf_reaugkd import KnowledgeBase
from hf_reaugkd.losses import distillation_loss, relational_loss
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


def test_relational_neighbors_relate_each_example_to_its_knowledge_base_neighbours(tmp_path, tiny_tokenizer):
    data = tiny_distillation_data(tiny_tokenizer, size=16)
    kb = KnowledgeBase.build(
        torch.tensor(data["teacher_keys"]), torch.softmax(torch.tensor(data["teacher_logits"]), -1)
    )
    data = data.add_column(TEACHER_NEIGHBORS, kb.search(kb.keys, 4)[1][:, 1:].tolist())  # 3 nearest other entries
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
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    outputs = student(**inputs, retrieval_weight=0.0)
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
