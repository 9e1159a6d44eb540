"""The launchable DDP example (``workbench/examples/qat_ddp.py``) run as the docs say, with
``torchrun`` on two CPU processes: it trains, prints the accuracy table on rank 0 only, and
rank 0 alone writes the ONNX model, which ONNX Runtime runs."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_example_trains_on_two_processes_and_rank0_writes_the_model(tmp_path):
    import onnxruntime as ort

    from workbench.demo import load_digits_data

    out = tmp_path / "digits_qat_int8.onnx"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path.cwd()), env.get("PYTHONPATH", "")])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launcher += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    example = ["-m", "workbench.examples.qat_ddp", "--epochs", "1", "--batch-size", "64"]
    done = subprocess.run(
        [*launcher, *example, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("QAT of the digits CNN on 2 process(es)") == 1  # rank 0 prints
    qat_pct = float(re.search(r"QAT w4a4\s+([\d.]+)", done.stdout).group(1))
    data = load_digits_data()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = session.run(None, {name: data.test_x.numpy()})[0]
    ort_pct = 100.0 * float(np.mean(logits.argmax(1) == data.test_y.numpy()))
    # the file is the trained model: ONNX Runtime's integer kernels agree with the
    # simulation on all but a few of the test images
    assert abs(ort_pct - qat_pct) <= 2.0
    assert qat_pct > 90.0
