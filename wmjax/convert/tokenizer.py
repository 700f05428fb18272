"""Tokenizer files of an exported checkpoint: what `transformers.AutoTokenizer.from_pretrained(dir)` loads offline.

    files = tokenizer_files("sp.model" | "tokenizer.json" | DIR, config)   # {file name: bytes}, written by save_*

A sentencepiece model gives `tokenizer.model` (the file itself), `tokenizer.json` (built here with `tokenizers` from
the model's own settings, so it encodes like `SentencePieceProcessor.encode`), `tokenizer_config.json` and
`special_tokens_map.json`; its post-processor puts BOS first, as training does (`[bos] + pieces + [eos]` per
document). The ids equal sentencepiece's for BPE models, except for a text holding a control token's string
(`"</s>"`: HF reads it as the special token) or made of exactly one multi-character user-defined piece (no dummy
prefix); for unigram models, also except where two segmentations score the same (the tie may be broken otherwise).
A HF tokenizer directory's files are copied as they are; a bare `tokenizer.json` is copied with a
`tokenizer_config.json` naming the config's special tokens. Special ids come from the model config (bos / eos / pad
token ids), falling back to the sentencepiece model's; a disagreement is a ConversionError naming both.
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

from sentencepiece import sentencepiece_model_pb2

from wmjax.config import DogeConfig
from wmjax.convert.layout import ConversionError
from wmjax.tokenizer import Tokenizer, find_tokenizer

__all__ = ["tokenizer_files", "sentencepiece_tokenizer_json", "HF_TOKENIZER_FILES"]

# Files of a HF tokenizer directory that an export copies (those present).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
_SPECIALS = ("bos", "eos", "pad", "unk")
# sentencepiece_model.proto: ModelPiece.Type and TrainerSpec.ModelType
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4
_UNIGRAM, _BPE = 1, 2


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ConversionError(f"{path}: cannot read the tokenizer file ({e.strerror})") from None


def _special_ids(tok: Tokenizer, config: DogeConfig, source: str) -> dict:
    """{"bos": id or None, ...}: the config's ids, else the tokenizer's; both set and different -> error."""
    out = {}
    for kind in _SPECIALS:
        mine = getattr(tok, f"{kind}_id")
        theirs = None if kind == "unk" else getattr(config, f"{kind}_token_id")
        if theirs is not None and mine is not None and theirs != mine:
            raise ConversionError(f"{source}: the tokenizer's {kind} id is {mine} but the model config's "
                                  f"{kind}_token_id is {theirs}; pass the tokenizer the model was trained with")
        out[kind] = theirs if theirs is not None else mine
        if out[kind] is not None and not 0 <= out[kind] < tok.vocab_size:
            raise ConversionError(f"{source}: {kind}_token_id={out[kind]} is not a token of this "
                                  f"{tok.vocab_size}-token tokenizer")
    return out


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True) + "\n").encode()


def _hf_configs(tokens: dict, config: DogeConfig, add_bos: bool) -> dict[str, bytes]:
    """tokenizer_config.json + special_tokens_map.json naming the special token strings."""
    named = {f"{k}_token": t for k, t in tokens.items() if t is not None}
    cfg = dict(named, tokenizer_class="PreTrainedTokenizerFast", add_bos_token=add_bos, add_eos_token=False,
               clean_up_tokenization_spaces=False, model_max_length=config.max_position_embeddings)
    return {"tokenizer_config.json": _json(cfg), "special_tokens_map.json": _json(named)}


def sentencepiece_tokenizer_json(model_file: str, bos_id: Optional[int]) -> str:
    """A `tokenizers` tokenizer.json (as a string) that encodes / decodes like the sentencepiece model: its
    normalizer settings (charsmap, extra-whitespace removal, dummy prefix, whitespace escaping), its BPE merges
    ranked by piece score (or its unigram scores), user-defined pieces matched whole, byte fallback; control and
    unknown pieces as special tokens; BOS (if `bos_id` is not None) added by the post-processor."""
    try:
        import tokenizers
        from tokenizers import AddedToken, Regex, decoders, models, normalizers, processors
    except ImportError:
        raise ConversionError(f"{model_file}: writing tokenizer.json needs the `tokenizers` package "
                              "(pip install tokenizers)") from None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(_read(model_file))
    except Exception as e:  # noqa: BLE001 - a protobuf DecodeError or similar
        raise ConversionError(f"{model_file}: not a sentencepiece model ({type(e).__name__}: {e})") from None
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    pieces = list(proto.pieces)
    if ts.treat_whitespace_as_suffix:
        raise ConversionError(f"{model_file}: treat_whitespace_as_suffix=true has no tokenizer.json equivalent here")
    if ts.model_type == _BPE:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        normal = {p.piece: (-p.score, i) for i, p in enumerate(pieces) if p.type == _NORMAL}
        ranked = sorted((rank, (w[:k], w[k:])) for w, rank in normal.items() for k in range(1, len(w))
                        if w[:k] in normal and w[k:] in normal)
        model = models.BPE(vocab=vocab, merges=[pair for _, pair in ranked], unk_token=ts.unk_piece,
                           fuse_unk=True, byte_fallback=ts.byte_fallback)
    elif ts.model_type == _UNIGRAM:
        model = models.Unigram([(p.piece, p.score) for p in pieces], ts.unk_id, ts.byte_fallback)
    else:
        raise ConversionError(f"{model_file}: sentencepiece model_type {ts.model_type} (word / char) is not "
                              "supported; train a bpe or unigram model")
    tk = tokenizers.Tokenizer(model)
    norm = []
    if ns.precompiled_charsmap:
        # sentencepiece does not apply its charsmap to user-defined pieces: shield them behind private-use characters
        charsmap = normalizers.Precompiled(ns.precompiled_charsmap)
        defined = sorted((p.piece for p in pieces if p.type == _USER_DEFINED), key=len, reverse=True)
        shield = [(u, chr(0xF0000 + k)) for k, u in enumerate(u for u in defined if charsmap.normalize_str(u) != u)]
        norm += [normalizers.Replace(u, c) for u, c in shield] + [charsmap]
        norm += [normalizers.Replace(c, u) for u, c in shield]
    if ns.remove_extra_whitespaces:
        norm += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.escape_whitespaces:
        norm.append(normalizers.Replace(" ", "\u2581"))
    # User-defined pieces are matched whole on the normalized text. A one-character piece needs nothing (it is in the
    # vocab and in no merge); a longer one is an added token. A piece that normalization changes can never match
    # (sentencepiece compares it with the normalized text), like "    " with escaped whitespace: it is left out.
    tk.normalizer = normalizers.Sequence(norm)
    user = [p.piece for p in pieces if p.type == _USER_DEFINED and len(p.piece) > 1
            and tk.normalizer.normalize_str(p.piece) == p.piece]
    if ns.add_dummy_prefix:
        # the dummy prefix goes before any non-empty text, but not onto an added token's own text (tokenizers
        # normalizes that too); so a text that is exactly one added token gets no prefix (sentencepiece: one more)
        spare = "|".join(re.escape(u) for u in sorted(user, key=len, reverse=True))
        prefix = normalizers.Replace(Regex(rf"\A(?!(?:{spare})\z)" if user else r"\A"), "\u2581" if
                                     ns.escape_whitespaces else " ")
        tk.normalizer = normalizers.Sequence(norm + [prefix])
    # No pre-tokenizer: sentencepiece segments the whole normalized text at once (no piece crosses a word start).
    # Control / unknown pieces are special tokens (a text holding their string, e.g. "</s>", gets the special id).
    tk.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                           for p in pieces if p.type in (_CONTROL, _UNKNOWN)])
    tk.add_tokens([AddedToken(u, special=False, normalized=True) for u in user])
    dec = [decoders.Replace("\u2581", " ")] if ns.escape_whitespaces else []
    if ts.byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())
    if ns.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tk.decoder = decoders.Sequence(dec)
    if bos_id is not None:
        bos = pieces[bos_id].piece
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, bos_id)])
    return tk.to_str(pretty=True)


def tokenizer_files(tokenizer: str, config: DogeConfig) -> dict[str, bytes]:
    """{file name: bytes} of the tokenizer files an export of `config` writes for `tokenizer` (a sentencepiece
    .model, a tokenizer.json, or a directory holding either); errors name the file."""
    path = os.fspath(tokenizer)
    if os.path.isdir(path):
        found = find_tokenizer(path)
        if found is None:
            raise ConversionError(f"{path}: no tokenizer.json or tokenizer.model in this tokenizer directory")
        if found.endswith(".json"):  # a HF tokenizer directory: copy its files
            return {n: _read(os.path.join(path, n)) for n in HF_TOKENIZER_FILES
                    if os.path.isfile(os.path.join(path, n))}
        path = found
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such tokenizer file (a sentencepiece .model, a tokenizer.json or a "
                              "directory holding one)")
    try:
        tok = Tokenizer(path)
    except (ValueError, ImportError) as e:
        raise ConversionError(str(e)) from None
    if tok.vocab_size > config.vocab_size:
        raise ConversionError(f"{path}: the tokenizer has {tok.vocab_size} tokens, more than the model's "
                              f"vocab_size={config.vocab_size}")
    ids = _special_ids(tok, config, path)
    tokens = {k: (tok.id_to_token(i) if i is not None else None) for k, i in ids.items()}
    if tok.kind == "hf":
        return {"tokenizer.json": _read(path), **_hf_configs(tokens, config, add_bos=False)}
    return {"tokenizer.model": _read(path),
            "tokenizer.json": sentencepiece_tokenizer_json(path, ids["bos"]).encode(),
            **_hf_configs(tokens, config, add_bos=ids["bos"] is not None)}
