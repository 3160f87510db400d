"""PyTorch + PEFT side of the LoRA training benchmark: the same loop as `trainer bench train` (trainer/src/bench.rs).

    python bench/train_peft.py MODEL_DIR [cpu|cuda] SEQ STEPS [float32|bfloat16] [eager|sdpa] [BATCH]

LoRA r 32, alpha 64, dropout 0.05 on q/k/v from layer 6; batch 1 of random ids; label-smoothed cross-entropy;
AdamW (lr 2e-5, weight decay 0.01); BATCH rows per step (default 1). Prints one JSON line: tokens/s, seconds per
step, peak memory.
"""
import json
import resource
import sys
import time

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import Gemma2ForSequenceClassification


def main():
    model_dir, device, seq, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    dtype = getattr(torch, sys.argv[5]) if len(sys.argv) > 5 else torch.float32
    attn = sys.argv[6] if len(sys.argv) > 6 else "eager"
    batch = int(sys.argv[7]) if len(sys.argv) > 7 else 1
    model = Gemma2ForSequenceClassification.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    layers = model.config.num_hidden_layers
    lora = LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj"],
                      layers_to_transform=list(range(min(6, layers - 1), layers)), task_type=TaskType.SEQ_CLS)
    model = get_peft_model(model, lora).to(device).train()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5, weight_decay=0.01)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    g = torch.Generator().manual_seed(0)

    def step():
        ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=g).to(device)
        label = torch.randint(0, 2, (batch,), generator=g).to(device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
        loss_fn(logits, label).backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(json.dumps({"tokens_per_s": batch * seq * steps / seconds, "seconds_per_step": seconds / steps,
                      "seq": seq, "batch": batch, "attn": attn, "dtype": str(dtype),
                      "steps": steps, "peak_mib": peak, "trainable": trainable, "torch": torch.__version__,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
