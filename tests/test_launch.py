"""Multi-process launches on CPU, as the README documents them: `torchrun` trains on 2 gloo processes (one teacher
fine-tune shared by both ranks, no rank reading a stage before it is written); `accelerate launch --cpu`, which
would silently start one process, is refused with the command that works."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import pipeline_args

EXAMPLE = Path(__file__).parents[1] / "examples" / "distill.py"


def launch_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_torchrun_runs_the_whole_pipeline_on_two_cpu_processes(task):
    output_dir = task / "out"
    args = [a for a in pipeline_args(task, output_dir, "--keep_checkpoints") if a != "--use_cpu"]  # detected
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(EXAMPLE), *args],
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    stages = output_dir / "stages"
    teachers = [p for p in stages.iterdir() if p.name.startswith("teacher-") and "outputs" not in p.name]
    assert len(teachers) == 1 and (teachers[0] / "config.json").is_file()
    # 96 rows, 16 per device × 2 processes = 3 steps per epoch, 2 epochs: the global batch is split over the ranks
    state = json.loads((output_dir / "student-checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert result.stderr.count("teacher fine-tuning: started") == 2  # both ranks join one DDP fine-tune
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in result.stderr


def test_accelerate_launch_cpu_with_two_processes_is_refused_with_the_command_that_works(task):
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(EXAMPLE), *pipeline_args(task, task / "out")],
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode != 0
    assert "torchrun --nproc_per_node N examples/distill.py" in result.stderr
    assert not (task / "out" / "stages").exists()  # refused before any work
