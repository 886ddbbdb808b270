"""Every docstring example of datadiet runs as a doctest: one test per module, failing with the doctest report."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import tempfile

import pytest
import torch

import datadiet
from datadiet.scores import registry

# `datadiet.__main__` runs the command line when imported.
MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(datadiet.__path__, prefix="datadiet.")
    if not info.name.endswith(".__main__")
)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Whatever the examples write (to `tempfile.mkdtemp()` or to a relative path) lands in `tmp_path`. One thread, as
    the examples' models are tiny (two threads spin waiting for each other on a busy machine, several times slower).
    The torch RNG and the score registry (`register_score`'s example adds a score) are restored afterwards, so that
    the examples leave nothing behind for other tests."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    threads = torch.get_num_threads()
    scores = dict(registry._REGISTRY)
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            yield
    finally:
        torch.set_num_threads(threads)
        registry._REGISTRY.clear()
        registry._REGISTRY.update(scores)


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name, isolated):
    module = importlib.import_module(module_name)
    # Empty globals, not the module's: an example must import what it uses, as someone copying it has to.
    tests = doctest.DocTestFinder().find(module, globs={})
    # Every `>>>` line of the source must be run: an example the finder cannot reach would go untested.
    written = sum(line.lstrip().startswith(">>>") for line in inspect.getsource(module).splitlines())
    assert sum(len(test.examples) for test in tests) == written, f"{module_name} has examples doctest does not find"
    runner = doctest.DocTestRunner()
    report: list[str] = []
    for test in tests:
        runner.run(test, out=report.append)
    if runner.failures:
        pytest.fail(f"{runner.failures} of {runner.tries} examples failed:\n" + "".join(report), pytrace=False)
