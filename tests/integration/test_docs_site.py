"""The documentation site builds with ``mkdocs build --strict`` and holds every notebook (with
its committed outputs) and the API reference generated from the public API's docstrings.

Strict mode turns every warning into a failure: a broken link or anchor between pages, a page
missing from the nav, an API reference to a name that does not exist.
"""

from __future__ import annotations

import html
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import workbench

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# wb.panel and wb.benchmark are imported on first use (module __getattr__), so the reference
# documents them where they are defined
LAZY_NAMES = {
    "panel": "workbench.notebook.panel.WorkbenchPanel",
    "benchmark": "workbench.runtime.benchmark.benchmark",
    "generation_benchmark": "workbench.runtime.genai_generation.generation_benchmark",
}
# documented in the reference beside the public names: QuantResult's and Report's methods
PUBLIC_METHODS = {
    "QuantResult": [
        "export_onnx",
        "export_fp32_onnx",
        "fusion",
        "parity",
        "save_pretrained",
        "export_genai",
        "generation_parity",
    ],
    "Report": ["to_html", "to_json", "plot_sqnr", "plot_storage"],
    "QuantConfig": ["preset"],
}

pytestmark = pytest.mark.slow  # one full build: about 15 s on an idle 2-core machine


def page_text(path: Path) -> str:
    """The visible text of an HTML page: tags removed, entities decoded, spaces collapsed."""
    text = re.sub(r"</?(?:code|span|a|em|strong)\b[^>]*>", "", path.read_text(encoding="utf-8"))
    text = re.sub(r"<[^>]+>", " ", text)
    return " ".join(html.unescape(text).split())


def first_output_line(notebook: Path) -> str:
    """The longest of the first committed stdout lines of ``notebook`` (its outputs as saved)."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    lines = [
        line.strip()
        for cell in cells
        if cell["cell_type"] == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "stream" and output.get("name") == "stdout"
        for line in "".join(output["text"]).splitlines()
        if line.strip()
    ]
    assert lines, f"{notebook.name} has no committed stdout output to look for"
    return " ".join(max(lines[:10], key=len).split())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site_dir = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stderr[-4000:]}"
    return site_dir


def test_the_site_builds_strict_with_every_notebook_and_its_outputs(site: Path) -> None:
    assert len(NOTEBOOKS) >= 8
    home = (site / "index.html").read_text(encoding="utf-8")
    for notebook in NOTEBOOKS:
        page = site / "notebooks" / notebook.stem / "index.html"
        assert page.is_file(), f"{notebook.name} was not rendered"
        # the committed outputs are on the page (the build renders, never executes)
        assert first_output_line(notebook) in page_text(page), notebook.name
        # the notebook itself is offered for download beside its page
        assert (page.parent / notebook.name).read_bytes() == notebook.read_bytes()
        assert f'href="notebooks/{notebook.stem}/"' in home, f"{notebook.name} is not in the nav"
    index = page_text(site / "notebooks" / "index.html")
    assert "Tutorials that CI executes" in index


def test_the_api_reference_documents_the_public_api(site: Path) -> None:
    page = (site / "api" / "index.html").read_text(encoding="utf-8")
    text = page_text(site / "api" / "index.html")
    for name in workbench.__all__:
        anchor = LAZY_NAMES.get(name, f"workbench.{name}")
        assert f'id="{anchor}"' in page, f"wb.{name} is missing from the API reference"
        summary = inspect.getdoc(getattr(workbench, name)).splitlines()[0]
        assert " ".join(html.unescape(re.sub(r"``?", "", summary)).split()) in text, name
    for cls, methods in PUBLIC_METHODS.items():
        for method in methods:
            assert f'id="workbench.{cls}.{method}"' in page, f"{cls}.{method}"


def test_every_docs_page_is_built(site: Path) -> None:
    pages = sorted((ROOT / "docs").rglob("*.md"))
    assert pages
    for source in pages:
        relative = source.relative_to(ROOT / "docs").with_suffix("")
        built = site / relative / "index.html"
        if relative.name == "index":
            built = site / relative.parent / "index.html"
        assert built.is_file(), f"docs/{source.relative_to(ROOT / 'docs')} was not built"


@pytest.mark.parametrize(
    ("link", "complaint"),
    [("missing.md", "missing.md"), ("other.md#no-such-heading", "no-such-heading")],
)
def test_the_site_settings_fail_the_build_on_a_broken_link(
    tmp_path: Path, link: str, complaint: str
) -> None:
    """The site's own strict and validation settings, on a two-page site with one bad link."""
    settings = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    config = {
        "site_name": "links",
        "strict": settings["strict"],
        "validation": settings["validation"],
        "nav": ["index.md", "other.md"],
    }
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text(f"# Home\n\nSee [there]({link}).\n")
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## A heading\n")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--site-dir", str(tmp_path / "site")],
        cwd=tmp_path,
        env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode != 0, build.stderr
    assert complaint in build.stderr
