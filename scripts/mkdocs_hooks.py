"""MkDocs hooks (mkdocs.yml ``hooks:``): pages generated at build time, so they can never go stale.

(The configuration reference, docs/reference/config.md, is committed: scripts/gen_config_reference.py
writes it from src/fedmarket/config.py and tests/test_docs_site.py fails when it is out of date.)
- ``release-notes.md``: the repository's CHANGELOG.md, with its links into docs/ made relative to the site.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
CONFIG_PAGE = "reference/config.md"
CHANGELOG_PAGE = "release-notes.md"


def _renderer():
    name = "gen_config_reference"
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def changelog_page() -> str:
    """CHANGELOG.md as a site page: ``](docs/x.md)`` → ``](x.md)``; links to other repository files are
    left to the reader as plain text."""
    text = (ROOT / "CHANGELOG.md").read_text()
    return re.sub(r"\]\(docs/", "](", text)


def on_files(files, config):
    files.append(File.generated(config, CHANGELOG_PAGE, content=changelog_page()))
    return files
