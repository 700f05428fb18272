"""Data: token files, document packing, a deterministic checkpointable position, per-host batch shards.

Every source ends up as one or more *token files*: a flat numpy memmap of token ids (``<name>.bin``) with a
JSON sidecar (``<name>.json``: dtype, token count, tokenizer, bos/eos ids).  Documents are stored back to back
as ``BOS t1 .. tn EOS``.  ``python -m train.prepare`` writes such files from text/JSONL; the ``stdlib``, ``text``
and ``jsonl`` sources are tokenized once into a cache directory by the same code.

Packing: the stream is cut into windows of ``seq_len + 1`` tokens (stride ``seq_len``), each window giving
``seq_len`` inputs and next-token targets.  Documents are not padded: a window may hold the end of one document
and the start of the next; ``segment_ids`` (1, 2, ... per document inside the window), per-document
``positions`` (restarting at 0 at each BOS) and ``loss_mask`` (no loss for the EOS -> next document's BOS
transition) keep them apart when the model takes ``segment_ids``.

Order: sample ``k`` of the run (``k = step * global_batch + row``) is window ``perm_e[k mod W]`` of epoch
``e = k // W``, where ``perm_e`` is a permutation seeded by ``(seed, e)``.  The data position is therefore just
the number of samples consumed: it is saved in every checkpoint, and a resumed run reads exactly the windows
the uninterrupted run would have read.  With several hosts, host ``h`` reads only rows ``[h*B/P, (h+1)*B/P)``
of each global batch.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np

from wmjax.tokenizer import Tokenizer

from .tokenizer import encode_documents, read_text, stdlib_files


# --------------------------------------------------------------------------------------------------------------
# token files


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65535 else np.uint32


def write_token_file(out_path: str, docs: Iterable[np.ndarray], vocab_size: int, meta: Optional[dict] = None,
                     progress=None) -> dict:
    """Write documents (token arrays) to ``out_path`` (.bin) + ``.json`` sidecar, atomically."""
    if out_path.endswith(".json"):
        out_path = out_path[:-5] + ".bin"
    if not out_path.endswith(".bin"):
        out_path += ".bin"
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    dtype = token_dtype(vocab_size)
    tmp = f"{out_path}.{os.getpid()}.tmp"  # per process: two runs tokenizing into one cache dir do not collide
    n_tokens = n_docs = 0
    with open(tmp, "wb") as fh:
        for d in docs:
            a = np.asarray(d)
            if a.size and int(a.max()) >= vocab_size:
                raise ValueError(f"token id {int(a.max())} >= vocab_size {vocab_size}")
            fh.write(a.astype(dtype).tobytes())
            n_tokens += a.size
            n_docs += 1
            if progress is not None:
                progress.update(1)
    info = {"format": "wmjax-tokens-v1", "dtype": np.dtype(dtype).name, "num_tokens": n_tokens,
            "num_documents": n_docs, "vocab_size": vocab_size, **(meta or {})}
    os.replace(tmp, out_path)
    with open(f"{out_path[:-4]}.json.{os.getpid()}.tmp", "w") as fh:
        json.dump(info, fh, indent=1)
    os.replace(f"{out_path[:-4]}.json.{os.getpid()}.tmp", out_path[:-4] + ".json")
    return info


def open_token_file(path: str) -> tuple[np.ndarray, dict]:
    if path.endswith(".json"):
        path = path[:-5] + ".bin"
    meta_path = path[:-4] + ".json"
    if not os.path.exists(path) or not os.path.exists(meta_path):
        raise FileNotFoundError(f"token file {path} (with sidecar {meta_path}) not found; write it with "
                                f"`python -m train.prepare`")
    with open(meta_path) as fh:
        meta = json.load(fh)
    arr = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
    if arr.shape[0] != meta["num_tokens"]:
        raise ValueError(f"{path}: holds {arr.shape[0]} tokens but its sidecar says {meta['num_tokens']} "
                         f"(truncated or partially written file?)")
    return arr, meta


# --------------------------------------------------------------------------------------------------------------
# text sources


def expand_paths(paths, key: str = "data.paths") -> list[str]:
    """Files named by ``paths`` (files, directories searched recursively, globs), in order.

    A pattern that matches no file raises ``FileNotFoundError`` naming ``key`` (the option that gave it).
    """
    out = []
    for p in paths:
        hits = sorted(glob.glob(os.path.expanduser(p), recursive=True))
        if not hits:
            raise FileNotFoundError(f"{key}: nothing matches {p!r}")
        found = []
        for h in hits:
            if os.path.isdir(h):
                found.extend(sorted(f for f in glob.glob(os.path.join(h, "**", "*"), recursive=True)
                                    if os.path.isfile(f)))
            else:
                found.append(h)
        if not found:
            raise FileNotFoundError(f"{key}: {p!r} matches only directories without files")
        out.extend(found)
    return out


def iter_texts(source: str, files: list[str], text_field: str = "text", max_documents: int = 0) -> Iterator[str]:
    n = 0
    for f in files:
        if source == "jsonl":
            with open(f, encoding="utf-8", errors="replace") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{f}:{lineno}: not valid JSON: {e}") from None
                    if not isinstance(obj, dict) or text_field not in obj:
                        raise ValueError(f"{f}:{lineno}: no {text_field!r} field (data.text_field)")
                    yield str(obj[text_field])
                    n += 1
                    if max_documents and n >= max_documents:
                        return
        else:
            yield read_text(f)
            n += 1
            if max_documents and n >= max_documents:
                return


def source_files(data_cfg) -> list[str]:
    if data_cfg.source == "stdlib":
        return stdlib_files()
    return expand_paths(data_cfg.paths)


def cached_token_file(data_cfg, tok: Tokenizer, log=print) -> str:
    """Tokenize a text source once into ``data_cfg.cache_dir`` and return the token file path."""
    files = source_files(data_cfg)
    h = hashlib.sha256()
    h.update(json.dumps([data_cfg.source, data_cfg.text_field, data_cfg.max_documents, tok.vocab_size]).encode())
    with open(tok.path, "rb") as fh:
        h.update(hashlib.sha256(fh.read()).digest())
    for f in files:
        try:
            h.update(f"{f}:{os.path.getsize(f)}".encode())
        except OSError:
            h.update(f.encode())
    out = os.path.join(data_cfg.cache_dir, f"{data_cfg.source}-{h.hexdigest()[:16]}.bin")
    if os.path.exists(out) and os.path.exists(out[:-4] + ".json"):
        return out
    t0 = time.time()
    texts = iter_texts(data_cfg.source, files, data_cfg.text_field, data_cfg.max_documents)
    info = write_token_file(out, encode_documents(tok, texts), tok.vocab_size,
                            meta={"tokenizer": os.path.abspath(tok.path), "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                                  "source": data_cfg.source})
    log(f"[data] tokenized {info['num_documents']} documents -> {info['num_tokens']:,} tokens in "
        f"{time.time() - t0:.1f}s ({out})")
    return out


# --------------------------------------------------------------------------------------------------------------
# packed, deterministic dataset


@dataclass
class DataState:
    """Checkpointable data position."""

    samples_seen: int
    fingerprint: str

    def to_json(self) -> dict:
        return {"samples_seen": int(self.samples_seen), "fingerprint": self.fingerprint}


def _special_id(name: str, given: Optional[int], files: list[str], metas: list[dict]) -> int:
    """The document-boundary id ``name`` (bos | eos): ``given`` (data.<name>_id), else every sidecar's ``<name>_id``.

    No silent default: packing cuts documents at these ids, and a wrong guess splits documents at ordinary
    tokens (or at the model's zero-initialised pad row, which makes the gradient overflow with depth)."""
    if given is not None:
        return int(given)
    ids = {m.get(f"{name}_id") for m in metas}
    if None in ids:
        bad = next(f for f, m in zip(files, metas) if m.get(f"{name}_id") is None)
        side = (bad[:-4] if bad.endswith(".bin") else bad) + ".json"
        raise ValueError(f"{side}: the token file's sidecar has no {name}_id; set data.{name}_id (the token id "
                         f"that {'starts' if name == 'bos' else 'ends'} each document in it)")
    if len(ids) > 1:
        raise ValueError(f"data.paths: the token files disagree on {name}_id ({sorted(ids)}); set data.{name}_id")
    return int(ids.pop())


class PackedDataset:
    def __init__(self, token_files: list[str], seq_len: int, seed: int, shuffle: bool = True,
                 eos_id: Optional[int] = None, bos_id: Optional[int] = None):
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.arrays, metas = [], []
        for p in token_files:
            a, m = open_token_file(p)
            self.arrays.append(a)
            metas.append(m)
        self.bos_id = _special_id("bos", bos_id, token_files, metas)
        self.eos_id = _special_id("eos", eos_id, token_files, metas)
        self.pad_id = next((m["pad_id"] for m in metas if m.get("pad_id") is not None), None)
        counts = [max(0, (a.shape[0] - 1) // self.seq_len) for a in self.arrays]
        self.cum = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_windows = int(self.cum[-1])
        if self.num_windows == 0:
            raise ValueError(f"data: fewer than seq_len+1={self.seq_len + 1} tokens in {token_files}")
        self.num_tokens = int(sum(a.shape[0] for a in self.arrays))
        self._perm_cache: dict[int, np.ndarray] = {}
        fp = hashlib.sha256(json.dumps([[m.get("num_tokens") for m in metas], self.seq_len, self.seed,
                                        self.shuffle]).encode()).hexdigest()[:16]
        self.fingerprint = fp

    def _perm(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return None
        p = self._perm_cache.get(epoch)
        if p is None:
            p = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_cache = {epoch: p}
        return p

    def window_index(self, k: int) -> int:
        epoch, i = divmod(int(k), self.num_windows)
        perm = self._perm(epoch)
        return int(perm[i]) if perm is not None else i

    def window(self, w: int) -> np.ndarray:
        f = int(np.searchsorted(self.cum, w, side="right") - 1)
        start = (w - int(self.cum[f])) * self.seq_len
        return np.asarray(self.arrays[f][start:start + self.seq_len + 1], dtype=np.int32)

    def sample(self, k: int) -> np.ndarray:
        return self.window(self.window_index(k))

    def batch(self, first_sample: int, rows: int) -> dict:
        """Rows ``first_sample .. first_sample+rows-1`` of the sample sequence as a packed batch."""
        x = np.stack([self.sample(first_sample + r) for r in range(rows)])
        return pack(x, self.eos_id, self.bos_id)


def pack(windows: np.ndarray, eos_id: int, bos_id: int) -> dict:
    """[B, L+1] token windows -> inputs/targets/segment_ids/positions/loss_mask, each [B, L]."""
    inputs = windows[:, :-1]
    targets = windows[:, 1:]
    # A new document starts at every BOS and right after every EOS.
    starts = (inputs == bos_id)
    starts[:, 1:] |= inputs[:, :-1] == eos_id
    starts[:, 0] = True
    segment_ids = np.cumsum(starts, axis=1).astype(np.int32)
    idx = np.arange(inputs.shape[1])[None, :]
    last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    positions = (idx - last_start).astype(np.int32)
    # No loss on the EOS -> next-document transition (the target belongs to another document).
    loss_mask = (inputs != eos_id).astype(np.float32)
    return {"tokens": inputs.astype(np.int32), "targets": targets.astype(np.int32),
            "segment_ids": segment_ids, "positions": positions, "loss_mask": loss_mask}


class BatchIterator:
    """Yields this host's shard of each global batch, from a checkpointable position."""

    def __init__(self, dataset: PackedDataset, global_batch: int, process_index: int = 0, process_count: int = 1,
                 samples_seen: int = 0):
        if global_batch % process_count:
            raise ValueError(f"train.global_batch_size={global_batch} must be divisible by the number of hosts "
                             f"({process_count})")
        self.ds = dataset
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.offset = process_index * self.local_batch
        self.samples_seen = int(samples_seen)

    def state(self) -> DataState:
        return DataState(self.samples_seen, self.ds.fingerprint)

    def restore(self, state: dict):
        if state.get("fingerprint") != self.ds.fingerprint:
            raise ValueError(f"checkpoint's data fingerprint {state.get('fingerprint')} does not match this run's "
                             f"data ({self.ds.fingerprint}): different token files, seq_len, seed or shuffle")
        self.samples_seen = int(state["samples_seen"])

    def __next__(self) -> dict:
        b = self.ds.batch(self.samples_seen + self.offset, self.local_batch)
        self.samples_seen += self.global_batch
        return b

    def __iter__(self):
        return self
