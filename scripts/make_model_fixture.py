"""Writes the Gemma-2 classifier fixtures that the Rust model must reproduce (transformers, eager attention, f32).

Run from the repository root after scripts/setup.sh, in a throwaway venv:
    python -m venv /tmp/venv && /tmp/venv/bin/pip install torch transformers safetensors tokenizers pandas pyarrow
    /tmp/venv/bin/python scripts/make_model_fixture.py

tests/fixtures/gemma2-tiny/: a random Gemma2ForSequenceClassification saved by transformers with the real Gemma
tokenizer's vocabulary (256,000; tests add the tokenizer.json from .cache), and expected.json with its logits for real sample rows, preprocessed by the recipe.
Its config makes every Gemma-2 detail matter: a sliding window shorter than the rows, attention soft-capping that
bites, norm weights far from zero, query_pre_attn_scalar != head_dim, fewer KV heads than query heads. Embedding
rows of tokens the rows never use are zero, so the file stays small in git.

With --f16 it only adds to tests/fixtures/gemma2-tiny/expected.json the logits transformers computes in f16
(`logits_f16`), from the weights already there; a full run writes them too.

With --large it writes a bigger model (hidden 256, 6 layers) the same way to .cache/fixtures/gemma2-large, for the
ignored test `large_model_matches_transformers` (cargo test -- --ignored).

tests/fixtures/gemma2-dtypes/: a smaller model (vocabulary 512) saved in f32, bf16, f16 and sharded, and the
logits transformers computes (in f32) from each, on random ids with right padding.
"""
import copy
import json
import os
import shutil
import sys

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma2ForSequenceClassification

sys.path.insert(0, "scripts")
from recipe_preprocess import input_text, load, load_tokenizer, smart_truncate, PROMPT_TOKENS, RESPONSE_TOKENS, MAX_LENGTH

TOKENIZER_DIR = ".cache/tokenizer-gemma"
TINY = "tests/fixtures/gemma2-tiny"
DTYPES = "tests/fixtures/gemma2-dtypes"


SIZES = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=16),
    # --large: not committed (about 1 GB); written under .cache/ for the ignored test.
    "large": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=32, query_pre_attn_scalar=48, sliding_window=64),
}
LARGE = ".cache/fixtures/gemma2-large"


def config(vocab_size, size="tiny"):
    return Gemma2Config(
        vocab_size=vocab_size,
        **SIZES[size],
        attn_logit_softcapping=5.0,
        final_logit_softcapping=30.0,
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        num_labels=2,
        id2label={0: "model_a", 1: "model_b"},
        label2id={"model_a": 0, "model_b": 1},
        attn_implementation="eager",
        hidden_activation="gelu_pytorch_tanh",
    )


def randomize(model, used_ids=None, seed=0):
    """Weights large enough that soft-capping and every norm matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.8 + 0.3)
            elif "embed_tokens" in name:
                p.zero_()
                rows = torch.arange(p.shape[0]) if used_ids is None else torch.tensor(sorted(used_ids))
                p[rows] = torch.randn((len(rows), p.shape[1]), generator=g)
            elif any(k in name for k in ("q_proj", "k_proj")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.6)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.25)


def right_pad(rows, pad_id):
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def logits_of(model, rows, pad_id):
    ids, mask = right_pad(rows, pad_id)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def f16_logits(model, rows, pad_id):
    """The logits transformers computes with the model cast to f16 (on the CPU, eager attention): the reference
    for our f16 forward pass, whose every rounding should be the one PyTorch makes."""
    half = copy.deepcopy(model).to(torch.float16)
    return logits_of(half, rows, pad_id)


def add_f16_logits(out=TINY):
    """--f16: adds `logits_f16` to an existing fixture's expected.json, leaving its weights and other values as
    they are."""
    model = Gemma2ForSequenceClassification.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    path = f"{out}/expected.json"
    with open(path) as f:
        expected = json.load(f)
    got = f16_logits(model, [r["input_ids"] for r in expected["rows"]], 0)
    for row, l in zip(expected["rows"], got):
        row["logits_f16"] = l.tolist()
    with open(path, "w") as f:
        json.dump(expected, f)
    print(f"added f16 logits to {path} (torch {torch.__version__})")


def make_tiny(size="tiny", out=TINY):
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    df = load("data/arena-sample.parquet")
    # Rows of different lengths, some cut at 512, so padding, pooling and the window all matter.
    picked = [0, 1, 2, 3, 5, 8]
    rows, ids_rows = [], []
    for i in picked:
        r = df.iloc[i]
        text = input_text(smart_truncate(r.prompt, tokenizer, PROMPT_TOKENS),
                          smart_truncate(r.response_a, tokenizer, RESPONSE_TOKENS),
                          smart_truncate(r.response_b, tokenizer, RESPONSE_TOKENS))
        ids = tokenizer(text, truncation=True, max_length=MAX_LENGTH)["input_ids"]
        rows.append({"id": str(r.id), "input_ids": ids})
        ids_rows.append(ids)
    used = {t for r in ids_rows for t in r} | {0, 1, 2}
    torch.manual_seed(0)
    model = Gemma2ForSequenceClassification(config(256000, size)).eval()
    randomize(model, used)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, safe_serialization=True)
    # The tokenizer (17 MB) is not committed twice: tests add .cache/tokenizer-gemma/tokenizer.json to a copy.
    logits = logits_of(model, ids_rows, 0)
    # Each row alone too: padding must not change a row's logits.
    alone = [logits_of(model, [r], 0)[0] for r in ids_rows]
    f16 = f16_logits(model, ids_rows, 0)
    for row, l, a, h in zip(rows, logits, alone, f16):
        row["logits"] = l.tolist()
        row["logits_alone"] = a.tolist()
        row["logits_f16"] = h.tolist()
        row["probs"] = torch.softmax(l, -1).tolist()
    # Ablations: what the logits would be without a detail, to prove each one matters for these rows.
    ablations = {}
    cfg = model.config
    for name, change in [("no_softcap", ("attn_logit_softcapping", None)),
                         ("no_sliding_window", ("sliding_window", 4096)),
                         ("head_dim_scale", ("query_pre_attn_scalar", 16))]:
        old = getattr(cfg, change[0])
        setattr(cfg, change[0], change[1])
        for layer in model.model.layers:
            layer.self_attn.config = cfg
            if change[0] == "attn_logit_softcapping":
                layer.self_attn.attn_logit_softcapping = change[1]
            if change[0] == "query_pre_attn_scalar":
                layer.self_attn.scaling = change[1] ** -0.5
            if change[0] == "sliding_window":
                layer.self_attn.sliding_window = change[1]
        ablations[name] = logits_of(model, ids_rows, 0).tolist()
        setattr(cfg, change[0], old)
        for layer in model.model.layers:
            layer.self_attn.config = cfg
            if change[0] == "attn_logit_softcapping":
                layer.self_attn.attn_logit_softcapping = old
            if change[0] == "query_pre_attn_scalar":
                layer.self_attn.scaling = old ** -0.5
            if change[0] == "sliding_window":
                layer.self_attn.sliding_window = old
    assert torch.allclose(logits_of(model, ids_rows, 0), logits), "ablations must be undone"
    with open(f"{out}/expected.json", "w") as f:
        json.dump({"generator": "scripts/make_model_fixture.py", "rows": rows, "ablations": ablations}, f)
    print(f"wrote {out}: {os.path.getsize(out + '/model.safetensors')} bytes of weights")


def make_dtypes():
    torch.manual_seed(1)
    model = Gemma2ForSequenceClassification(config(512)).eval()
    randomize(model, None, seed=1)
    g = torch.Generator().manual_seed(2)
    lengths = [37, 5, 60, 21]
    rows = [[2] + torch.randint(3, 512, (n - 2,), generator=g).tolist() + [1] for n in lengths]
    shutil.rmtree(DTYPES, ignore_errors=True)
    expected = {}
    for variant, dtype, shard in [("f32", torch.float32, None), ("bf16", torch.bfloat16, None),
                                  ("f16", torch.float16, None), ("sharded", torch.float32, "40KB")]:
        out = f"{DTYPES}/{variant}"
        m = Gemma2ForSequenceClassification(config(512))
        m.load_state_dict(model.state_dict())
        m = m.to(dtype)
        kwargs = {"max_shard_size": shard} if shard else {}
        m.save_pretrained(out, safe_serialization=True, **kwargs)
        # The reference computes in f32 from the stored (rounded) weights, as the Rust side does.
        back = Gemma2ForSequenceClassification.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
        expected[variant] = logits_of(back, rows, 0).tolist()
    # A base LM checkpoint (no score head), as google/gemma-2-2b is: Gemma2ForCausalLM, lm_head tied and not saved.
    base = f"{DTYPES}/base-lm"
    lm = Gemma2ForCausalLM(config(512))
    lm.model.load_state_dict(model.model.state_dict())
    lm.save_pretrained(base, safe_serialization=True)
    with open(f"{DTYPES}/expected.json", "w") as f:
        json.dump({"generator": "scripts/make_model_fixture.py", "rows": rows, "logits": expected}, f)
    print(f"wrote {DTYPES}")


if __name__ == "__main__":
    if "--large" in sys.argv:
        make_tiny("large", LARGE)
    elif "--f16" in sys.argv:
        add_f16_logits()
    else:
        make_tiny()
        make_dtypes()
