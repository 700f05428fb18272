"""Shared fixtures."""

import pytest

from train.tokenizer import read_text, stdlib_files, train_tokenizer


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory):
    """A 512-piece sentencepiece BPE model trained by train/'s own recipe (pad 0, unk 1, bos 2, eos 3, byte
    fallback, user-defined "\\n" / "    " / "\\t") on ~200 KB of the standard library (about a second)."""
    files = stdlib_files()[::25]
    return train_tokenizer((read_text(f) for f in files), str(tmp_path_factory.mktemp("sp") / "sp512"), 512,
                           max_bytes=200_000)
