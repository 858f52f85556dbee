"""kerasbn as a library: what `import kerasbn` loads, and the wheel a user installs.

* On the JAX backend `import kerasbn` (and using the layer) never imports
  TensorFlow, and what needs TensorFlow says so, naming the backend.
* The wheel and the sdist built from this checkout hold the `kerasbn` package
  alone (with its `py.typed` marker) and the licence text, carry the README as
  their description and require only keras and numpy; installed into a fresh
  virtual environment with JAX and the `test` extra beside it (no TensorFlow),
  the backend tests (the Makefile's BACKEND_TESTS: layer, ops, transforms,
  callbacks) pass under the JAX backend against the installed package, once
  for every Python version the classifiers declare (`make test-python`).

The fresh environment installs from pip's configured indexes and cache, as
`make test` does, so it needs no network beyond what set up `.venv`.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import xml.etree.ElementTree as ElementTree
import zipfile
from pathlib import Path

import pytest
from _procs import REPO_ROOT, run_python

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
# The Python versions the package declares; the wheel's tests run on each.
PYTHONS = [c.rsplit(" ", 1)[1] for c in PYPROJECT["project"]["classifiers"]
           if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
# The test files the installed-package run takes from tests/ (one list, the
# Makefile's): they import kerasbn, keras, NumPy and pytest only (TensorFlow
# inside tests marked tf_only). Their helpers (conftest.py, _*.py) go along.
BACKEND_TESTS = re.search(r"^BACKEND_TESTS := (.+)$", (REPO_ROOT / "Makefile").read_text(), re.M).group(1).split()
INSTALL_TIMEOUT_S = 900
needs_jax = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs JAX installed (the dev extra)")


# ------------------------------------------------------------------ import


@needs_jax
def test_import_on_jax_never_loads_tensorflow():
    result = run_python(
        """
        import sys
        import numpy as np
        import kerasbn

        assert "tensorflow" not in sys.modules, "import kerasbn loaded TensorFlow"
        layer = kerasbn.BatchNorm()
        x = np.random.default_rng(0).normal(size=(8, 3, 4)).astype("float32")
        layer(x, training=True)
        layer(x, training=False)
        kerasbn.recompute_statistics(layer, [x])
        for needs_tf in (lambda: kerasbn.BatchNorm(fused=True), lambda: layer.inference_function,
                         lambda: kerasbn.cross_replica_moments(x, axes=[0, 1])):
            try:
                needs_tf()
            except (ValueError, RuntimeError) as error:
                assert "needs the TensorFlow backend" in str(error) and "backend 'jax'" in str(error), error
            else:
                raise AssertionError("no error")
        assert "tensorflow" not in sys.modules, "using kerasbn loaded TensorFlow"
        print("ok", kerasbn.__version__)
        """,
        env={"KERAS_BACKEND": "jax"},
        timeout=300,
    )
    assert result.stdout.split()[0] == "ok", result.stdout


# ------------------------------------------------------------------- wheel


def _copy_checkout(destination: Path) -> Path:
    """The checkout's files as git would clone them (no .venv, runs, caches or build output)."""
    ignore = shutil.ignore_patterns(
        ".git", ".venv*", "runs", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache", "saved_models"
    )
    return Path(shutil.copytree(REPO_ROOT, destination, ignore=ignore))


def _run(args, timeout=INSTALL_TIMEOUT_S, **kwargs) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"timed out after {timeout}s: {args}\n{error.stdout}\n{error.stderr}")
    if result.returncode != 0:
        pytest.fail(f"exit {result.returncode}: {args}\n--- stdout ---\n{result.stdout[-4000:]}\n"
                    f"--- stderr ---\n{result.stderr[-4000:]}")
    return result


def _unconditional_requirements(metadata: str) -> list:
    """The names in Requires-Dist lines without an environment marker (no `extra == ...`)."""
    names = []
    for line in metadata.splitlines():
        if line.startswith("Requires-Dist:") and ";" not in line:
            names.append(re.match(r"[A-Za-z0-9_.-]+", line.split(":", 1)[1].strip()).group(0).lower())
    return sorted(names)


def _check_long_description(metadata: str) -> None:
    """PyPI's page is the README: the library's front page, not the training kit's manual."""
    assert re.search(r"^Description-Content-Type: text/markdown", metadata, re.M), metadata[:2000]
    description = metadata.split("\n\n", 1)[1]
    readme = (REPO_ROOT / "README.md").read_text()
    assert description.startswith(readme.splitlines()[0]), description[:200]
    assert description.strip() == readme.strip()
    # The install commands and the drop-in come first; the kit's long sections live in docs/.
    assert description.index("pip install kerasbn") < description.index("kerasbn.BatchNorm()")
    for moved in ("## The chapter's exercises", "## Tuning the learning rate", "Result for output key"):
        assert moved not in description, f"{moved!r} belongs in docs/, not on the package's front page"
    assert len(readme.splitlines()) <= 300


def _interpreter(version: str) -> str:
    """The `pythonX.Y` executable: the running one, one on PATH, or pyenv's; skipped if none (failed on CI)."""
    if version == "{}.{}".format(*sys.version_info[:2]):
        return sys.executable
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = [shutil.which(f"python{version}"), *sorted(glob.glob(f"{pyenv_root}/versions/{version}.*/bin/python{version}"))]
    for candidate in filter(None, candidates):
        # pyenv's shims are on PATH for every version, and fail outside the versions `pyenv global` names.
        if subprocess.run([candidate, "--version"], capture_output=True).returncode == 0:
            return candidate
    message = f"no Python {version} interpreter on PATH or under {pyenv_root}/versions"
    if os.environ.get("CI"):
        pytest.fail(f"{message}: CI must test every version the classifiers declare")
    pytest.skip(message)


def test_declared_python_versions_and_licence():
    """What the metadata declares is what the slow wheel test runs: every 3.x classifier, no other version."""
    assert PYTHONS == ["3.11", "3.12", "3.13"], PYTHONS
    low, high = PYTHONS[0], f"3.{int(PYTHONS[-1].split('.')[1]) + 1}"
    assert PYPROJECT["project"]["requires-python"] == f">={low},<{high}"
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    text = (REPO_ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"], text[:200]
    assert "END OF TERMS AND CONDITIONS" in text and len(text.splitlines()) == 202  # the full text, with its appendix
    # kerasbn uses Keras internals (pyproject's comment names them): the release tested is the range allowed.
    (keras,) = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("keras")]
    assert re.fullmatch(r"keras>=3\.(\d+)\.\d+,<3\.(\d+)", keras), keras


@pytest.mark.slow
@pytest.mark.timeout(3 * INSTALL_TIMEOUT_S)
@pytest.mark.parametrize("python_version", PYTHONS)
def test_wheel_ships_the_layer_alone_and_passes_its_tests_installed_with_jax_only(tmp_path, python_version):
    interpreter = _interpreter(python_version)
    source = _copy_checkout(tmp_path / "source")
    environment = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KERAS_BACKEND", "VIRTUAL_ENV")}
    _run([interpreter, "-m", "venv", "--clear", environment], env=env)
    python = environment / "bin" / "python"
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, "build"], env=env)

    # The sdist, then the wheel from the sdist (what `python -m build` does).
    dist = tmp_path / "dist"
    _run([python, "-m", "build", "--outdir", dist, source], env=env)
    (sdist,) = dist.glob("kerasbn-*.tar.gz")
    (wheel,) = dist.glob("kerasbn-*.whl")
    assert wheel.name.startswith(f"kerasbn-{VERSION}-"), wheel.name

    licence = (REPO_ROOT / "LICENSE").read_text()
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(f"kerasbn-{VERSION}.dist-info/METADATA").decode()
        entry_points = [n for n in names if n.endswith("entry_points.txt")]
        assert archive.read(f"kerasbn-{VERSION}.dist-info/licenses/LICENSE").decode() == licence
    assert {name.split("/")[0] for name in names} == {"kerasbn", f"kerasbn-{VERSION}.dist-info"}, sorted(names)
    assert _unconditional_requirements(metadata) == ["keras", "numpy"], metadata
    assert entry_points == [], "the wheel installs console scripts"
    assert {"tensorflow", "torch", "train", "test", "docs", "dev"} <= set(re.findall(r"^Provides-Extra: (\S+)$", metadata, re.M))
    assert "kerasbn/py.typed" in names, "the wheel lacks the PEP 561 marker"
    (requires_python,) = re.findall(r"^Requires-Python: (.+)$", metadata, re.M)
    assert set(requires_python.split(",")) == {">=3.11", "<3.14"}, requires_python  # the versions tested here
    assert re.findall(r"^License-(?:Expression|File): (.+)$", metadata, re.M) == ["Apache-2.0", "LICENSE"], metadata[:1500]
    _check_long_description(metadata)
    with tarfile.open(sdist) as archive:
        members = {m.split("/", 1)[1]: m for m in archive.getnames() if "/" in m}
        assert archive.extractfile(members["LICENSE"]).read().decode() == licence
    assert {m.split("/")[0] for m in members if "/" in m} == {"kerasbn", "kerasbn.egg-info"}, sorted(members)
    assert [m for m in members if m.endswith(".py") and not m.startswith("kerasbn/")] == [], sorted(members)

    _run([*pip, f"{wheel}[test]", "jax[cpu]"], env=env)
    installed = _run(
        [python, "-c", "import importlib.util as u, sys, kerasbn; print(kerasbn.__version__, kerasbn.__file__, "
         "u.find_spec('tensorflow') is None, '{}.{}'.format(*sys.version_info[:2]))"],
        env={**env, "KERAS_BACKEND": "jax"}, cwd=tmp_path,
    ).stdout.split()
    assert installed == [VERSION, installed[1], "True", python_version] and str(environment) in installed[1], installed

    # The library's own tests against the installed package: copied out of
    # the checkout, so nothing but site-packages can provide kerasbn.
    tests = tmp_path / "tests"
    tests.mkdir()
    helpers = [p.name for p in (REPO_ROOT / "tests").glob("*.py") if not p.name.startswith("test_")]
    for name in [*helpers, *(Path(t).name for t in BACKEND_TESTS)]:
        shutil.copy(REPO_ROOT / "tests" / name, tests / name)
    report = tmp_path / "report.xml"
    try:
        run = subprocess.run(
            [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", f"--junitxml={report}",
             "--rootdir", tests, *(tests / Path(t).name for t in BACKEND_TESTS)],
            capture_output=True, text=True, timeout=2 * INSTALL_TIMEOUT_S, cwd=tests, env={**env, "KERAS_BACKEND": "jax"},
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the backend tests under Python {python_version} timed out after {error.timeout}s:\n"
                    f"{(error.stdout or b'').decode(errors='replace')[-3000:]}")
    assert run.returncode == 0, f"{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
    suite = ElementTree.parse(report).getroot().find("testsuite")
    counts = {key: int(suite.get(key)) for key in ("tests", "failures", "errors", "skipped")}
    assert counts["failures"] == counts["errors"] == 0, counts
    assert counts["tests"] - counts["skipped"] > 200, counts  # the backend tests really ran
    assert "kerasbn" not in {p.name for p in tmp_path.iterdir()}  # no source copy beside the tests
