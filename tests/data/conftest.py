"""Tokenizers trained once per session on the shipped corpora (each in about a second)."""

import pytest

from fastllm.data import load_corpus
from fastllm.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def botchan_tokenizer():
    return Tokenizer.train(load_corpus("botchan"), vocab_size=800, model_type="bpe")
