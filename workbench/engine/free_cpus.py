"""torch's thread count matched to the CPUs other processes leave free, while a stage runs.

torch's OpenMP threads (libgomp) wait for each other at the end of every parallel op by
spinning. When other processes keep some of this process's CPUs busy, a thread that the
scheduler took off its CPU holds up its spinning partners at every op, and the stage runs
many times slower than on one thread. Measured on 2 cores with ``wb.ptq`` + ``export_onnx``
of a 0.54 B decoder (``tests/benchmarks/bench_scale.py``): alone, 6.3 s on 2 threads and 8.2 s
on 1; beside one busy process, 12.5 s on 2 and 8.1 s on 1; beside four, 80 s on 2 and 20 s
on 1 (ONNX Runtime's own quantizer took 16 s there). ``OMP_WAIT_POLICY=PASSIVE`` set before
torch is imported avoids the spinning too, but a notebook has usually imported torch first.

So each stage, and each block of a long block walk, counts the tasks other processes are
running (Linux: ``/proc/loadavg``'s running count minus this process's running threads, the
median of a few samples over about 2 ms) and runs on ``min(torch's thread count, free CPUs)``
threads, at least one; torch's count is restored afterwards. It never raises the count above
torch's: a check nested in another compares with the outer one's count, so a walk that
started on a busy machine goes back to all threads once the others are done. Where ``/proc``
is missing the count is left alone. Results may differ from a run on more threads in the last
bits of float sums (reduction order), as they do between machines.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch

SAMPLES = 5  # the median over these counts ignores a task that ran for one sample only
SAMPLE_INTERVAL_S = 0.0005
# torch's thread count when the outermost threads_on_free_cpus began (None outside one)
_THREADS_OUTSIDE: ContextVar[int | None] = ContextVar("threads_outside", default=None)


def other_running_tasks() -> int | None:
    """How many tasks of other processes are running or waiting for a CPU now (the median of
    ``SAMPLES`` counts); None where ``/proc`` does not say."""
    counts = []
    for sample in range(SAMPLES):
        if sample:
            time.sleep(SAMPLE_INTERVAL_S)
        running = _machine_running()
        if running is None:
            return None
        counts.append(max(0, running - _own_running()))
    return int(statistics.median(counts))


def free_cpus() -> int | None:
    """This process's CPUs (its affinity) minus the tasks other processes run, at least one;
    None where that is not known."""
    others = other_running_tasks()
    if others is None:
        return None
    return max(1, len(os.sched_getaffinity(0)) - others)


@contextmanager
def threads_on_free_cpus() -> Iterator[int]:
    """torch on at most ``free_cpus()`` threads inside, and at most the thread count it had
    outside every such block; yields the count used."""
    threads = torch.get_num_threads()
    ceiling = _THREADS_OUTSIDE.get() or threads
    free = free_cpus()
    used = ceiling if free is None else min(ceiling, free)
    token = _THREADS_OUTSIDE.set(ceiling)
    if used != threads:
        torch.set_num_threads(used)
    try:
        yield used
    finally:
        _THREADS_OUTSIDE.reset(token)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _machine_running() -> int | None:
    """Tasks running or runnable on the machine (``/proc/loadavg``'s fourth field)."""
    try:
        with open("/proc/loadavg") as loadavg:
            return int(loadavg.read().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None


def _own_running() -> int:
    """This process's threads in state R (this one, reading, among them)."""
    running = 0
    tasks = Path("/proc/self/task")
    for task in tasks.iterdir() if tasks.is_dir() else ():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # the thread ended
            continue
        if stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] == "R":
            running += 1
    return running
