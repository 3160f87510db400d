"""Loads a `trainer export` Hugging Face directory with transformers and checks that it reproduces the
probabilities `trainer predict` wrote for the same rows, within 1e-4.

    python scripts/check_export_transformers.py RUN/export/hf data/arena-sample.parquet predictions.csv [ROWS]

The tokenizer comes from the export directory too, loaded as the recipe loads Gemma's, so this also checks that
the exported tokenizer files work in transformers. Needs torch, transformers, pandas, pyarrow.
"""
import os
import sys

import pandas as pd
import torch
from transformers import Gemma2ForSequenceClassification

sys.path.insert(0, os.path.dirname(__file__))
from recipe_preprocess import load, load_tokenizer, preprocess  # noqa: E402

TOLERANCE = 1e-4


def main():
    hf_dir, data, predictions = sys.argv[1:4]
    limit = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    # As the recipe loads google/gemma-2-2b's tokenizer: BOS and EOS added (transformers 5 takes these from the
    # call, not from tokenizer_config.json).
    tokenizer = load_tokenizer(hf_dir)
    probe = tokenizer("hi")["input_ids"]
    assert probe[0] == tokenizer.bos_token_id and probe[-1] == tokenizer.eos_token_id, probe
    model = Gemma2ForSequenceClassification.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    df = load(data)
    df = df[df["winner"].isin(["model_a", "model_b"])].head(limit)
    df = preprocess(df, tokenizer)
    ours = pd.read_csv(predictions, dtype={"id": str}).set_index("id")
    worst = 0.0
    for start in range(0, len(df), 8):
        chunk = df.iloc[start : start + 8]
        rows = list(chunk["input_ids"])
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), model.config.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        with torch.no_grad():
            probs = model(input_ids=ids, attention_mask=mask).logits.float().softmax(-1)
        for row_id, p in zip(chunk["id"].astype(str), probs):
            mine = ours.loc[row_id, ["prob_model_a", "prob_model_b"]].to_numpy(dtype=float)
            worst = max(worst, float((torch.tensor(mine) - p.double()).abs().max()))
    print(f"{len(df)} rows: largest |P(transformers) - P(trainer predict)| = {worst:.2e}")
    if worst > TOLERANCE:
        print(f"FAIL: above {TOLERANCE}")
        sys.exit(1)
    print("OK")


if __name__ == "__main__":
    main()
