"""MkDocs hook: the repository's measured results (plots, result tables) in the site.

The guides link to the plots and reports where they live in the checkout
(`../../training/results/x.png` from `docs/guides/`), so the same Markdown
reads on GitHub. This hook adds those folders' files to the site at the same
paths (`training/results/x.png`) and rewrites each page's links to them, so
one copy of every plot serves both and `mkdocs build --strict` checks the
links like any other.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, InclusionLevel

RESULT_FOLDERS = ("training/results", "bench/results")
# `make bench` also leaves dated, git-ignored reports (2026-12-02-host.md) beside latest.md.
_DATED = re.compile(r"^\d{4}-")


def _repo_root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def on_files(files, config):
    root = _repo_root(config)
    for folder in RESULT_FOLDERS:
        for path in sorted((root / folder).glob("*")):
            if path.suffix not in (".png", ".md") or _DATED.match(path.name):
                continue
            files.append(
                File(
                    f"{folder}/{path.name}",
                    src_dir=str(root),
                    dest_dir=config.site_dir,
                    use_directory_urls=config.use_directory_urls,
                    inclusion=InclusionLevel.NOT_IN_NAV,
                )
            )
    return files


def on_page_markdown(markdown, page, config, files):
    page_dir = posixpath.dirname(page.file.src_uri)
    for folder in RESULT_FOLDERS:
        in_checkout = posixpath.relpath(folder, posixpath.join("docs", page_dir))
        in_site = posixpath.relpath(folder, page_dir or ".")
        markdown = markdown.replace(f"]({in_checkout}/", f"]({in_site}/")
    return markdown
