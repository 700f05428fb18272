"""``python -m train.prepare``: tokenize text / JSONL into token files for ``data.source: tokens``.

    python -m train.prepare --input 'corpus/*.jsonl' --format jsonl --output data/train \\
        [--tokenizer path/to/sp.model | --vocab-size 32768] [--text-field text]

writes ``data/train.bin`` (flat uint16/uint32 token ids, documents as ``BOS ... EOS``) and ``data/train.json``
(dtype, counts, tokenizer path, bos/eos ids).  Without ``--tokenizer`` a SentencePiece model is trained on the
input (first ``--tokenizer-bytes`` bytes) and cached under ``--tokenizer-dir``.  Then train with::

    python -m train --config configs/doge-160m.yaml --set data.source=tokens --set data.paths=[data/train.bin]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from tqdm.auto import tqdm

from wmjax.tokenizer import Tokenizer

from .config import TokenizerConfig
from .data import expand_paths, iter_texts, write_token_file
from .tokenizer import encode_documents, get_tokenizer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", "-i", action="append", required=True, help="file, directory or glob (repeatable)")
    ap.add_argument("--format", choices=["text", "jsonl"], default=None,
                    help="text: one document per file; jsonl: one JSON object per line (default: by extension)")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--output", "-o", required=True, help="output path prefix (writes PREFIX.bin + PREFIX.json)")
    ap.add_argument("--tokenizer", help="existing sentencepiece .model")
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--tokenizer-dir", default=".cache/wmjax/tokenizers")
    ap.add_argument("--tokenizer-bytes", type=int, default=50_000_000)
    ap.add_argument("--max-documents", type=int, default=0)
    args = ap.parse_args(argv)


    try:
        files = expand_paths(args.input, key="--input")
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fmt = args.format or ("jsonl" if all(f.endswith((".jsonl", ".json")) for f in files) else "text")
    if args.tokenizer:
        if not os.path.isfile(args.tokenizer):
            print(f"error: --tokenizer: no such sentencepiece model: {args.tokenizer}", file=sys.stderr)
            return 2
        tok = Tokenizer(args.tokenizer)
    else:
        def loader(f):
            return "\n".join(iter_texts(fmt, [f], args.text_field))

        corpus = f"--input {' '.join(args.input)} ({len(files)} file(s))"
        try:
            tok = get_tokenizer(TokenizerConfig(vocab_size=args.vocab_size, corpus="data",
                                                max_corpus_bytes=args.tokenizer_bytes, cache_dir=args.tokenizer_dir),
                                files, loader, corpus_name=corpus, vocab_key="--vocab-size")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    t0 = time.time()
    bar = tqdm(desc="tokenizing", unit="doc", dynamic_ncols=True)
    try:
        info = write_token_file(
            args.output, encode_documents(tok, iter_texts(fmt, files, args.text_field, args.max_documents)),
            tok.vocab_size, meta={"tokenizer": os.path.abspath(tok.path), "bos_id": tok.bos_id,
                                  "eos_id": tok.eos_id, "source": fmt, "inputs": files[:100]},
            progress=bar)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    out = args.output if args.output.endswith(".bin") else args.output + ".bin"
    print(f"wrote {out}: {info['num_documents']:,} documents, {info['num_tokens']:,} tokens ({info['dtype']}) in "
          f"{time.time() - t0:.1f}s; tokenizer {tok.path} ({tok.vocab_size} pieces)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
