"""wb.ptq / wb.qat in a job of two CPU processes (gloo), against one process on all the data.

The jobs live in ``distributed_jobs.py`` and run in a subprocess with a timeout, so that a
hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

JOBS = Path(__file__).with_name("distributed_jobs.py")
JOB_TIMEOUT_S = 300
LEVELS = 256  # the default int8 activation scheme: asymmetric, 256 codes


def run_job(job: str, out_dir: Path, timeout_env_s: float | None = None) -> dict[str, dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path.cwd()), env.get("PYTHONPATH", "")])
    if timeout_env_s is not None:
        env["WORKBENCH_DIST_TIMEOUT_S"] = str(timeout_env_s)
    done = subprocess.run(
        [sys.executable, str(JOBS), job, str(out_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {
        path.stem: torch.load(path, weights_only=False) for path in sorted(out_dir.glob("*.pt"))
    }


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    return run_job("calibration", tmp_path_factory.mktemp("calibration"))


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse", "entropy"])
def test_ranks_calibrate_bit_identical_qparams(calibration, observer):
    rank0, rank1 = calibration["rank0"][observer], calibration["rank1"][observer]
    assert rank0.keys() == rank1.keys() and rank0
    for name, (scale, zero_point) in rank0.items():
        assert torch.equal(scale, rank1[name][0]), name
        assert torch.equal(zero_point, rank1[name][1]), name
    # the report is rank 0's on every process
    summary = f"{observer}_summary"
    assert calibration["rank0"][summary] == calibration["rank1"][summary]


def test_minmax_equals_one_process_on_the_union_exactly(calibration):
    single = calibration["single"]["minmax"]
    for name, (scale, zero_point) in calibration["rank0"]["minmax"].items():
        assert torch.equal(scale, single[name][0]), name
        assert torch.equal(zero_point, single[name][1]), name


@pytest.mark.parametrize("observer", ["percentile", "mse"])
def test_histogram_observers_match_one_process_within_one_bin(calibration, observer):
    # A histogram spans the non-zero values: at most the min/max range, whose minmax scale
    # times (levels - 1) is its width. (The entropy observer's KL argmin can move by many
    # bins for a change of counts smaller than one bin: its combined histogram is tested
    # within one bin in tests/unit/test_observer_combine.py.)
    single = calibration["single"][observer]
    minmax = calibration["single"]["minmax"]
    for name, (scale, zero_point) in calibration["rank0"][observer].items():
        bin_width = float(minmax[name][0]) * (LEVELS - 1) / 2048
        range_error = abs(float(scale) - float(single[name][0])) * (LEVELS - 1)
        assert range_error <= bin_width, name
        assert abs(int(zero_point) - int(single[name][1])) <= 1, name


@pytest.fixture(scope="module")
def qat_job(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("qat")
    return out_dir, run_job("qat", out_dir)


def test_qat_ranks_end_with_identical_weights_and_learned_scales(qat_job):
    _, results = qat_job
    rank0, rank1 = results["rank0"]["state"], results["rank1"]["state"]
    assert rank0.keys() == rank1.keys()
    assert any(name.endswith("weight_quantizer.scale") for name in rank0)  # learned, per channel
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), name
    # and training moved them: the job did train, identically
    assert results["rank0"]["history_loss"] == results["rank1"]["history_loss"]


def test_only_rank0_writes_the_export(qat_job):
    out_dir, results = qat_job
    assert (out_dir / "rank0.onnx").is_file()
    assert not (out_dir / "rank1.onnx").exists()
    assert results["rank0"]["writes_files"] and not results["rank1"]["writes_files"]


def test_qat_on_two_processes_matches_one_process_with_the_same_total_batch(qat_job):
    # Same samples per step (two shards of 32 against batches of 64), same steps: DDP's
    # averaged gradient is the one-process gradient up to the order of float sums.
    _, results = qat_job
    single = results["single"]["accuracy"]
    assert results["rank0"]["accuracy"] == results["rank1"]["accuracy"]
    assert abs(results["rank0"]["accuracy"] - single) <= 0.3
    assert len(results["rank0"]["history_loss"]) == len(results["single"]["history_loss"])


@pytest.mark.parametrize("job", ["interrupt", "exception"])
def test_a_stopped_rank_gives_an_error_on_every_rank_not_a_hang(tmp_path, job):
    results = run_job(job, tmp_path, timeout_env_s=5)
    stopped, waiting = results["rank1"], results["rank0"]
    if job == "interrupt":
        assert stopped["error"] == "DistributedError"
        assert "rank 1 was interrupted" in stopped["message"]
        assert stopped["code"] == "distributed.interrupted"
    else:
        assert stopped["error"] == "ValueError" and "on purpose" in stopped["message"]
    assert waiting["error"] == "DistributedError"
    assert "rank 0: another process stopped" in waiting["message"]
    # gloo's own message on this machine: the peer's connection closed, or the timeout
    assert waiting["code"] in ("distributed.peer_lost", "distributed.timeout")
