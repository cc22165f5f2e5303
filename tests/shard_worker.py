"""The stages that touch every row, run alone or under `torchrun` (see test_sharding.py): teacher outputs, the
knowledge base and its neighbours, written by every process's share. Rank 0 writes the SHA-256 of each stage file and
the neighbour ids, the rows each process ran through the teacher, and a student's evaluation predictions and query
mean over the validation split, to the JSON file given as argv[3]. With `--die`, rank 1 kills itself after its first teacher batch.

    python shard_worker.py TASK_DIR WORK_DIR OUT_JSON [--die]
"""

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import tiny_encoder
from safetensors import safe_open
from transformers import AutoTokenizer

from hf_reaugkd import ReAugKDForSequenceClassification, evaluation, teacher
from hf_reaugkd.arguments import ModelArguments
from hf_reaugkd.data import LABEL_COLUMN, load_task_data, tokenize


def digest(path: Path) -> str:
    """SHA-256 of a file's bytes; of a safetensors file's tensors and metadata, whose header order is a Rust
    `HashMap`'s, so it differs from one process to the next."""
    if path.suffix != ".safetensors":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    content = hashlib.sha256()
    with safe_open(path, "np") as f:
        content.update(json.dumps(f.metadata(), sort_keys=True).encode())
        for name in sorted(f.keys()):
            content.update(name.encode() + f.get_tensor(name).tobytes())
    return content.hexdigest()


def main(task: Path, work_dir: Path, output: Path, die: bool) -> None:
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    batches, counted = teacher.teacher_batches, [0]

    def counted_batches(*args, **kwargs):  # how many teacher batches this process ran
        for batch in batches(*args, **kwargs):
            counted[0] += len(batch[0])
            yield batch
            if die and rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)

    teacher.teacher_batches = counted_batches
    data = load_task_data(data_files={split: str(task / f"{split}.csv") for split in ("train", "validation", "test")})
    outputs = teacher.teacher_outputs(task / "classifier", data, 16, work_dir, batch_size=8)
    labels = torch.as_tensor(data.splits["train"][LABEL_COLUMN])
    model_args = ModelArguments(projection_num_epochs=2)
    if rank == 0:  # as distill's main_process_first: one process writes the stage, then the others read it
        teacher.knowledge_base_stage(outputs, labels, model_args, 16, 2.0, 0, work_dir)
    if dist.is_initialized():
        dist.barrier()
    _, kb = teacher.knowledge_base_stage(outputs, labels, model_args, 16, 2.0, 0, work_dir)
    neighbors = teacher.knowledge_base_neighbors(kb, kb.keys, 3, own_rows=True)
    student = ReAugKDForSequenceClassification.from_encoder(
        tiny_encoder(seed=2), {0: "negative", 1: "positive"}, knowledge_base=kb, kb_dim=16
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(task / "classifier")
    validation = tokenize(data.splits["validation"], tokenizer, "text", None, 16, "Tokenizing")
    with torch.no_grad():
        predictions = evaluation.predict(student, validation, tokenizer, [1, 4], 0.1, batch_size=8)
        mean = evaluation.query_mean(student, validation, tokenizer, batch_size=8)
    predicted = {"student": predictions.student_probs.tolist(), "retrieved": predictions.retrieved[4].tolist(),
                 "queries": predictions.queries.tolist(), "query_mean": mean}  # fmt: skip
    rows_per_process = [None] * dist.get_world_size() if dist.is_initialized() else [counted[0]]
    if dist.is_initialized():
        dist.all_gather_object(rows_per_process, counted[0])
    if rank == 0:
        files = sorted(p for p in work_dir.rglob("*") if p.is_file())
        digests = {str(p.relative_to(work_dir)): digest(p) for p in files}
        output.write_text(
            json.dumps({"files": digests, "neighbors": neighbors.tolist(), "rows": rows_per_process, **predicted})
        )
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), "--die" in sys.argv)
