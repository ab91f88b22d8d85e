"""The runnable examples in the library's docstrings run and print what they say."""

import doctest
import importlib
import pkgutil
import warnings

import pytest

import osd_jax

MODULES = sorted(["osd_jax"]
                 + [f"osd_jax.{m.name}" for m in pkgutil.iter_modules(osd_jax.__path__)])


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", osd_jax.FullRankWarning)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False)
  assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
