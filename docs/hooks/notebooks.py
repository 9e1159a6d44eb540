"""MkDocs hook: publish the tutorial notebooks of ``notebooks/`` as pages of the site.

The notebooks stay where CI executes them (``notebooks/``, with their committed outputs); this
hook adds each one, and ``notebooks/README.md`` as the section's index, to the site's files
under ``notebooks/`` without copying anything into ``docs/``. It runs before mkdocs-jupyter's
``on_files``, which then renders the ``.ipynb`` files (without executing them). The files are
read from the repository root (``src_dir``), where ``notebooks/NAME`` is the path on disk too:
mkdocs-jupyter reads a notebook through ``abs_src_path``, which a ``File.generated`` file
would not give it.
"""

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

SITE_FOLDER = "notebooks"


NAV_SECTION = "Notebooks"


def notebooks_dir(config: MkDocsConfig) -> Path:
    """``notebooks/`` beside ``mkdocs.yml`` (the repository root)."""
    return Path(config.config_file_path).resolve().parent / "notebooks"


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    """Fill the nav's "Notebooks" section: the index, then every notebook in name order.

    A notebook added to ``notebooks/`` joins the site without an edit to ``mkdocs.yml``.
    """
    pages = [f"{SITE_FOLDER}/README.md"]
    pages += [
        f"{SITE_FOLDER}/{path.name}" for path in sorted(notebooks_dir(config).glob("*.ipynb"))
    ]
    sections = [item for item in config.nav or [] if isinstance(item, dict) and NAV_SECTION in item]
    if len(sections) != 1:
        raise ValueError(f'mkdocs.yml: the nav needs one "{NAV_SECTION}" section for the notebooks')
    sections[0][NAV_SECTION] = pages
    return config


@event_priority(100)
def on_files(files: Files, config: MkDocsConfig) -> Files:
    folder = notebooks_dir(config)
    notebooks = sorted(folder.glob("*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no notebooks in {folder}: the docs site renders them")
    for path in [*notebooks, folder / "README.md"]:
        src_uri = f"{SITE_FOLDER}/{path.name}"
        if files.get_file_from_path(src_uri) is not None:
            raise FileExistsError(f"docs/{src_uri} would hide {path}: keep it in notebooks/ only")
        files.append(
            File(
                src_uri,
                src_dir=str(folder.parent),
                dest_dir=config.site_dir,
                use_directory_urls=config.use_directory_urls,
            )
        )
    return files
