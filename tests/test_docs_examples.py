"""The examples in the public docstrings run and print what they show (doctest)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "lesa",
    "lesa.config",
    "lesa.schedule",
    "lesa.settings",
    "lesa.evaluate.methods",
    "lesa.pipelines",
    "lesa.record",
    "lesa.recording",
    "lesa.calibrate",
    "lesa.correction",
    "lesa.predictor.artefact",
    "lesa.predictor.model",
    "lesa.predictor.schedule_free",
    "lesa.testing.tiny_pipelines",
    "lesa.training",
    "lesa.training.config",
    "lesa.training.data",
    "lesa.training.phases",
    "lesa.training.schedule_free",
    "lesa.training.trainer",
    "lesa.training.validation",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {name}"
