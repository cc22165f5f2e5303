"""Every process works in the passes over every row: `torchrun` with 2 CPU processes writes the same stage files as
one process, byte for byte, evaluates the same predictions, and a process killed mid-pass stops the run and leaves no stage a rerun would trust."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_encoder, write_task
from transformers import BertForSequenceClassification

from hf_reaugkd.distributed import shard

WORKER = Path(__file__).parent / "shard_worker.py"


@pytest.fixture
def task(tmp_path, tiny_tokenizer):
    """The tests' CSV task and a tiny random classifier for its labels as the teacher (used as is)."""
    write_task(tmp_path)
    classifier = BertForSequenceClassification(tiny_encoder(seed=1).config)
    classifier.config.id2label = {0: "negative", 1: "positive"}
    classifier.config.label2id = {"negative": 0, "positive": 1}
    classifier.save_pretrained(tmp_path / "classifier")
    tiny_tokenizer.save_pretrained(tmp_path / "classifier")
    return tmp_path


def run_worker(task, work_dir, processes: int, *extra, timeout=300):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*(launcher if processes > 1 else [sys.executable]), str(WORKER), str(task), str(work_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    output = work_dir.parent / f"{work_dir.name}.json"
    start = time.monotonic()
    result = subprocess.run([*command, str(output), *extra], env=env, capture_output=True, text=True, timeout=timeout)
    return result, time.monotonic() - start, output


def test_two_processes_write_the_stages_of_one_byte_for_byte(task):
    """Before, the main process computed every row while the other waited (main_process_first)."""
    one, _, one_json = run_worker(task, task / "one", 1)
    two, _, two_json = run_worker(task, task / "two", 2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    alone, together = json.loads(one_json.read_text()), json.loads(two_json.read_text())
    assert any(name.startswith("teacher-outputs-") for name in alone["files"])
    assert together["files"] == alone["files"]  # same stage names (keys), same bytes
    assert together["neighbors"] == alone["neighbors"]
    assert alone["rows"] == [96 + 32 + 32] and together["rows"] == [80, 80]  # each process its half of the rows
    for name in ("student", "retrieved", "queries"):  # the evaluation passes, each process its half
        assert together[name] == alone[name], name
    assert together["query_mean"] == pytest.approx(alone["query_mean"], abs=1e-12)  # a sum of two float64 sums


def test_a_process_killed_mid_pass_stops_the_run_and_the_rerun_recomputes(task):
    died, seconds, _ = run_worker(task, task / "work", 2, "--die")
    assert died.returncode != 0 and seconds < 60, (seconds, died.stderr[-3000:])
    assert not [p for p in (task / "work").iterdir() if p.name.startswith("teacher-outputs-")]
    rerun, _, output = run_worker(task, task / "work", 1)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    stages = {name.split("/")[0] for name in json.loads(output.read_text())["files"]}
    assert any(name.startswith("teacher-outputs-") for name in stages)
    assert not [name for name in stages if name.startswith(".")]  # the killed run's temporary folder removed


@pytest.mark.parametrize("rows, batch", [(96, 8), (100, 8), (5, 8), (0, 8), (33, 1)])
def test_shards_cover_every_row_once_at_batch_boundaries(monkeypatch, rows, batch):
    from hf_reaugkd import distributed

    for world_size in (1, 2, 3, 8):
        shards = []
        for rank in range(world_size):
            monkeypatch.setattr(distributed, "rank_and_world_size", lambda rank=rank, size=world_size: (rank, size))
            shards.append(shard(rows, batch))
        assert [row for part in shards for row in part] == list(range(rows))
        assert all(part.start % batch == 0 for part in shards if part)
        sizes = [len(part) for part in shards]
        assert max(sizes) - min(sizes) < 2 * batch  # one batch more at most, and the last one short
