"""ReAugKDTrainer: gradient accumulation scales the loss once; DDP gathers the teacher keys across processes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_worker import one_step

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


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not found")
def test_two_process_ddp_equals_one_process_with_the_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    single = tmp_path / "single.json"
    subprocess.run([sys.executable, str(WORKER), str(single), "32"], env=env, check=True, timeout=300)
    ddp = tmp_path / "ddp.json"
    result = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node", "2", str(WORKER), str(ddp), "16"],
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
