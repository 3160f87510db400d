"""The reference recipe's preprocessing, in Python, as the PyTorch/PEFT notebook does it.

Used as the ground truth for tests (scripts/make_preprocess_fixture.py) and as the "Python" side of the
preprocessing benchmark (bench/prepare_vs_python.sh). Needs: transformers, tokenizers, pandas, pyarrow.
"""
import json
import os
import sys
import time

import pandas as pd
from transformers import AutoTokenizer

PROMPT_TOKENS = 150
RESPONSE_TOKENS = 350
MAX_LENGTH = 512
SNIP = "\n(snip)\n"


def load_tokenizer(directory):
    # A fast Gemma tokenizer that adds BOS and EOS; with truncation it keeps EOS (BOS + 510 + EOS).
    return AutoTokenizer.from_pretrained(directory, add_bos_token=True, add_eos_token=True)


def smart_truncate(text, tokenizer, max_tokens):
    """First half and last half minus one token of an over-budget text, decoded and joined by SNIP."""
    if text is None or (isinstance(text, float) and pd.isna(text)):
        return ""
    tokens = tokenizer.encode(text, add_special_tokens=False)
    if len(tokens) <= max_tokens:
        return text
    half = max_tokens // 2
    return tokenizer.decode(tokens[:half]) + SNIP + tokenizer.decode(tokens[-half + 1:])


def input_text(prompt, response_a, response_b):
    return "<prompt>: " + prompt + "\n\n<response_a>: " + response_a + "\n\n<response_b>: " + response_b


def lmsys_to_wsdm(df):
    """LMSYS rows (JSON lists of turns, one-hot winner) in the WSDM schema; turns joined by a blank line."""
    def join(raw):
        return "\n\n".join(t if t is not None else "" for t in json.loads(raw))
    out = pd.DataFrame({"id": df["id"].astype(str)})
    for col in ["prompt", "response_a", "response_b"]:
        out[col] = df[col].map(join)
    out["winner"] = [
        "model_a" if a else ("model_b" if b else "tie")
        for a, b in zip(df["winner_model_a"], df["winner_model_b"])
    ]
    return out


def load(path):
    if path.endswith(".csv"):
        df = pd.read_csv(path)
        return lmsys_to_wsdm(df) if "winner_model_a" in df.columns else df
    return pd.read_parquet(path)


def preprocess(df, tokenizer):
    """The notebook's steps: pandas apply of smart truncation on three fields, the template, batch tokenization."""
    df = df.copy()
    df["prompt"] = df["prompt"].apply(lambda x: smart_truncate(x, tokenizer, PROMPT_TOKENS))
    df["response_a"] = df["response_a"].apply(lambda x: smart_truncate(x, tokenizer, RESPONSE_TOKENS))
    df["response_b"] = df["response_b"].apply(lambda x: smart_truncate(x, tokenizer, RESPONSE_TOKENS))
    df["text"] = [input_text(p, a, b) for p, a, b in zip(df["prompt"], df["response_a"], df["response_b"])]
    enc = tokenizer(list(df["text"]), truncation=True, max_length=MAX_LENGTH)
    df["input_ids"] = enc["input_ids"]
    df["label"] = df["winner"].map({"model_a": 0, "model_b": 1})
    return df


def main():
    # python recipe_preprocess.py TOKENIZER_DIR DATA_FILE: time the recipe's preprocessing of one file.
    tokenizer_dir, data = sys.argv[1], sys.argv[2]
    tokenizer = load_tokenizer(tokenizer_dir)
    start = time.perf_counter()
    df = load(data)
    df = df[df["winner"].isin(["model_a", "model_b"])]
    out = preprocess(df, tokenizer)
    seconds = time.perf_counter() - start
    tokens = sum(len(x) for x in out["input_ids"])
    print(json.dumps({"rows": len(out), "tokens": tokens, "seconds": seconds,
                      "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "default")}))


if __name__ == "__main__":
    main()
