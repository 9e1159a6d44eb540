"""The built wheel carries the prebuilt JupyterLab extension: installed into a new virtual
environment with no Node.js on PATH, JupyterLab lists it as enabled.

The new venv sees the site-packages of the interpreter running the tests, through a ``.pth``
file (JupyterLab, torch, ... are not downloaded again), whether that interpreter is a system
Python or itself a venv (``system_site_packages`` would show the *base* interpreter's packages
instead, without JupyterLab when it was installed into a venv). Only Python modules are shared
that way: Jupyter's data path is the new venv's own ``share/jupyter``, and the wheel goes into
the new venv with --no-deps, so its labextension can only come from the wheel's data files.
"""

from __future__ import annotations

import re
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXTENSION_NAME = "quantization-workbench"
BUILT_EXTENSION = REPO / "extension" / "labextension"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None and not (BUILT_EXTENSION / "package.json").exists(),
    reason="node is not on PATH and the extension is not built (extension/labextension)",
)


def run(
    cmd: list[str],
    env: dict[str, str] | None = None,
    timeout_s: int = 600,
    cwd: Path | None = None,
) -> str:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=timeout_s, check=False, cwd=cwd
    )
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout + proc.stderr


def running_site_packages() -> list[str]:
    """The site-packages folders the running interpreter imports from (venv or system)."""
    folders = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        folders.append(site.getusersitepackages())
    return [folder for folder in folders if Path(folder).is_dir()]


def share_running_site_packages(env_dir: Path, python: str) -> None:
    """Append the running interpreter's site-packages to the new venv's sys.path."""
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(purelib).is_relative_to(env_dir), purelib
    Path(purelib, "running_interpreter_site_packages.pth").write_text(
        "\n".join(running_site_packages()) + "\n"
    )


@pytest.mark.slow
def test_wheel_installs_enabled_labextension_without_node(tmp_path: Path) -> None:
    wheel_dir = tmp_path / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheel_dir), str(REPO)],
        timeout_s=900,
    )
    (wheel,) = wheel_dir.glob("quantization_workbench-*.whl")

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    bin_dir = env_dir / "bin"
    python = str(bin_dir / "python")
    share_running_site_packages(env_dir, python)
    env = {
        "PATH": str(bin_dir),  # the venv only: no node, no npm, no jlpm
        "HOME": str(tmp_path / "home"),
        "VIRTUAL_ENV": str(env_dir),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
        "JUPYTER_DATA_DIR": str(tmp_path / "jupyter-data"),
        "PIP_NO_INDEX": "1",
    }
    assert shutil.which("node", path=env["PATH"]) is None
    run([python, "-m", "pip", "install", "--no-deps", str(wheel)], env=env)

    installed = env_dir / "share" / "jupyter" / "labextensions" / EXTENSION_NAME
    assert (installed / "package.json").is_file()
    assert (installed / "install.json").is_file()
    assert list((installed / "static").glob("remoteEntry.*.js"))

    # the venv's python imports the wheel's workbench, not the running interpreter's copy
    # (run outside the repository, whose folder python -c would put first on sys.path)
    imported = run(
        [python, "-c", "import workbench; print(workbench.__file__)"], env=env, cwd=tmp_path
    )
    assert Path(imported.strip()).is_relative_to(env_dir), imported
    listing = run([python, "-m", "jupyterlab.labextensions", "list"], env=env)
    # the venv's labextensions folder, then the extension in it, enabled and OK
    section = listing.split(str(installed.parent), 1)
    assert len(section) == 2, f"{installed.parent} not listed:\n{listing}"
    first_block = section[1].split("/share/jupyter/labextensions", 1)[0]
    assert re.search(rf"{EXTENSION_NAME} v\S+ \S*enabled\S* \S*OK", first_block), listing
