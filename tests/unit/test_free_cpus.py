"""Stages run torch on the CPUs other processes leave free (``engine/free_cpus.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

import workbench as wb
from workbench.engine import free_cpus

pytestmark = pytest.mark.skipif(
    not os.path.exists("/proc/loadavg"), reason="counts running tasks from /proc (Linux)"
)
CPUS = len(os.sched_getaffinity(0))


@contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """``count`` other processes spinning on a CPU each while inside."""
    code = "print(flush=True)\nwhile True: pass"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE) for _ in range(count)
    ]
    try:
        for proc in procs:  # each is spinning once it has printed
            proc.stdout.readline()
        time.sleep(0.05)
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_busy_processes_leave_one_thread_and_the_count_comes_back():
    threads = torch.get_num_threads()
    with busy_processes(CPUS + 1):
        assert free_cpus.other_running_tasks() >= CPUS
        assert free_cpus.free_cpus() == 1
        with free_cpus.threads_on_free_cpus() as used:
            assert used == 1
            assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads


def test_this_process_threads_are_not_counted_as_others():
    stop = threading.Event()
    x = torch.randn(512, 512)

    def work() -> None:  # matmuls run outside the GIL: this thread is running (state R)
        while not stop.is_set():
            x @ x

    worker = threading.Thread(target=work)
    worker.start()
    try:
        time.sleep(0.05)
        own = max(free_cpus._own_running() for _ in range(20))
    finally:
        stop.set()
        worker.join()
    assert own >= 2  # the reading thread and the worker


@pytest.fixture
def two_threads():
    """torch on two threads (the suite runs on one: conftest.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_a_nested_check_compares_with_the_outer_count(monkeypatch, two_threads):
    threads = torch.get_num_threads()
    answers = iter([1, threads + 4])
    monkeypatch.setattr(free_cpus, "free_cpus", lambda: next(answers))
    with free_cpus.threads_on_free_cpus() as outer:
        assert outer == 1
        with free_cpus.threads_on_free_cpus() as inner:  # the others are done: all again
            assert inner == threads == torch.get_num_threads()
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads


def test_without_proc_the_count_is_left_alone(monkeypatch):
    monkeypatch.setattr(free_cpus, "_machine_running", lambda: None)
    assert free_cpus.free_cpus() is None
    threads = torch.get_num_threads()
    with free_cpus.threads_on_free_cpus() as used:
        assert used == threads == torch.get_num_threads()


def _mlp() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    return model, [torch.randn(8, 16) for _ in range(2)]


def test_summary_records_the_threads_of_each_stage():
    model, data = _mlp()
    summary = wb.ptq(model, data, progress=False).report.summary
    assert set(summary["stage_threads"]) == set(summary["stage_seconds"])
    assert summary["torch_threads"] == torch.get_num_threads()
    assert all(1 <= t <= summary["torch_threads"] for t in summary["stage_threads"].values())


def test_a_busy_machine_runs_the_stages_on_one_thread_and_says_so(two_threads):
    model, data = _mlp()
    reference = wb.ptq(model, data, progress=False)
    with busy_processes(CPUS + 1):
        result = wb.ptq(model, data, progress=False)
    assert set(result.report.summary["stage_threads"].values()) == {1}
    assert "other processes kept CPUs busy" in result.report.summary_text()
    assert torch.get_num_threads() == 2
    # the same model: one thread changes nothing but the order of float sums
    x = torch.randn(8, 16)
    torch.testing.assert_close(result.model(x), reference.model(x), rtol=1e-5, atol=1e-6)
