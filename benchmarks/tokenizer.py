"""Tokenizer throughput: inflightd's pure-Python BPE vs Hugging Face `tokenizers`, same run.

Generates a few hundred KB of English prose and of code (seeded, no downloads), encodes the
documents one at a time with

* ours, cold cache (cache cleared before the pass) and warm cache (second pass);
* the reference: transformers' GGUF tokenizer (`backend_tokenizer.encode`, one document
  per call, Rust threads pinned to one), best of its passes;

checks that both produce the same ids, and prints MB/s, tokens/s and the ratio.

    python benchmarks/tokenizer.py [--gguf PATH] [--kb 300] [--as-converted]

By default the reference's pre-tokenizer is set to the one SmolLM2's own tokenizer.json uses
(Digits(individual) + ByteLevel), which is what llama.cpp's "smollm" pre-tokenizer does;
transformers' GGUF conversion drops the digit split (--as-converted keeps it, ids then differ).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_GGUF = (Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share")
                / "inflightd/models/SmolLM2-135M-Instruct.Q4_1.gguf")

_COMMON = ["the", "of", "and", "to", "a", "in", "is", "that", "it", "was", "for", "on", "are", "as",
           "with", "his", "they", "at", "be", "this", "from", "have", "or", "by", "one", "had",
           "not", "but", "what", "all", "were", "when", "we", "there", "can", "an", "your", "which",
           "their", "said", "if", "do", "will", "each", "about", "how", "up", "out", "them", "then",
           "she", "many", "some", "so", "these", "would", "other", "into", "has", "more", "her",
           "two", "like", "him", "see", "time", "could", "no", "make", "than", "first", "been",
           "its", "who", "now", "people", "my", "made", "over", "did", "down", "only", "way",
           "find", "use", "may", "water", "long", "little", "very", "after", "words", "called",
           "just", "where", "most", "know", "get", "through", "back", "much", "before", "go",
           "good", "new", "write", "our", "used", "me", "man", "too", "any", "day", "same", "right",
           "look", "think", "also", "around", "another", "came", "come", "work", "three", "word",
           "must", "because", "does", "part", "even", "place", "well", "such", "here", "take",
           "why", "things", "help", "put", "years", "different", "away", "again", "off", "went",
           "old", "number"]
_RARER = ["government", "experiment", "hypothesis", "remarkable", "unfortunately", "mountain",
          "particularly", "committee", "architecture", "photosynthesis", "administration",
          "ambiguous", "neighbourhood", "relationship", "sustainable", "infrastructure",
          "contemporary", "philosophical", "questionnaire", "Mediterranean", "Renaissance",
          "quantum", "electricity", "cathedral", "bureaucracy", "opportunity", "entrepreneur",
          "vocabulary", "algorithm", "telescope", "engineering", "manuscript", "legislation",
          "temperature", "phenomenon", "biodiversity", "negotiation"]
_NAMES = ["Alice", "Bob", "London", "Paris", "Einstein", "Darwin", "Tokyo", "Amazon", "Shakespeare",
          "Napoleon", "Mars", "Europe"]


def _word(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.75:
        # Zipf-like: early words of the list are much more frequent
        return _COMMON[min(int(rng.paretovariate(1.1)) - 1, len(_COMMON) - 1)]
    if r < 0.93:
        return rng.choice(_RARER)
    if r < 0.97:
        return rng.choice(_NAMES)
    return str(rng.choice([rng.randint(1, 100), rng.randint(1900, 2024), round(rng.random() * 100, 2)]))


def prose(rng: random.Random, size: int) -> str:
    paragraphs, total = [], 0
    while total < size:
        sentences = []
        for _ in range(rng.randint(2, 7)):
            words = [_word(rng) for _ in range(rng.randint(5, 24))]
            words[0] = words[0].capitalize()
            for i in range(1, len(words) - 1):
                if rng.random() < 0.08:
                    words[i] += ","
            if rng.random() < 0.1:
                words.insert(rng.randint(1, len(words)), rng.choice(["don't", "it's", "we'll", "they're"]))
            if rng.random() < 0.05:
                words.insert(rng.randint(1, len(words)), f'"{rng.choice(_RARER)}"')
            sentences.append(" ".join(words) + rng.choice([".", ".", ".", "?", "!", ";"]))
        paragraphs.append(" ".join(sentences))
        total += len(paragraphs[-1]) + 2
    return "\n\n".join(paragraphs)


_IDENTS = ["value", "result", "items", "index", "count", "total", "buffer", "config", "request",
           "response", "node", "parent", "child", "key", "data", "path", "name", "size", "offset",
           "length", "token", "cache", "queue", "worker", "state"]


def _ident(rng: random.Random) -> str:
    a = rng.choice(_IDENTS)
    return a if rng.random() < 0.5 else f"{a}_{rng.choice(_IDENTS)}"


def code(rng: random.Random, size: int) -> str:
    out, total = [], 0
    while total < size:
        name, args = _ident(rng), ", ".join(_ident(rng) for _ in range(rng.randint(0, 3)))
        lines = [f"def {name}({args}):", f'    """Return the {rng.choice(_RARER)} of {_ident(rng)}."""']
        depth = 1
        for _ in range(rng.randint(3, 14)):
            pad = "    " * depth
            k = rng.randrange(7)
            if k == 0 and depth < 4:
                lines.append(f"{pad}for {_ident(rng)} in range({rng.randint(1, 512)}):")
                depth += 1
            elif k == 1 and depth < 4:
                lines.append(f"{pad}if {_ident(rng)} >= {rng.randint(0, 99)} and not {_ident(rng)}:")
                depth += 1
            elif k == 2:
                lines.append(f"{pad}{_ident(rng)}[{_ident(rng)}] = {_ident(rng)}.get('{_ident(rng)}', None)")
            elif k == 3:
                lines.append(f"{pad}# {' '.join(_word(rng) for _ in range(rng.randint(3, 9)))}")
            elif k == 4:
                lines.append(f'{pad}raise ValueError(f"bad {{{_ident(rng)}!r}}: {rng.randint(0, 9999)}")')
            elif k == 5 and depth > 1:
                depth -= 1
                lines.append(f"{'    ' * depth}{_ident(rng)} += {rng.randint(1, 16)} * len({_ident(rng)})")
            else:
                a, b, c, d = (_ident(rng) for _ in range(4))
                lines.append(f"{pad}{a} = [{b} for {b} in {c} if {d}]")
        lines.append(f"    return {_ident(rng)}\n\n")
        out.append("\n".join(lines))
        total += len(out[-1]) + 1
    return "\n".join(out)


def documents(kind: str, total_kb: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    make = prose if kind == "prose" else code
    docs, total = [], 0
    while total < total_kb * 1024:
        docs.append(make(rng, rng.randint(1500, 6000)))
        total += len(docs[-1].encode())
    return docs


def time_pass(encode, docs: list[str]) -> tuple[float, int]:
    start = time.perf_counter()
    n = 0
    for doc in docs:
        n += len(encode(doc))
    return time.perf_counter() - start, n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    parser.add_argument("--kb", type=int, default=300, help="KB of text per kind (default 300)")
    parser.add_argument("--repeat", type=int, default=3, help="warm passes, best kept (default 3)")
    parser.add_argument("--as-converted", action="store_true",
                        help="keep transformers' GGUF pre-tokenizer (no digit split)")
    args = parser.parse_args()
    if not args.gguf.is_file():
        print(f"model not found: {args.gguf} (run `inflightd pull`)", file=sys.stderr)
        return 2

    from inflightd.tokenizer.tokenizer import Tokenizer, _unicode

    t0 = time.perf_counter()
    _unicode()
    t1 = time.perf_counter()
    ours = Tokenizer.from_gguf(args.gguf)
    t2 = time.perf_counter()
    print(f"ours: Unicode tables {t1 - t0:.2f} s, load from GGUF {t2 - t1:.2f} s (mostly gguf.GGUFReader)")

    import transformers
    from tokenizers import pre_tokenizers

    transformers.logging.set_verbosity_error()
    t0 = time.perf_counter()
    hf = transformers.AutoTokenizer.from_pretrained(str(args.gguf.parent), gguf_file=args.gguf.name)
    backend = hf.backend_tokenizer
    if not args.as_converted:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    print(f"reference: transformers {transformers.__version__} GGUF tokenizer, "
          f"loaded in {time.perf_counter() - t0:.1f} s")

    def hf_encode(doc: str) -> list[int]:
        return backend.encode(doc, add_special_tokens=False).ids

    rows = []
    for kind in ("prose", "code"):
        docs = documents(kind, args.kb)
        nbytes = sum(len(d.encode()) for d in docs)
        same = all(ours.encode(d) == hf_encode(d) for d in docs)
        ours.clear_cache()
        cold, ntok = time_pass(ours.encode, docs)
        warm = min(time_pass(ours.encode, docs)[0] for _ in range(args.repeat))
        ref = min(time_pass(hf_encode, docs)[0] for _ in range(args.repeat + 1))
        rows.append((kind, len(docs), nbytes, ntok, cold, warm, ref, same))

    print()
    header = (f"{'text':<6} {'docs':>5} {'KB':>6} {'tokens':>8} | {'ours cold MB/s':>14} {'ours warm MB/s':>14} "
              f"{'HF MB/s':>8} | {'ours warm tok/s':>15} {'HF tok/s':>10} | {'warm/HF':>7} {'cold/HF':>7} | ids")
    print(header)
    print("-" * len(header))
    for kind, ndocs, nbytes, ntok, cold, warm, ref, same in rows:
        mb = nbytes / 1e6
        print(f"{kind:<6} {ndocs:>5} {nbytes / 1024:>6.0f} {ntok:>8} | {mb / cold:>14.2f} {mb / warm:>14.2f} "
              f"{mb / ref:>8.2f} | {ntok / warm:>15,.0f} {ntok / ref:>10,.0f} | {ref / warm:>7.2f} "
              f"{ref / cold:>7.2f} | {'same' if same else 'DIFFER'}")
    print(f"\n(mean document {statistics.mean(r[2] / r[1] for r in rows) / 1024:.1f} KB; "
          "ratio = our throughput / HF throughput, goal >= 0.2 warm)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
