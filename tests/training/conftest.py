"""Fixtures of the training tests: a saved tiny model + tokenizer and a small arithmetic data file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comol.data.arithmetic import generate

from .tiny import make_char_tokenizer, make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama + character tokenizer, loadable with ``from_pretrained``."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_char_tokenizer()
    tokenizer.save_pretrained(path)
    make_tiny_model(len(tokenizer)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def arithmetic_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 generated arithmetic records as JSON."""
    path = tmp_path_factory.mktemp("data") / "arith.json"
    path.write_text(json.dumps(generate(64, seed=1)))
    return path
