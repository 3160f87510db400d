"""PyTorch side of the forward benchmark, and the model both sides load.

    python bench/forward_vs_pytorch.py make DIR [--preset mid|2b|2b-graph] [--device cuda --dtype bfloat16]
    python bench/forward_vs_pytorch.py run DIR [cpu|cuda] BATCH SEQ ITERS [dtype] [eager|sdpa]

`make` writes a random Gemma2ForSequenceClassification (f32 by default). On a GPU, `--device cuda --dtype bfloat16`
builds it there and saves it in bf16: the 2b preset then takes seconds instead of minutes on the CPU.
"""
import json
import resource
import sys
import time

import torch
from transformers import Gemma2Config, Gemma2ForSequenceClassification

PRESETS = {
    # Mid-size: fits a 2-core CPU run in minutes, keeps the real 256k vocabulary.
    "mid": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4, head_dim=64, query_pre_attn_scalar=64),
    # google/gemma-2-2b's graph (26 layers, 8 heads, 4 KV heads) at a width where the device's work is small:
    # the same tensor operations and kernel launches per step, for bench/host_work.sh.
    "2b-graph": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=26, num_attention_heads=8,
                     num_key_value_heads=4, head_dim=8, query_pre_attn_scalar=8),
    # google/gemma-2-2b's shape.
    "2b": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
               num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256),
}


def make(out, preset, device="cpu", dtype="float32"):
    cfg = Gemma2Config(vocab_size=256000, sliding_window=4096, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, pad_token_id=0, num_labels=2,
                       id2label={0: "model_a", 1: "model_b"}, label2id={"model_a": 0, "model_b": 1},
                       attn_implementation="eager", **PRESETS[preset])
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma2ForSequenceClassification(cfg).to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    print(f"wrote {out}")


def run(model_dir, device, batch, seq, iters, dtype="float32", attn="eager"):
    dtype = getattr(torch, dtype)
    model = Gemma2ForSequenceClassification.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    model = model.eval().to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=g).to(device)
    mask = torch.ones_like(ids)

    def step():
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask).logits.float().cpu()

    step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"rows_per_s": batch * iters / seconds, "seconds_per_batch": seconds / iters,
                      "batch": batch, "seq": seq, "iters": iters, "peak_mib": peak, "attn": attn,
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    if sys.argv[1] == "make":
        opts = dict(zip(sys.argv[3::2], sys.argv[4::2]))
        make(sys.argv[2], opts.get("--preset", "mid"), opts.get("--device", "cpu"), opts.get("--dtype", "float32"))
    else:
        run(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), *sys.argv[7:9])
