"""The site's build steps beyond MkDocs and mkdocstrings: results, benchmark tables, source pages, API prose.

* **Measured results.** The guides link to the plots and reports where they
  live in the checkout (`../../training/results/x.png` from `docs/guides/`),
  so the same Markdown reads on GitHub. `on_files` adds those folders' files
  to the site at the same paths and `on_page_markdown` rewrites each page's
  links to them, so one copy of every plot serves both and `--strict` checks
  the links like any other.
* **Benchmark tables from the current run.** A line
  `<!-- bench: SECTION -->` is replaced by that section of
  `bench/results/latest.md` (`## SECTION`, matched by its start), headed by
  the run's commit and date, and `<!-- bench: run -->` by the run in words
  (command, commit, date, machine, versions): the site quotes the run
  `make bench` last wrote, never a copy. On GitHub the marker is invisible
  and the link to latest.md beside it stands.
* **Source pages.** Every module of `kerasbn/` becomes a page
  `source/kerasbn/NAME/` with numbered, anchored lines; each API entry links
  to its definition there (`docs/templates/`). There is no
  hosted repository to link to, so the site carries the source it was built
  from.
* **Version.** The site's name and footer carry the version in
  `pyproject.toml` and the commit the site was built from.
* **API prose** (`KerasbnDocstrings`, a griffe extension that mkdocstrings
  loads, see mkdocs.yml): Google-style docstrings written for `help()` read
  as keras.io's pages: an `Example:` block becomes an Examples section (its
  `>>>` lines code, not nested quotes), `Call arguments:` a list like
  `Args:`, a default named by a module constant shows its value, and
  `kerasbn.NAME` in backticks links to NAME's API entry. Docstrings stay
  as written.
"""

from __future__ import annotations

import html
import posixpath
import re
import subprocess
import tomllib
from pathlib import Path

import griffe
from mkdocs.structure.files import File, InclusionLevel

RESULT_FOLDERS = ("training/results", "bench/results")
BENCH_REPORT = "bench/results/latest.md"
# `make bench` also leaves dated, git-ignored reports (2026-12-02-host.md) beside latest.md.
_DATED = re.compile(r"^\d{4}-")
_BENCH_MARKER = re.compile(r"<!-- bench: (?P<section>.+?) -->")
# The bases kerasbn's classes derive from, on keras.io (read online; no inventory of Keras exists).
KERAS_PAGES = {
    "keras.layers.Layer": "https://keras.io/api/layers/base_layer/",
    "keras.callbacks.Callback": "https://keras.io/api/callbacks/base_callback/",
}
SOURCE_PACKAGE = "kerasbn"
SOURCE_PAGES = "source"
# docs/templates/ writes `href="kerasbn-source:kerasbn/layer.py#43"`; on_page_content makes it relative.
_SOURCE_LINK = re.compile(r'href="kerasbn-source:(?P<path>[\w/]+)\.py#(?P<line>\d+)"')


def _repo_root(config) -> Path:
    return Path(config.config_file_path).resolve().parent


def _commit(root: Path) -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # an sdist or export: no git history
        return ""


def on_config(config):
    root = _repo_root(config)
    version = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    commit = _commit(root)
    config.site_name = f"kerasbn {version}"
    config.copyright = f"kerasbn {version}" + (f", built from commit {commit}" if commit else "") + ". Apache-2.0."
    return config


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
    for path in sorted((root / SOURCE_PACKAGE).rglob("*.py")):
        module = path.relative_to(root).as_posix()
        files.append(
            File.generated(
                config,
                f"{SOURCE_PAGES}/{module[:-3]}.md",
                content=_source_page(module, path.read_text(), config.site_name),
                inclusion=InclusionLevel.NOT_IN_NAV,
            )
        )
        # `kerasbn/plan.py` in backticks links to its page (`api_markdown`); autorefs makes the URL relative.
        config.plugins["autorefs"].register_url(module, f"{SOURCE_PAGES}/{module[:-3]}/")
    for identifier, url in KERAS_PAGES.items():
        config.plugins["autorefs"].register_url(identifier, url)
    return files


def _source_page(module: str, source: str, site_name: str) -> str:
    fence = "`" * 4  # the source holds ``` blocks in its docstrings
    return (
        f"---\nsearch:\n  exclude: true\n---\n\n# {module}\n\n"
        f"The source of {site_name} this site was built from; each API entry's *source* link points at a line here.\n\n"
        f'{fence}python linenums="1"\n{source}\n{fence}\n'
    )


def on_page_markdown(markdown, page, config, files):
    page_dir = posixpath.dirname(page.file.src_uri)
    for folder in RESULT_FOLDERS:
        in_checkout = posixpath.relpath(folder, posixpath.join("docs", page_dir))
        in_site = posixpath.relpath(folder, page_dir or ".")
        markdown = markdown.replace(f"]({in_checkout}/", f"]({in_site}/")
    if _BENCH_MARKER.search(markdown):
        report = (_repo_root(config) / BENCH_REPORT).read_text()
        markdown = _BENCH_MARKER.sub(lambda match: bench_section(report, match["section"]), markdown)
    if page.file.src_uri.startswith(f"{SOURCE_PAGES}/"):
        return markdown
    return api_markdown(markdown)


def bench_run(report: str, long: bool = False) -> str:
    """The run a `make bench` report comes from: its commit and date (and machine and versions if `long`)."""
    fields = dict(re.findall(r"^- ([\w ]+): (.*)$", report, re.MULTILINE))
    stamp = re.match(r"(?P<commit>[0-9a-f]{7,40}); started (?P<date>\d{4}-\d{2}-\d{2})", fields.get("Git commit", ""))
    if not stamp:
        raise ValueError(f"{BENCH_REPORT} names no commit and start date (its `- Git commit:` line)")
    run = f"commit {stamp['commit']}, {stamp['date']}"
    if long:
        machine = fields.get("Machine", "").split(";")[0]
        run = f"`{fields.get('Command', 'python -m bench')}` at {run}, on {machine} ({fields.get('Versions', '')})"
    return run


def bench_section(report: str, title: str) -> str:
    """`run`: the run in words; else the section `## TITLE...` of a `make bench` report, headed by its run."""
    if title == "run":
        return bench_run(report, long=True)
    sections = re.split(r"^## ", report, flags=re.MULTILINE)[1:]
    matches = [section for section in sections if section.startswith(title)]
    if len(matches) != 1:
        raise ValueError(f"{BENCH_REPORT} has {len(matches)} sections starting {title!r}, not one")
    body = matches[0].split("\n", 1)[1].strip()
    return f"*{BENCH_REPORT}, {bench_run(report)}:*\n\n{body}\n"


def on_page_content(html_text, page, config, files):
    base = page.url if page.url.endswith("/") else posixpath.dirname(page.url)

    def link(match):
        target = posixpath.relpath(f"{SOURCE_PAGES}/{match['path']}", base or ".")
        return f'href="{target}/#__codelineno-0-{match["line"]}"'

    return _SOURCE_LINK.sub(link, html_text)


# ------------------------------------------------------------- API prose (griffe)

# `kerasbn.BatchNorm` or `kerasbn/plan.py` as inline code, not already a link's text.
_API_NAME = re.compile(r"(?<!\[)`(kerasbn(?:\.\w+)+|kerasbn/[\w/]+\.py)`(?!\])")
_FENCE = re.compile(r"^\s*(```|~~~)")
_SECTION_TITLE = re.compile(r"^[A-Z][\w ]*:$")


class KerasbnDocstrings(griffe.Extension):
    """Reads kerasbn's `help()` docstrings as API pages (see the module docstring)."""

    def on_instance(self, *, obj, **kwargs):
        if obj.docstring is not None:
            obj.docstring.value = api_docstring(obj.docstring.value)

    def on_package(self, *, pkg, **kwargs):
        for function in _functions(pkg):
            for parameter in function.parameters:
                if isinstance(parameter.default, griffe.ExprName):
                    constant = _constant(pkg, parameter.default.canonical_path)
                    if constant is not None:
                        parameter.default = constant


def _functions(obj):
    for member in obj.members.values():
        if member.is_alias:
            continue
        if member.is_function:
            yield member
        elif member.is_class or member.is_module:
            yield from _functions(member)


def _constant(pkg, path):
    """The value of a module constant (`DEFAULT_X = 30.0`) as written, or None."""
    try:
        target = pkg.modules_collection[path]
        while target.is_alias:
            target = target.final_target
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None
    if target.is_attribute and target.value is not None and re.fullmatch(r"[A-Z_0-9]+", target.name):
        return target.value
    return None


def api_docstring(text: str) -> str:
    """Markdown for the API page from a docstring written for `help()`."""
    lines = text.split("\n")
    out = []
    index = 0
    while index < len(lines):
        line = lines[index]
        if line in ("Example:", "Examples:") and index + 1 < len(lines) and not lines[index + 1].strip():
            # `help()` shows an unindented example best; griffe wants a section indented under its title.
            end = index + 1
            while end < len(lines) and not (_SECTION_TITLE.match(lines[end]) and not lines[end - 1].strip()):
                end += 1
            block = lines[index + 1 : end]
            while block and not block[0].strip():
                block.pop(0)
            out.append("Examples:")
            out.extend(f"    {example}" if example.strip() else "" for example in block)
            index = end
        elif line == "Call arguments:":
            # griffe's Google parser knows no such section; read it as other parameters, titled as written.
            out.append("Other Parameters: Call arguments:")
            index += 1
        else:
            out.append(line)
            index += 1
    return api_markdown("\n".join(out))


def api_markdown(markdown: str) -> str:
    """Links each `kerasbn.NAME` and `kerasbn/module.py` in inline code (not in code blocks or headings)."""
    out = []
    in_fence = False
    for line in markdown.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and not line.lstrip().startswith("#"):
            line = _API_NAME.sub(_autoref, line)
        out.append(line)
    return "\n".join(out)


def _autoref(match) -> str:
    # Optional: a name without an API entry of its own (a module, a private helper) stays plain code.
    name = match[1]
    return f'<autoref identifier="{name}" optional><code>{html.escape(name)}</code></autoref>'
