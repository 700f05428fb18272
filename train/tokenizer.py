"""SentencePiece tokenizer training: a model trained on first use, cached by a hash of its recipe (the tokenizer
class itself is `wmjax.tokenizer.Tokenizer`).

The default corpus is text that exists on every machine: the Python standard library's own ``.py`` files, found
through ``sysconfig.get_paths()["stdlib"]`` (tests and vendored third-party code excluded, sorted, so the corpus
is the same on every run of the same Python).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import sysconfig
import tempfile
import time
from typing import Iterable, Optional

import numpy as np
import sentencepiece as spm

from wmjax.tokenizer import Tokenizer

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def stdlib_files() -> list[str]:
    """Sorted list of the standard library's ``.py`` files (no test suites, no site-packages)."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for path in glob.glob(os.path.join(root, "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, root)
        parts = rel.split(os.sep)
        if parts[0] in ("site-packages", "dist-packages", "test", "idlelib", "lib2to3", "turtledemo") or "tests" in parts:
            continue
        files.append(path)
    if not files:
        raise FileNotFoundError(f"no Python standard library sources found under {root!r} (sysconfig stdlib path)")
    return sorted(files)


def read_text(path: str) -> str:
    with open(path, "rb") as fh:
        return fh.read().decode("utf-8", errors="replace")


def _sentences(texts: Iterable[str], max_bytes: int) -> Iterable[str]:
    total = 0
    for text in texts:
        for line in text.splitlines():
            line = line.rstrip()
            if not line.strip():
                continue
            total += len(line) + 1
            yield line
            if max_bytes and total >= max_bytes:
                return


def tokenizer_key(vocab_size: int, corpus: str, files: list[str], max_bytes: int, model_type: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(["v2", vocab_size, corpus, max_bytes, model_type, len(files)]).encode())
    for f in files[:5000]:
        try:
            st = os.stat(f)
            h.update(f"{f}:{st.st_size}".encode())
        except OSError:
            h.update(f.encode())
    return h.hexdigest()[:16]


def train_tokenizer(
    texts: Iterable[str],
    out_prefix: str,
    vocab_size: int,
    max_bytes: int = 8_000_000,
    model_type: str = "bpe",
    corpus: str = "the corpus",
    vocab_key: str = "vocab_size",
) -> str:
    """Train a SentencePiece model on ``texts`` and write ``out_prefix.model`` atomically.

    A corpus with no text or a vocabulary the corpus cannot fill raises ``ValueError`` naming ``vocab_key`` (the
    user's spelling of the vocabulary size option), its value and ``corpus`` (a description of the text).
    """
    sentences = list(_sentences(texts, max_bytes))
    if not sentences:
        raise ValueError(f"{corpus} holds no text to train a tokenizer on")
    os.makedirs(os.path.dirname(out_prefix) or ".", exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".sp-", dir=os.path.dirname(out_prefix) or ".")
    tmp_prefix = os.path.join(tmp_dir, "sp")
    try:
        _train_sentencepiece(sentences, tmp_prefix, vocab_size, model_type)
    except RuntimeError as e:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        n_chars = sum(len(s) + 1 for s in sentences)
        raise ValueError(_explain_sentencepiece_error(str(e), vocab_size, vocab_key, corpus, n_chars)) from None
    for ext in ("model", "vocab"):
        os.replace(f"{tmp_prefix}.{ext}", f"{out_prefix}.{ext}")
    os.rmdir(tmp_dir)
    return f"{out_prefix}.model"


def _train_sentencepiece(sentences: list[str], prefix: str, vocab_size: int, model_type: str) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=0.9995,  # rare characters go through byte fallback
        byte_fallback=True,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        split_digits=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n", "    ", "\t"],
        max_sentence_length=1 << 14,
        num_threads=max(1, os.cpu_count() or 1),
        minloglevel=2,
    )


def _explain_sentencepiece_error(msg: str, vocab_size: int, vocab_key: str, corpus: str, n_chars: int) -> str:
    """sentencepiece's RuntimeError text -> one line naming the option, its value, the corpus and the remedy."""
    too_high = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
    if too_high:
        most = too_high.group(2)
        return (f"{vocab_key} {vocab_size} is too large for {corpus}: sentencepiece can make at most {most} "
                f"pieces from its {n_chars:,} characters of text; use a smaller {vocab_key} (<= {most}) or more text")
    too_low = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg)
    if too_low:
        return (f"{vocab_key} {vocab_size} is too small for {corpus}: its characters and special pieces need at "
                f"least {too_low.group(2)}; use a larger {vocab_key}")
    last = msg.strip().splitlines()[-1] if msg.strip() else "unknown error"
    return f"sentencepiece could not train a {vocab_size}-piece tokenizer on {corpus}: {last}"


def get_tokenizer(tok_cfg, data_files: Optional[list[str]] = None, text_loader=None, log=print,
                  corpus_name: Optional[str] = None, vocab_key: str = "data.tokenizer.vocab_size") -> Tokenizer:
    """Load ``tok_cfg.path`` or train (once) and cache a tokenizer for ``tok_cfg``'s recipe.

    ``corpus_name`` / ``vocab_key`` describe the text and the vocabulary option in error messages (default: the
    training config's names).
    """
    if tok_cfg.path:
        if not os.path.exists(tok_cfg.path):
            raise FileNotFoundError(f"data.tokenizer.path: no such sentencepiece model: {tok_cfg.path}")
        return Tokenizer(tok_cfg.path)
    if tok_cfg.corpus == "stdlib":
        files = stdlib_files()
        loader = read_text
    else:
        if not data_files:
            raise ValueError("data.tokenizer.corpus='data' needs data.paths")
        files = list(data_files)
        loader = text_loader or read_text
    key = tokenizer_key(tok_cfg.vocab_size, tok_cfg.corpus, files, tok_cfg.max_corpus_bytes, tok_cfg.model_type)
    prefix = os.path.join(tok_cfg.cache_dir, f"sp-{tok_cfg.corpus}-{tok_cfg.vocab_size}-{key}")
    if not os.path.exists(prefix + ".model"):
        t0 = time.time()
        log(f"[tokenizer] training a {tok_cfg.vocab_size}-piece sentencepiece {tok_cfg.model_type} model on "
            f"{tok_cfg.corpus} ({len(files)} files, up to {tok_cfg.max_corpus_bytes / 1e6:.1f} MB) -> {prefix}.model")
        # Spread the byte budget over the whole file list (every k-th file) rather than the first few packages.
        texts = _spread(files, loader, tok_cfg.max_corpus_bytes)
        if corpus_name is None:
            what = "the stdlib corpus" if tok_cfg.corpus == "stdlib" else "data.paths"
            corpus_name = f"{what} ({len(files)} file(s): {files[0]}{', ...' if len(files) > 1 else ''})"
        train_tokenizer(texts, prefix, tok_cfg.vocab_size, tok_cfg.max_corpus_bytes, tok_cfg.model_type,
                        corpus=corpus_name, vocab_key=vocab_key)
        log(f"[tokenizer] trained in {time.time() - t0:.1f}s")
    return Tokenizer(prefix + ".model")


def _spread(files, loader, max_bytes):
    if not max_bytes:
        for f in files:
            yield loader(f)
        return
    sizes = []
    for f in files:
        try:
            sizes.append(os.path.getsize(f))
        except OSError:
            sizes.append(0)
    total = sum(sizes) or 1
    stride = max(1, int(total / max_bytes))
    order = list(range(0, len(files), stride)) + [i for i in range(len(files)) if i % stride]
    for i in order:
        yield loader(files[i])


def encode_documents(tok: Tokenizer, texts: Iterable[str], add_bos: bool = True, add_eos: bool = True, batch: int = 256):
    """Yield token arrays (uint32) for each text, with BOS/EOS added."""
    buf = []

    def flush():
        for ids in tok.encode_batch(buf):
            arr = ([tok.bos_id] if add_bos else []) + list(ids) + ([tok.eos_id] if add_eos else [])
            yield np.asarray(arr, dtype=np.uint32)

    for t in texts:
        buf.append(t)
        if len(buf) >= batch:
            yield from flush()
            buf = []
    if buf:
        yield from flush()
