"""Writes tests/fixtures/recipe_preprocess.json: what the Python recipe makes of the bundled sample rows.

Run from the repository root after scripts/setup.sh, in a throwaway venv:
    python -m venv /tmp/venv && /tmp/venv/bin/pip install transformers tokenizers pandas pyarrow
    /tmp/venv/bin/python scripts/make_preprocess_fixture.py

The Rust tests compare against it:
- every row of both sample files: a hash of the final input ids and of the templated text;
- a few dozen rows in full (their input ids);
- smart truncation of seeded random multilingual strings at small budgets, so cuts land inside characters that
  are split into byte tokens, next to literal `▁`, inside emoji and so on.
"""
import hashlib
import json
import random
import sys

import pandas as pd
import tokenizers
import transformers

sys.path.insert(0, "scripts")
from recipe_preprocess import (MAX_LENGTH, PROMPT_TOKENS, RESPONSE_TOKENS, input_text, load, load_tokenizer,
                               smart_truncate)

TOKENIZER_DIR = ".cache/tokenizer-gemma"
OUT = "tests/fixtures/recipe_preprocess.json"


def h(s):
    return hashlib.sha256(s.encode("utf-8")).hexdigest()[:16]


def ids_hash(ids):
    return h(",".join(map(str, ids)))


def rows_of(path, tokenizer):
    df = load(path)
    out = []
    for r in df.itertuples():
        p = smart_truncate(r.prompt, tokenizer, PROMPT_TOKENS)
        a = smart_truncate(r.response_a, tokenizer, RESPONSE_TOKENS)
        b = smart_truncate(r.response_b, tokenizer, RESPONSE_TOKENS)
        text = input_text(p, a, b)
        ids = tokenizer(text, truncation=True, max_length=MAX_LENGTH)["input_ids"]
        out.append({"id": str(r.id), "winner": r.winner, "text_sha": h(text), "ids_sha": ids_hash(ids),
                    "n_ids": len(ids), "ids": ids})
    return out


PIECES = [
    "Hello", " world", ", ", ".", "\n", "\n\n", "\t", "  ", "   ", "▁", "▁▁x", "<bos>", "<eos>", "<pad", "bos>",
    "日本語のテキスト", "中文", "한국어", "Привет, мир", "مرحبا بالعالم", "שלום", "हिन्दी", "ไทย",
    "😊", "👍🏽", "🇫🇷", "👨‍👩‍👧", "🫠", "𠀋", "𝔘𝔫𝔦", "é", "ñ", "Z̤͔ͧ", "\u200b", "ｶﾀｶﾅ", "©", "\x01", "\r\n",
    "def f(x):\n    return x", "```python", "**bold**", "1234567890", "(snip)",
]


def random_text(rng):
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 40)))


def main():
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    rng = random.Random(1234)
    fixture = {
        "generator": "scripts/make_preprocess_fixture.py",
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "tokenizer_sha256": hashlib.sha256(open(f"{TOKENIZER_DIR}/tokenizer.json", "rb").read()).hexdigest(),
        "config": {"prompt_tokens": PROMPT_TOKENS, "response_tokens": RESPONSE_TOKENS, "max_length": MAX_LENGTH},
        "files": {},
        "truncation": [],
        "encode": [],
    }
    for path, full in [("data/arena-sample.parquet", 24), ("data/lmsys-sample.csv", 16)]:
        rows = rows_of(path, tokenizer)
        # Full ids for the first rows and for the longest ones (which are cut at max_length).
        longest = sorted(range(len(rows)), key=lambda i: -rows[i]["n_ids"])[: full // 2]
        keep = set(range(full - full // 2)) | set(longest)
        for i, r in enumerate(rows):
            if i not in keep:
                del r["ids"]
        fixture["files"][path] = rows
    for _ in range(300):
        text = random_text(rng)
        budget = rng.randint(4, 24)
        fixture["truncation"].append({"text": text, "budget": budget,
                                      "out": smart_truncate(text, tokenizer, budget)})
    for _ in range(100):
        text = random_text(rng)
        fixture["encode"].append({"text": text, "ids": tokenizer.encode(text, add_special_tokens=False)})
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
