"""The documentation: the site builds with warnings as errors, reads like keras.io's, and its code runs.

`mkdocs build --strict` fails on a docstring griffe cannot parse, an argument
documented that a signature lacks, a broken link or anchor, and a page left
out of the nav; the API pages are generated from kerasbn's own docstrings, so
this also checks those. The built pages are then read as a newcomer would:
signatures, argument lists, examples as code, links, the version, the source.
The README (the package's page on PyPI) and the distribution guide's
multi-worker loop are run as pasted.
"""

from __future__ import annotations

import html
import importlib.util
import re
import shutil
from pathlib import Path

import pytest
from _procs import REPO_ROOT, logs, run_python, run_workers

needs_mkdocs = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("mkdocs", "mkdocstrings_handlers", "material")),
    reason="needs MkDocs, mkdocstrings[python] and mkdocs-material (the dev extra)",
)
needs_tf = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="the code needs TensorFlow")

README = (REPO_ROOT / "README.md").read_text()
BENCH_REPORT = (REPO_ROOT / "bench" / "results" / "latest.md").read_text()
BENCH_COMMIT = re.search(r"^- Git commit: ([0-9a-f]{7,40})", BENCH_REPORT, re.M)[1]
# A report merged from several runs' records names each run's commit in its command line.
RUN_COMMITS = set(re.findall(r"\bcommit ([0-9a-f]{7})\b", re.search(r"^- Command: (.*)$", BENCH_REPORT, re.M)[1]))
VERSION = re.search(r'^version = "([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text(), re.M)[1]


def python_blocks(markdown: str) -> list:
    return re.findall(r"^```python\n(.*?)^```", markdown, re.M | re.S)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site_dir = tmp_path_factory.mktemp("site")
    result = run_python(["-m", "mkdocs", "build", "--strict", "--site-dir", site_dir], env={"NO_MKDOCS_2_WARNING": "1"},
                        timeout=300, check=False)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    return site_dir


def _text(site_dir: Path, page: str) -> str:
    path = site_dir / page / "index.html"
    assert path.is_file(), f"{page} was not built; pages: {sorted(p.parent.name for p in site_dir.rglob('index.html'))}"
    return path.read_text()


def _signature(text: str, name: str) -> str:
    """The text of the signature block under the API entry `name` (tags stripped)."""
    entry = text.split(f'id="{name}"', 1)[1]
    block = re.search(r'doc-signature[^"]*">(.*?)</code>', entry, re.S)
    assert block, f"no signature under {name}"
    return html.unescape(re.sub(r"<[^>]+>", "", block[1]))


API_PAGES = ["api/batchnorm", "api/affine", "api/convert", "api/fold", "api/recompute-statistics", "api/ops",
             "api/experimental", "api/distribution", "api/callbacks"]


@needs_mkdocs
@pytest.mark.parametrize(
    "page, names",
    [
        ("api/batchnorm", ["kerasbn.BatchNorm", "assign_moving_average", "inference_function", "virtual_batch_size"]),
        ("api/affine", ["kerasbn.Affine"]),
        ("api/convert", ["kerasbn.convert"]),
        ("api/fold", ["kerasbn.fold", "kerasbn.FoldReport"]),
        ("api/recompute-statistics", ["kerasbn.recompute_statistics", "num_batches"]),
        ("api/ops", ["kerasbn.moments", "kerasbn.normalize", "kerasbn.fold_affine", "kerasbn.fold_into_kernel",
                     "channel_axes"]),
        ("api/experimental", ["kerasbn.experimental.DecorrelatedBatchNorm"]),
        # The contract's table comes from kerasbn/distributed.py's docstring.
        ("api/distribution", ["kerasbn.sync_moving_statistics", "kerasbn.cross_replica_moments",
                              "kerasbn.count_cross_replica_calls", "0 across workers", "kerasbn/replicas.py"]),
        ("api/callbacks", ["kerasbn.callbacks.SyncMovingStatistics", "kerasbn.callbacks.PreciseBN", "every_n_epochs"]),
        ("guides/distribution", ["sync_moving_statistics", "SyncMovingStatistics", "A multi-worker run"]),
    ],
)
def test_pages_are_built_from_the_docstrings(site, page, names):
    text = _text(site, page)
    missing = [name for name in names if name not in text]
    assert not missing, f"{page} does not mention {missing}"


@needs_mkdocs
@pytest.mark.parametrize(
    "page, name, arguments",
    [
        ("api/batchnorm", "kerasbn.BatchNorm", ["axis", "momentum", "epsilon", "virtual_batch_size", "fused", "**kwargs"]),
        ("api/affine", "kerasbn.Affine", ["axis"]),
        ("api/fold", "kerasbn.FoldReport", ["folded", "affine"]),
        ("api/callbacks", "kerasbn.callbacks.PreciseBN", ["dataset", "num_batches", "every_n_epochs", "verbose"]),
        ("api/callbacks", "kerasbn.callbacks.SyncMovingStatistics", ["timeout_seconds"]),
        ("api/experimental", "kerasbn.experimental.DecorrelatedBatchNorm", ["axis", "momentum"]),
    ],
)
def test_every_class_shows_its_constructor_signature(site, page, name, arguments):
    signature = _signature(_text(site, page), name)
    assert signature.lstrip().startswith(name.rsplit(".", 1)[1] + "("), signature
    missing = [argument for argument in arguments if argument not in signature]
    assert not missing, f"{name}'s signature lacks {missing}: {signature}"


@needs_mkdocs
def test_defaults_show_values_not_constant_names(site):
    for page, name in [("api/distribution", "kerasbn.sync_moving_statistics"),
                       ("api/callbacks", "kerasbn.callbacks.SyncMovingStatistics")]:
        text = _text(site, page)
        assert "DEFAULT_TIMEOUT_SECONDS" not in text, page
        assert "timeout_seconds: Optional[float] = None" in _signature(text, name)


@needs_mkdocs
def test_examples_are_code_and_call_arguments_a_list(site):
    batch_norm = _text(site, "api/batchnorm")
    for page in API_PAGES:
        # A `>>>` line outside a code block renders as nested block quotes.
        assert "<blockquote>" not in _text(site, page), page
    examples = batch_norm.split("Examples:", 1)[1]
    assert re.search(r'<div class="language-pycon highlight">', examples), examples[:500]
    call_arguments = batch_norm.split("Call arguments:", 1)[1].split("</ul>", 1)[0]
    items = re.findall(r"<li[^>]*>\s*<b><code>(\w+)</code></b>", call_arguments)
    assert items == ["inputs", "training", "mask"], call_arguments[:1000]
    # One value described over two lines is one entry, not two.
    yields = _text(site, "api/distribution").split("Yields:", 1)[1].split("</ul>", 1)[0]
    assert yields.count("<li") == 1, yields


@needs_mkdocs
def test_api_names_link_to_their_entries_and_bases_to_keras_io(site):
    batch_norm = _text(site, "api/batchnorm")
    assert re.search(r'<a class="autorefs autorefs-internal"[^>]*href="../distribution/#kerasbn.sync_moving_statistics"',
                     batch_norm), "kerasbn.sync_moving_statistics is not linked from BatchNorm's page"
    assert 'href="https://keras.io/api/layers/base_layer/"' in batch_norm
    assert 'href="https://keras.io/api/callbacks/base_callback/"' in _text(site, "api/callbacks")


@needs_mkdocs
def test_every_api_entry_links_to_its_source_line(site):
    checked = 0
    for page in API_PAGES:
        for href in re.findall(r'class="doc-source-link"><a href="([^"]+)"', _text(site, page)):
            path, anchor = href.split("#")
            source = (site / page / path / "index.html").resolve()
            assert source.is_file(), (page, href)
            assert f'id="{anchor}"' in source.read_text(), (page, href)
            checked += 1
    assert checked >= 15, checked
    # The class's line holds its definition (a decorator may come first).
    batch_norm = _text(site, "api/batchnorm")
    line = int(re.search(r'class="doc-source-link"><a href="[^"]+layer/#__codelineno-0-(\d+)"', batch_norm)[1])
    lines = (REPO_ROOT / "kerasbn" / "layer.py").read_text().splitlines()
    assert "class BatchNorm(" in "\n".join(lines[line - 1 : line + 1])


@needs_mkdocs
def test_every_page_carries_the_version(site):
    for page in ["", "api/batchnorm", "guides/benchmark"]:
        assert f"kerasbn {VERSION}" in _text(site, page).replace("&nbsp;", " "), page


@needs_mkdocs
def test_the_benchmark_figures_are_the_last_runs(site):
    # docs/hooks.py inserts latest.md's tables; a page quoting an older run has its own commit.
    for page in ["guides/benchmark", "guides/distribution"]:
        text = re.sub(r"built from commit \w+", "", _text(site, page))  # the footer's
        assert "<!-- bench:" not in text, page
        assert f"commit {BENCH_COMMIT}" in text, page
        commits = set(re.findall(r"\bcommit ([0-9a-f]{7})\b", text)) - {BENCH_COMMIT} - RUN_COMMITS
        assert not commits, f"{page} quotes runs at other commits: {commits}"
    goals = re.findall(r"^\| (.+?) \| (?:met|missed) \|", BENCH_REPORT, re.M)
    benchmark = _text(site, "guides/benchmark")
    assert goals and all(html.escape(goal, quote=False) in benchmark for goal in goals)


@needs_mkdocs
def test_the_hooks_turn_help_docstrings_into_api_markdown():
    spec = importlib.util.spec_from_file_location("docs_hooks", REPO_ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    text = hooks.api_docstring(
        "Summary, see `kerasbn.fold`.\n\nCall arguments:\n    x: A tensor.\n\nExample:\n\n>>> f(1)\n2"
    )
    assert text.splitlines()[2:] == ["Other Parameters: Call arguments:", "    x: A tensor.", "",
                                     "Examples:", "    >>> f(1)", "    2"], text
    assert '<autoref identifier="kerasbn.fold" optional><code>kerasbn.fold</code></autoref>' in text
    # Inside code blocks, headings and link texts names stay as written.
    kept = "```python\n`kerasbn.fold`\n```\n## `kerasbn.fold`\n[`kerasbn.fold`](x.md)"
    assert hooks.api_markdown(kept) == kept
    with pytest.raises(ValueError, match="0 sections"):
        hooks.bench_section(BENCH_REPORT, "No such section")


@needs_mkdocs
def test_the_result_plots_are_in_the_site(site):
    exercises = _text(site, "guides/exercises")
    images = re.findall(r'<img[^>]+src="([^"]+)"', exercises)
    assert len(images) >= 7, images
    for src in images:
        assert (site / "guides" / "exercises" / src).resolve().is_file(), src


def test_the_readme_has_no_link_that_breaks_on_pypi():
    # The README is the package's page on PyPI, where a relative link 404s; the project has no hosted URL yet.
    targets = re.findall(r"\]\(([^)\s]+)\)", README) + re.findall(r'(?:href|src)="([^"]+)"', README)
    relative = [target for target in targets if "://" not in target]
    assert not relative, relative
    # The files it names instead exist.
    named = set(re.findall(r"`((?:docs|examples|bench|training)/[\w/.-]+\.(?:md|py))`", README))
    named |= {f"docs/guides/{name}" for name in re.findall(r"`(\w[\w-]*\.md)`", README)} - {"docs/guides/CHANGELOG.md"}
    assert len(named) >= 10, named
    missing = sorted(path for path in named if not (REPO_ROOT / path).exists())
    assert not missing, missing


def test_the_readme_quotes_the_last_benchmark_run():
    quoted = set(re.findall(r"make bench` \(commit ([0-9a-f]{7,40})", README))
    assert quoted == {BENCH_COMMIT}, f"README quotes {quoted}; bench/results/latest.md is commit {BENCH_COMMIT}"


@needs_tf
@pytest.mark.parametrize("index", range(len(python_blocks(README))))
def test_the_readme_code_runs_as_pasted(index, tmp_path):
    # Each block alone, in a fresh process and an empty folder, as a reader would paste it.
    result = run_python(python_blocks(README)[index], cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": "-1"}, timeout=400)
    assert result.returncode == 0


def _multi_worker_loop() -> str:
    blocks = [block for block in python_blocks((REPO_ROOT / "docs/guides/distribution.md").read_text())
              if "MultiWorkerMirroredStrategy()" in block]
    assert len(blocks) == 1, blocks
    return blocks[0]


@needs_tf
def test_the_multi_worker_loop_runs_on_one_worker(tmp_path):
    result = run_python(_multi_worker_loop(), cwd=tmp_path, env={"TF_CONFIG": None, "CUDA_VISIBLE_DEVICES": "-1"},
                        timeout=300)
    assert "epoch 1: loss" in result.stdout and "0 layer(s) handed over" in result.stdout, result.stdout
    assert (tmp_path / "model.keras").is_file()


@pytest.mark.slow
@needs_tf
@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout to bound the workers")
def test_the_multi_worker_loop_runs_on_two_workers(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(_multi_worker_loop())
    folders = [tmp_path / f"worker{index}" for index in range(2)]
    for folder in folders:
        folder.mkdir()
    results = run_workers([[script]] * 2, tmp_path, env={"CUDA_VISIBLE_DEVICES": "-1"}, timeout=300, cwds=folders)
    for index, (code, log) in enumerate(results):
        output = Path(f"{log}.log").read_text(errors="replace")
        assert code == 0, f"worker {index} (exit {code}):\n{logs(log)}"
        # Each worker holds one of the 2 replicas' copies, and the handover reached the model's one layer.
        assert "epoch 1: loss" in output and "1 layer(s) handed over" in output, output[-2000:]
    # The chief saved alone; the other worker did not.
    assert (tmp_path / "worker0" / "model.keras").is_file()
    assert not (tmp_path / "worker1" / "model.keras").exists()
