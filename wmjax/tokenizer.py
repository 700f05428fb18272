"""The project's tokenizer: a sentencepiece `.model`, a Hugging Face `tokenizer.json`, or a directory holding either.

    tok = Tokenizer("sp.model")             # or "tokenizer.json", or a dir (its tokenizer.json, else .model)
    ids = tok.encode("text", add_bos=True)  # [bos_id] + pieces; add_bos=False (default): pieces only
    text = tok.decode(ids)                  # special tokens (bos / eos / pad) are dropped

`encode` never adds special tokens by itself (a `tokenizer.json` post-processor is bypassed), so both kinds give
the same ids for the same model; BOS is added only when asked and known. Special ids: a sentencepiece model's own
(`bos_id()`, ...; -1 -> None); for a `tokenizer.json`, the token strings of `tokenizer_config.json` /
`special_tokens_map.json` next to it (else the common `<s>`, `</s>`, `<pad>`, `<unk>`); constructor arguments
override either (e.g. the model config's ids). Reading a `tokenizer.json` needs the `tokenizers` package.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import sentencepiece as spm

__all__ = ["Tokenizer", "find_tokenizer", "TOKENIZER_FILES"]

# File names a model directory may hold its tokenizer in, in the order find_tokenizer prefers them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_SPECIAL_FILES = ("tokenizer_config.json", "special_tokens_map.json")
_COMMON = {"bos": ("<s>", "<|begin_of_text|>", "<bos>"), "eos": ("</s>", "<|endoftext|>", "<eos>"),
           "pad": ("<pad>", "<|pad|>"), "unk": ("<unk>",)}


def find_tokenizer(directory: Optional[str]) -> Optional[str]:
    """Path of `directory`'s tokenizer.json or tokenizer.model (that order), or None."""
    if not directory or not os.path.isdir(directory):
        return None
    for name in TOKENIZER_FILES:
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    return None


def _special_strings(directory: str) -> dict:
    """{"bos": token string, ...} from a HF tokenizer dir's tokenizer_config.json / special_tokens_map.json."""
    out: dict = {}
    for name in _SPECIAL_FILES:
        try:
            with open(os.path.join(directory, name)) as f:
                d = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(d, dict):
            continue
        for kind in ("bos", "eos", "pad", "unk"):
            v = d.get(f"{kind}_token")
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str) and kind not in out:
                out[kind] = v
    return out


class Tokenizer:
    """encode(text, add_bos=False) -> ids, decode(ids) -> text; bos_id / eos_id / pad_id / unk_id (int or None),
    vocab_size, path (the file read), kind ("sentencepiece" | "hf"), id_to_token(i)."""

    def __init__(self, path: str, *, bos_id: Optional[int] = None, eos_id: Optional[int] = None,
                 pad_id: Optional[int] = None):
        path = os.fspath(path)
        if os.path.isdir(path):
            found = find_tokenizer(path)
            if found is None:
                raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
            path = found
        elif not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such tokenizer file (a sentencepiece .model or a tokenizer.json)")
        self.path = path
        if path.endswith(".json"):
            try:
                import tokenizers
            except ImportError:
                raise ImportError(f"{path}: reading a tokenizer.json needs the `tokenizers` package") from None
            try:
                self._tk = tokenizers.Tokenizer.from_file(path)
            except Exception as e:  # noqa: BLE001 - any failure means the file is unusable
                raise ValueError(f"{path}: not a readable tokenizer.json ({type(e).__name__}: {e})") from None
            self.kind = "hf"
            self.vocab_size = int(self._tk.get_vocab_size(with_added_tokens=True))
            names = _special_strings(os.path.dirname(path))
            ids = {}
            for kind, common in _COMMON.items():
                cands = (names[kind],) if kind in names else common
                ids[kind] = next((i for i in map(self._tk.token_to_id, cands) if i is not None), None)
        else:
            try:
                self._sp = spm.SentencePieceProcessor(model_file=path)
            except (OSError, RuntimeError) as e:
                raise ValueError(f"{path}: not a readable sentencepiece model ({e})") from None
            self.kind = "sentencepiece"
            self.vocab_size = int(self._sp.get_piece_size())
            ids = {k: int(f()) for k, f in (("bos", self._sp.bos_id), ("eos", self._sp.eos_id),
                                              ("pad", self._sp.pad_id), ("unk", self._sp.unk_id))}
            ids = {k: (v if v >= 0 else None) for k, v in ids.items()}
        self.bos_id = ids["bos"] if bos_id is None else int(bos_id)
        self.eos_id = ids["eos"] if eos_id is None else int(eos_id)
        self.pad_id = ids["pad"] if pad_id is None else int(pad_id)
        self.unk_id = ids["unk"]

    def __repr__(self):
        return (f"Tokenizer({self.path!r}, kind={self.kind!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")

    def _with_bos(self, ids: list, add_bos: bool) -> list:
        return [self.bos_id] + ids if add_bos and self.bos_id is not None else ids

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text` (no special tokens), with `bos_id` first when add_bos and the tokenizer has one."""
        if self.kind == "hf":
            ids = list(self._tk.encode(text, add_special_tokens=False).ids)
        else:
            ids = list(self._sp.encode(text))
        return self._with_bos(ids, add_bos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        if self.kind == "hf":
            rows = [list(e.ids) for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]
        else:
            rows = [list(r) for r in self._sp.encode(list(texts))]
        return [self._with_bos(r, add_bos) for r in rows]

    def id_to_token(self, i: int) -> str:
        """The token string (sentencepiece piece / HF token) of id `i`."""
        return self._tk.id_to_token(int(i)) if self.kind == "hf" else self._sp.id_to_piece(int(i))

    def decode(self, ids) -> str:
        """Text of `ids` (ints or an int array), special tokens dropped."""
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            return self._tk.decode(ids, skip_special_tokens=True)
        return self._sp.decode(ids)
