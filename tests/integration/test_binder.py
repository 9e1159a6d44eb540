"""Do what repo2docker does with binder/ in a fresh virtual environment, then run the notebooks.

repo2docker installs ``binder/requirements.txt`` and runs ``binder/postBuild`` from the
repository root; Binder then opens JupyterLab on the first notebook. Here the notebooks are
executed with nbval inside that environment instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout_s: int) -> str:
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


@pytest.mark.slow
def test_binder_environment_runs_the_notebooks(tmp_path: Path) -> None:
    env_dir = tmp_path / "binder-env"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    bin_dir = env_dir / "bin"
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["VIRTUAL_ENV"] = str(env_dir)
    env.pop("PYTHONPATH", None)
    # The CPU wheel index may be unreachable on an offline CI machine: fail over fast.
    env["PIP_RETRIES"] = "0"
    env["PIP_TIMEOUT"] = "5"
    python = str(bin_dir / "python")
    repo_copy = tmp_path / "repo"
    shutil.copytree(
        REPO,
        repo_copy,
        ignore=shutil.ignore_patterns(".git", "node_modules", "*.egg-info", "__pycache__", "lib"),
    )
    run(
        [python, "-m", "pip", "install", "-r", "binder/requirements.txt"],
        repo_copy,
        env,
        1500,
    )
    run(["bash", "binder/postBuild"], repo_copy, env, 1500)
    installed = run(
        [python, "-c", "import torch, workbench; print(torch.__version__, torch.version.cuda)"],
        tmp_path,
        env,
        300,
    )
    # a CUDA build reports its CUDA version here, whatever its version string says
    version, cuda = installed.split()
    assert cuda == "None", f"not a CPU build of torch: {version} with CUDA {cuda}"
    run([python, "-m", "pip", "install", "pytest", "nbval"], repo_copy, env, 600)
    out = run(
        [python, "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider", "-q", "notebooks/"],
        repo_copy,
        env,
        1500,
    )
    assert " passed" in out and "failed" not in out
