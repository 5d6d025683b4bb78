"""Every docstring example under ``service/`` runs, one test per module that has examples.

Modules are found with ``pkgutil.walk_packages``, so a new module's examples are tested without
being listed here. ``doctest.testmod(m).failed == 0`` alone would also pass for a module whose
examples were all deleted (or that never had any); the list of modules with examples is therefore
asserted to be non-empty, and every collected module must actually run an example (modules whose
examples are all ``+SKIP`` only show usage and are not collected).
"""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil

import pytest

import service
from service.config import REPO_ROOT

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _service_modules() -> list[str]:
    # onerror: a package whose __init__ fails to import must fail the test below, not vanish.
    found = pkgutil.walk_packages(service.__path__, "service.", onerror=_reraise)
    return sorted(info.name for info in found)


def _reraise(name: str) -> None:
    raise ImportError(f"cannot import {name} while collecting doctests")


def _runs(example: doctest.Example) -> bool:
    return not example.options.get(doctest.SKIP, False)


def _doctests(module_name: str) -> list[doctest.DocTest]:
    """The module's docstrings with at least one example that runs (``+SKIP`` ones only show
    usage that needs a server or a cluster); its own objects only, not what it imports."""
    module = importlib.import_module(module_name)
    found = doctest.DocTestFinder(exclude_empty=True).find(module, module_name)
    return [test for test in found if any(map(_runs, test.examples))]


def _has_examples(module_name: str) -> bool:
    try:
        return bool(_doctests(module_name))
    except Exception:  # noqa: BLE001 - collected anyway: the test below shows the import error
        return True


MODULES_WITH_EXAMPLES = [name for name in _service_modules() if _has_examples(name)]


def test_modules_with_examples_are_found() -> None:
    assert MODULES_WITH_EXAMPLES, "no module under service/ has docstring examples to run"
    # the walk reaches into subpackages, not only the top level
    assert any(name.count(".") >= 2 for name in MODULES_WITH_EXAMPLES), MODULES_WITH_EXAMPLES


@pytest.mark.parametrize("module_name", MODULES_WITH_EXAMPLES)
def test_docstring_examples(module_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)  # examples use repo-relative paths to the bundled data
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report = io.StringIO()
    ran = 0
    for test in _doctests(module_name):
        result = runner.run(test, out=report.write)
        ran += result.attempted  # skipped examples are not attempted
    assert runner.failures == 0, report.getvalue()
    assert ran > 0, f"{module_name}: no example ran"
