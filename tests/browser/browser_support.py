"""What the browser tests share: Debian's chromium, the reason to skip, a JupyterLab server.

The server runs on 127.0.0.1 at a free port with a token, on this interpreter (so its kernel
imports this checkout's workbench), with the news and update checks off (their prompt would
cover part of the page) and an empty workspace, so every test starts from the launcher.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
SERVER_START_TIMEOUT_S = 90
RUN_TIMEOUT_MS = 180_000
UI_TIMEOUT_MS = 60_000
REPO = Path(__file__).resolve().parents[2]
EXTENSION_NAME = "quantization-workbench"
BUILT_EXTENSION = REPO / "extension" / "labextension"


def missing_browser_tools(need_node: bool = True) -> str | None:
    """Why a browser test cannot run here, or None (CI installs all of these)."""
    if need_node and shutil.which("node") is None:
        return "node is not on PATH (needed to build the JupyterLab extension)"
    if not Path(CHROMIUM).exists():
        return f"chromium not found at {CHROMIUM} (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    return None


# the mark of the tests that need JupyterLab with the extension built, chromium and playwright
NEEDS_LAB_AND_BROWSER = pytest.mark.skipif(
    missing_browser_tools() is not None, reason=str(missing_browser_tools())
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LabServer:
    url: str
    token: str
    root_dir: Path
    log_path: Path

    def lab_url(self) -> str:
        return f"{self.url}/lab?token={self.token}"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def write_settings(settings_dir: Path) -> None:
    """User settings that keep the page free of the news / update prompt."""
    notification = settings_dir / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True, exist_ok=True)
    (notification / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )


def wait_until_up(url: str, token: str, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"JupyterLab exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}"
            )
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(
        f"JupyterLab did not answer within {SERVER_START_TIMEOUT_S} s:\n"
        f"{log_path.read_text()[-4000:]}"
    )


@contextmanager
def running_lab_server(tmp_path: Path) -> Iterator[LabServer]:
    """JupyterLab on 127.0.0.1 at a free port, with a token, rooted in a fresh folder."""
    root_dir = tmp_path / "notebooks"
    home = tmp_path / "jupyter"
    for folder in (root_dir, home / "config", home / "data", home / "runtime", home / "ipython"):
        folder.mkdir(parents=True)
    settings_dir = home / "settings"
    write_settings(settings_dir)
    if (BUILT_EXTENSION / "package.json").exists():
        # Serve this checkout's build (as `jupyter labextension develop` would): the user data
        # dir comes first on the labextensions path, ahead of the copy an editable install
        # made, which is stale after a rebuild.
        (home / "data" / "labextensions").mkdir()
        (home / "data" / "labextensions" / EXTENSION_NAME).symlink_to(BUILT_EXTENSION)
    port = free_port()
    token = secrets.token_hex(16)
    env = dict(os.environ)
    env.update(
        JUPYTER_CONFIG_DIR=str(home / "config"),
        JUPYTER_DATA_DIR=str(home / "data"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        IPYTHONDIR=str(home / "ipython"),
        JUPYTER_PLATFORM_DIRS="1",
    )
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--allow-root",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root_dir}",
        f"--LabApp.user_settings_dir={settings_dir}",
        f"--LabApp.workspaces_dir={home / 'workspaces'}",
    ]
    log_path = tmp_path / "jupyterlab.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, cwd=root_dir, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, token, proc, log_path)
        yield LabServer(url, token, root_dir, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def screenshot_dir() -> Path:
    """Where the browser tests leave their screenshots (CI uploads the folder as an
    artifact): ``$WORKBENCH_SCREENSHOT_DIR``, default ``test-artifacts/browser`` in the repo."""
    folder = Path(os.environ.get("WORKBENCH_SCREENSHOT_DIR", REPO / "test-artifacts" / "browser"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_notebook(path: Path, *sources: str) -> None:
    """Write a notebook of code cells with these sources, not yet run."""
    cells = [
        {"cell_type": "code", "metadata": {}, "source": s, "execution_count": None, "outputs": []}
        for s in sources
    ]
    kernel = {"display_name": "Python 3", "language": "python", "name": "python3"}
    notebook = {"cells": cells, "metadata": {"kernelspec": kernel}, "nbformat": 4}
    path.write_text(json.dumps(notebook | {"nbformat_minor": 5}))


@contextmanager
def chromium() -> Iterator:
    """Headless chromium (a playwright ``Browser``), closed on leaving."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def notebook_page(
    server: LabServer, notebook_name: str, viewport: dict, failure_shot: str
) -> Iterator[tuple]:
    """The notebook ``notebook_name`` of the server's folder open in JupyterLab in chromium:
    ``(page, notebook panel)``. On a failure inside, a full-page screenshot goes to
    ``screenshot_dir() / failure_shot`` and the server's log to stdout."""
    with chromium() as browser:
        page = browser.new_page(viewport=viewport)
        try:
            page.set_default_timeout(UI_TIMEOUT_MS)
            page.goto(f"{server.url}/lab/tree/{notebook_name}?token={server.token}")
            notebook = page.locator(".jp-NotebookPanel:visible")
            notebook.locator(".jp-Cell").first.wait_for()
            yield page, notebook
        except Exception:
            page.screenshot(path=str(screenshot_dir() / failure_shot), full_page=True)
            print(f"JupyterLab log:\n{server.log_tail()}")
            raise


def switch_to_dark_theme(page) -> None:
    """Settings > Theme > JupyterLab Dark, and wait until the page has it."""
    page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Settings$")).click()
    page.locator(".lm-Menu-item", has_text=re.compile(r"^Theme$")).hover()
    page.get_by_role("menuitem", name="JupyterLab Dark", exact=True).click()
    page.wait_for_selector("body[data-jp-theme-light='false']", state="attached")
    page.wait_for_timeout(1000)


def run_all_cells(page, notebook) -> None:
    """Run > Run All Cells once the kernel is idle, retried until the first code cell starts
    (the menu item stays disabled for a moment after the notebook opens)."""
    page.get_by_text(re.compile(r"\| Idle$")).first.wait_for(timeout=RUN_TIMEOUT_MS)
    first_prompt = notebook.locator(".jp-CodeCell .jp-InputPrompt").first
    for _ in range(5):
        try:
            page.locator(".lm-MenuBar-item", has_text=re.compile(r"^Run$")).click()
            page.locator(
                ".lm-Menu-item[data-command='runmenu:run-all']:not(.lm-mod-disabled)"
            ).click(timeout=5_000)
            page.wait_for_function(
                "el => /\\[(\\*|\\d+)\\]/.test(el.textContent)",
                arg=first_prompt.element_handle(),
                timeout=15_000,
            )
            return
        except Exception as exc:  # playwright's TimeoutError; anything else is raised again
            if type(exc).__name__ != "TimeoutError":
                raise
            page.keyboard.press("Escape")
    raise AssertionError("Run > Run All Cells did not start the notebook's cells")


# The contrast of every visible text node under ``root``, from the rendered colours: the
# text's colour (or SVG fill) and opacity over the backgrounds behind it, composited up to the
# first opaque one; disabled controls are skipped (WCAG exempts them).
CONTRAST_JS = """
(root) => {
  function parse(text) {
    const m = /rgba?\\(([^)]+)\\)/.exec(text || '');
    if (!m) { return null; }
    const p = m[1].split(/[\\s,\\/]+/).filter(Boolean).map(Number);
    return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1];
  }
  function over(top, bottom) {
    const a = top[3];
    return [0, 1, 2].map(i => top[i] * a + bottom[i] * (1 - a)).concat([1]);
  }
  function luminance(c) {
    const f = v => {
      v /= 255;
      return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4);
    };
    return 0.2126 * f(c[0]) + 0.7152 * f(c[1]) + 0.0722 * f(c[2]);
  }
  function background(el) {
    const layers = [];
    for (let n = el; n; n = n.parentElement) {
      const c = parse(getComputedStyle(n).backgroundColor);
      if (c && c[3] > 0) { layers.push(c); if (c[3] >= 1) { break; } }
    }
    let bg = [255, 255, 255, 1];
    for (let i = layers.length - 1; i >= 0; i--) { bg = over(layers[i], bg); }
    return bg;
  }
  const found = [];
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) {
    const node = walker.currentNode;
    const text = node.textContent.trim();
    if (!text) { continue; }
    const el = node.parentElement;
    if (el.closest('style, script, title')) { continue; }
    if (el.closest(':disabled, [disabled], .mod-disabled, .jp-mod-disabled')) { continue; }
    const box = el.getBoundingClientRect();
    if (box.width === 0 || box.height === 0) { continue; }
    const style = getComputedStyle(el);
    if (style.visibility === 'hidden' || style.display === 'none') { continue; }
    const svg = el instanceof SVGElement;
    const fg = parse(svg ? style.fill : style.color);
    if (!fg) { continue; }
    let opacity = 1;
    for (let n = el; n; n = n.parentElement) { opacity *= parseFloat(getComputedStyle(n).opacity); }
    fg[3] *= opacity;
    const bg = background(el);
    const shown = over(fg, bg);
    const [hi, lo] = [luminance(shown), luminance(bg)].sort((a, b) => b - a);
    const owner = svg ? el.ownerSVGElement : null;
    const size = parseFloat(style.fontSize) * (owner ? owner.getScreenCTM().a : 1);
    const bold = parseInt(style.fontWeight, 10) >= 700;
    found.push({
      text: text.slice(0, 60), ratio: (hi + 0.05) / (lo + 0.05), size, svg,
      large: size >= 24 || (bold && size >= 18.66),
      color: svg ? style.fill : style.color, bg: 'rgb(' + bg.slice(0, 3).map(Math.round) + ')'
    });
  }
  return found;
}
"""


def low_contrast_texts(texts: list[dict]) -> dict:
    """(colour, background) -> an example text, for the texts of ``CONTRAST_JS`` below WCAG AA
    (4.5:1, 3:1 for large text)."""
    return {
        (t["color"], t["bg"]): f"{t['text']!r} {t['ratio']:.2f}:1"
        for t in texts
        if t["ratio"] < (3.0 if t["large"] else 4.5)
    }


def assert_readable_contrast(root, where: str) -> list[dict]:
    """Every visible text under the locator ``root`` reaches WCAG AA contrast, from the
    rendered colours; returns the texts measured (``CONTRAST_JS``'s records)."""
    texts = root.evaluate(CONTRAST_JS)
    low = low_contrast_texts(texts)
    assert low == {}, f"{where}: text below WCAG AA contrast: {low}"
    return texts
