#!/usr/bin/env bash
# The GPU benchmark: arena-judge against PyTorch + transformers + PEFT on the same GPU, gemma-2-2b-shaped random
# weights (2304 x 26, 256k vocabulary, bf16), side by side with ratios and MFU:
#   - forward, 8 x 512 tokens: PyTorch bf16 (sdpa, eager) against ours in f16;
#   - a LoRA step (the recipe's adapters: r 32, alpha 64, q/k/v of layers 6-25), 1 x 512: PEFT bf16 (sdpa, eager)
#     and f32 against ours in f16 and f32; and at a batch that fills the GPU (BIG_BATCH x 512);
#   - `trainer train` with default settings on the bundled real rows: rows/s and tokens/s from its log, and beside
#     it the recipe's micro-batches of one row (--micro-batch-tokens 0), with the ratio;
#   - where the device time of our f16 forward and LoRA step goes, by kind of kernel (bench/profile.sh), and how
#     much of a step the GPU spends waiting for the host;
#   - with PART=autotune, in a second call: our f16 forward and LoRA steps built with burn's autotuning, beside
#     the default build's (where that call still finds it) and PyTorch's.
#
# For a machine with no Rust toolchain and no network (an H200 lent through the device tool): run
# bench/gpu_pack.sh here first, carry bench/out/gpu and run this script there from the repository root; then,
# as a second call (what one call carries is limited to 64 MiB) and only where the session's device time allows
# (15 minutes in all, each machine's start included; set BUDGET to fit), carry bench/out/gpu-autotune and run
# `PART=autotune bash bench/gpu.sh`. It builds nothing, uses that machine's python3 (torch, transformers, peft),
# gives every step its own timeout, stops starting new steps after BUDGET seconds (default 420, so a run stays
# under 8 minutes), and writes its log and an archive of every step's output to $OUT (the device tool's folder)
# or bench/out.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${PART:-main}
case $PART in
  main) PACK=bench/out/gpu ;;
  autotune) PACK=bench/out/gpu-autotune ;;
  *) echo "gpu.sh: PART is main or autotune, not '$PART'" >&2; exit 2 ;;
esac
W=/tmp/arena-judge-gpu
# Every step's output is kept in RES; what comes back from the device tool is at most 8 files, so the results
# leave as two: the log (with the tables) and an archive of RES, in $OUT or bench/out.
RES=$W/results-$PART
DEST=${OUT:-bench/out}
BUDGET=${BUDGET:-420}
BIG_BATCH=${BIG_BATCH:-16}
PEAK_HALF=${PEAK_HALF:-989}   # dense bf16/f16 TFLOP/s of an H200 (H100 SXM's), from the datasheet
PEAK_F32=${PEAK_F32:-67}
rm -rf "$RES" && mkdir -p "$RES" "$DEST"
export PYTHONUNBUFFERED=1
started=$(date +%s)
log() { echo "$*" | tee -a "$RES/log.txt"; }
left() { echo $((BUDGET - ($(date +%s) - started))); }
# step NAME TIMEOUT CMD...: runs CMD under its own timeout, its last line (a JSON object) to $RES/NAME.json.
step() {
  local name=$1 limit=$2; shift 2
  if [ "$(left)" -le 20 ]; then log "skip $name: the time budget is spent"; return; fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  log "== $name (timeout ${limit}s)"
  local t0; t0=$(date +%s)
  timeout "$limit" "$@" > "$RES/$name.out" 2> "$RES/$name.err"
  local rc=$?
  tail -n 1 "$RES/$name.out" > "$RES/$name.json"
  log "   rc $rc in $(( $(date +%s) - t0 ))s: $(cat "$RES/$name.json")"
  [ $rc -eq 0 ] || tail -n 5 "$RES/$name.err" | tee -a "$RES/log.txt"
}

# The Vulkan loader, and the NVIDIA ICD where the image keeps it outside the default search path.
for f in "$PACK"/debs/*.deb; do dpkg -x "$f" /; done
ldconfig
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -f "$icd" ]; then
  export VK_DRIVER_FILES=$icd __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
fi
xz -dc "$PACK/bin.tar.xz" | tar -C "$W" -xf -
# The second call finds the first call's folder if the machine stayed warm between them (ignored paths stay).
[ "$PART" = autotune ] && [ -f bench/out/gpu/bin.tar.xz ] && xz -dc bench/out/gpu/bin.tar.xz | tar -C "$W" -xf -
[ -f "$PACK/tokenizer.json.xz" ] && xz -dc "$PACK/tokenizer.json.xz" > "$W/tokenizer.json"
BIN=$W/bin
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$RES/log.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$RES/log.txt"

M=$W/gemma2-2b
[ -f "$M/config.json" ] || step make 120 python3 bench/forward_vs_pytorch.py make "$M" --preset 2b --device cuda --dtype bfloat16
[ -f "$W/tokenizer.json" ] && cp "$W/tokenizer.json" "$M/"

if [ "$PART" = autotune ]; then
  # burn's autotuning: the same benchmarks in a build with `--features autotune`, which times candidate kernels
  # for each matmul and reduction shape during the warm-up; then the default build's (if this machine still has
  # it) and PyTorch's, side by side, as far as the budget goes.
  # Each autotuned run next to its default-build and PyTorch counterparts, so that whatever the budget cuts, the
  # runs that did happen come in comparable pairs.
  default=$([ -x "$BIN/trainer" ] && echo yes)
  [ -n "$default" ] || log "the default build is not on this machine (a fresh one): its figures come from the first call"
  step fwd_ours_f16_autotune 150 "$BIN/trainer_autotune" bench forward "$M" wgpu 8 512 10 f16
  [ -n "$default" ] && step fwd_ours_f16 120 "$BIN/trainer" bench forward "$M" wgpu 8 512 10 f16
  step fwd_torch_sdpa 90 python3 bench/forward_vs_pytorch.py run "$M" cuda 8 512 10 bfloat16 sdpa
  step train_ours_f16_autotune 150 "$BIN/trainer_autotune" bench train "$M" wgpu 512 10 f16 1
  [ -n "$default" ] && step train_ours_f16 120 "$BIN/trainer" bench train "$M" wgpu 512 10 f16 1
  step train_peft_sdpa 90 python3 bench/train_peft.py "$M" cuda 512 10 bfloat16 sdpa 1
  step big_ours_f16_autotune 150 "$BIN/trainer_autotune" bench train "$M" wgpu 512 5 f16 "$BIG_BATCH"
  [ -n "$default" ] && step big_ours_f16 120 "$BIN/trainer" bench train "$M" wgpu 512 5 f16 "$BIG_BATCH"
  step big_peft_sdpa 90 python3 bench/train_peft.py "$M" cuda 512 5 bfloat16 sdpa "$BIG_BATCH"
else
  # In order of what the issue's targets and the next speed work need most, so that when the budget runs out (the
  # device tool lends a session 15 minutes in all, a machine's start included) what is cut is what matters least:
  # our f16 forward and LoRA steps beside PyTorch's sdpa, the batch that fills the GPU, `trainer train` on real
  # rows, where the device time goes; then the eager and f32 references, the recipe's micro-batches, and bf16.
  step fwd_torch_sdpa 90 python3 bench/forward_vs_pytorch.py run "$M" cuda 8 512 10 bfloat16 sdpa
  step fwd_ours_f16 120 "$BIN/trainer" bench forward "$M" wgpu 8 512 10 f16
  step train_peft_sdpa 90 python3 bench/train_peft.py "$M" cuda 512 10 bfloat16 sdpa 1
  step train_ours_f16 120 "$BIN/trainer" bench train "$M" wgpu 512 10 f16 1
  step big_peft_sdpa 90 python3 bench/train_peft.py "$M" cuda 512 5 bfloat16 sdpa "$BIG_BATCH"
  step big_ours_f16 120 "$BIN/trainer" bench train "$M" wgpu 512 5 f16 "$BIG_BATCH"
  # `trainer train` with default settings (wgpu, auto precision, batch 1 x 8 accumulated, each step's 8 rows
  # computed as one micro-batch of up to 4096 padded tokens) on the real sample rows.
  rm -rf "$W/run" "$W/run-unpacked"
  step trainer_train 150 "$BIN/trainer" train --model "$M" --data data/arena-sample.parquet --out "$W/run" \
    --max-steps 12 --logging-steps 2 --eval-steps 1000 --save-steps 1000
  [ -f "$W/run/log.jsonl" ] && cp "$W/run/log.jsonl" "$RES/trainer_train_log.jsonl"
  # Where the device time of our f16 LoRA step and forward goes, by kind of kernel (bench/profile.sh: cubecl
  # times every launch with the GPU's timestamps), set against the same benchmark's step time unprofiled above:
  # the rest is time the GPU waited for the host. Fewer iterations: timing every launch serialises the kernels.
  step prof_train_f16 120 env STEPS=3 PROFILE_DIR="$W/prof_train_f16" \
    bash bench/profile.sh "$BIN/trainer" bench train "$M" wgpu 512 3 f16 1
  step prof_fwd_f16 120 env STEPS=3 PROFILE_DIR="$W/prof_fwd_f16" \
    bash bench/profile.sh "$BIN/trainer" bench forward "$M" wgpu 8 512 3 f16
  # The references beside those: PyTorch with eager attention, PEFT in f32 against ours in f32.
  step fwd_torch_eager 90 python3 bench/forward_vs_pytorch.py run "$M" cuda 8 512 10 bfloat16 eager
  step train_peft_eager 90 python3 bench/train_peft.py "$M" cuda 512 10 bfloat16 eager 1
  step train_peft_f32 90 python3 bench/train_peft.py "$M" cuda 512 10 float32 eager 1
  step train_ours_f32 120 "$BIN/trainer" bench train "$M" wgpu 512 10 f32 1
  # The same `trainer train` with the recipe's micro-batches of one row (--micro-batch-tokens 0), for fewer steps.
  step trainer_train_unpacked 100 "$BIN/trainer" train --model "$M" --data data/arena-sample.parquet \
    --out "$W/run-unpacked" --micro-batch-tokens 0 --max-steps 6 --logging-steps 2 --eval-steps 1000 --save-steps 1000
  [ -f "$W/run-unpacked/log.jsonl" ] && cp "$W/run-unpacked/log.jsonl" "$RES/trainer_train_unpacked_log.jsonl"
  # bf16 has f32's range, so it is the format to fall back on if gemma-2-2b's real activations pass f16's 65504.
  # Whether this GPU's Vulkan driver gives wgpu bf16 at all, and at what speed (refused in a second if not).
  step train_ours_bf16 60 "$BIN/trainer" bench train "$M" wgpu 512 5 bf16 1
fi

RES="$RES" PART="$PART" PEAK_HALF="$PEAK_HALF" PEAK_F32="$PEAK_F32" python3 - <<'PYEOF' | tee -a "$RES/log.txt"
import json, os
res = os.environ["RES"]
def load(name):
    try:
        return json.loads(open(os.path.join(res, name + ".json")).read())
    except Exception:
        return None
peak = {"half": float(os.environ["PEAK_HALF"]) * 1e12, "f32": float(os.environ["PEAK_F32"]) * 1e12}
def mfu(rate, flops, kind):
    return f"{100 * rate * flops / peak[kind]:.1f}%" if rate and flops else "-"
def table(title, unit, rows, ref_name, flops):
    ref = load(ref_name)
    print(f"\n{title}")
    print(f"| run | {unit} | vs {ref_name} | MFU |")
    print("| --- | ---: | ---: | ---: |")
    for name, label, key, scale, kind in rows:
        r = load(name)
        if not r or key not in r:
            print(f"| {label} | failed or skipped | | |")
            continue
        v = r[key]
        ratio = f"{v / ref[key]:.2f}x" if ref and key in ref else "-"
        # An f16 step whose scaled gradients overflowed is computed again: `trainer bench train` warms up until a step
        # no longer does, and says how many timed steps still did.
        n = r.get("timed_overflows") or 0
        again = f" ({n} timed step{'s' if n > 1 else ''} computed again)" if n else ""
        print(f"| {label}{again} | {v:,.1f} | {ratio} | {mfu(v * scale, flops, kind)} |")
fwd = load("fwd_ours_f16") or {}
table("Forward, batch 8 x 512 (target: ours >= PyTorch bf16 sdpa)", "rows/s", [
    ("fwd_torch_sdpa", "PyTorch bf16, sdpa", "rows_per_s", 512, "half"),
    ("fwd_torch_eager", "PyTorch bf16, eager", "rows_per_s", 512, "half"),
    ("fwd_ours_f16", "arena-judge f16 (SPIR-V)", "rows_per_s", 512, "half"),
    ("fwd_ours_f16_autotune", "arena-judge f16 (SPIR-V), autotuned", "rows_per_s", 512, "half"),
], "fwd_torch_sdpa", fwd.get("flops_per_token"))
tr = load("train_ours_f16") or load("train_ours_f32") or {}
table("LoRA step, batch 1 x 512 (target: ours >= PEFT bf16 sdpa)", "tokens/s", [
    ("train_peft_sdpa", "PEFT bf16, sdpa", "tokens_per_s", 1, "half"),
    ("train_peft_eager", "PEFT bf16, eager", "tokens_per_s", 1, "half"),
    ("train_peft_f32", "PEFT f32", "tokens_per_s", 1, "f32"),
    ("train_ours_f16", "arena-judge f16 base", "tokens_per_s", 1, "half"),
    ("train_ours_f16_autotune", "arena-judge f16 base, autotuned", "tokens_per_s", 1, "half"),
    ("train_ours_f32", "arena-judge f32", "tokens_per_s", 1, "f32"),
    ("train_ours_bf16", "arena-judge bf16 base (if the driver has bf16)", "tokens_per_s", 1, "half"),
], "train_peft_sdpa", tr.get("flops_per_token"))
table("LoRA step, a batch that fills the GPU (target: >= PEFT, MFU >= 40%)", "tokens/s", [
    ("big_peft_sdpa", "PEFT bf16, sdpa", "tokens_per_s", 1, "half"),
    ("big_ours_f16", "arena-judge f16 base", "tokens_per_s", 1, "half"),
    ("big_ours_f16_autotune", "arena-judge f16 base, autotuned", "tokens_per_s", 1, "half"),
], "big_peft_sdpa", tr.get("flops_per_token"))
def profile(name, timed, per_step_key, label):
    p, t = load(name), load(timed)
    if not p or "by_kind" not in p:
        print(f"\n{label}: no profile (failed or skipped)")
        return
    print(f"\nWhere the device time goes, {label} ({p['launches_per_step']:,.0f} launches and "
          f"{p['device_ms_per_step']:,.1f} ms of kernels per step; details in {name}.out)")
    if t and per_step_key in t:
        wall = 1000 * t[per_step_key]
        busy = p["device_ms_per_step"] / wall
        print(f"unprofiled step: {wall:,.1f} ms; its kernels add up to {100 * busy:.0f}% of it"
              + (f", so the GPU waited {wall - p['device_ms_per_step']:,.1f} ms per step for the host" if busy <= 1
                 else " (timed one by one, kernels took longer than back to back)"))
    print("| kind | launches per step | ms per step | share |")
    print("| --- | ---: | ---: | ---: |")
    steps = p["steps"]
    for kind, v in sorted(p["by_kind"].items(), key=lambda kv: -kv[1]["ms"]):
        print(f"| {kind} | {v['launches'] / steps:,.0f} | {v['ms'] / steps:,.2f} | "
              f"{100 * v['ms'] / p['device_ms']:.1f}% |")
if os.environ["PART"] == "autotune":
    print()
    for tuned, plain, key, label in [("fwd_ours_f16_autotune", "fwd_ours_f16", "rows_per_s", "forward 8 x 512"),
                                     ("train_ours_f16_autotune", "train_ours_f16", "tokens_per_s", "LoRA step 1 x 512"),
                                     ("big_ours_f16_autotune", "big_ours_f16", "tokens_per_s", "LoRA step, big batch")]:
        a, b = load(tuned), load(plain)
        if a and b and key in a and key in b:
            print(f"autotuned, {label}: {a[key] / b[key]:.2f}x the default build")
    raise SystemExit
def host_cpu(name, per_step_key, cpu_key, label):
    # CPU time of the threads that queue a step, per step, beside the step's wall time (bench/host_work.sh says why
    # it is an upper bound of their work: a thread whose next queue is full spins and yields, which counts too).
    r = load(name)
    if not r or cpu_key not in r or per_step_key not in r:
        return
    cpu = {k.rstrip("-0123456789"): v for k, v in r[cpu_key].items()}
    parts = ", ".join(f"{k} {1000 * cpu[k]:,.1f}" for k in ("main", "DSU", "DSD") if k in cpu)
    print(f"\nhost CPU per step, {label}: {parts} ms (main thread, burn's fusion, the cubecl server), "
          f"of a {1000 * r[per_step_key]:,.1f} ms step")
host_cpu("fwd_ours_f16", "seconds_per_batch", "cpu_seconds_per_batch_by_thread", "forward f16, 8 x 512")
host_cpu("train_ours_f16", "seconds_per_step", "cpu_seconds_per_step_by_thread", "LoRA step f16, 1 x 512")
host_cpu("big_ours_f16", "seconds_per_step", "cpu_seconds_per_step_by_thread", "LoRA step f16, big batch")
profile("prof_fwd_f16", "fwd_ours_f16", "seconds_per_batch", "forward f16, 8 x 512")
profile("prof_train_f16", "train_ours_f16", "seconds_per_step", "LoRA step f16, 1 x 512")
def last_log(name):
    try:
        return [json.loads(l) for l in open(os.path.join(res, name)) if '"train"' in l][-1]
    except Exception as e:
        print(f"\n{name}: no log ({e})")
        return None
# The last logged stretch of each run: the first carries the warm-up (shader compilation).
packed, unpacked = last_log("trainer_train_log.jsonl"), last_log("trainer_train_unpacked_log.jsonl")
for label, last in [("defaults: 8 rows per step as one micro-batch", packed),
                    ("--micro-batch-tokens 0: the recipe's 8 micro-batches of 1 row", unpacked)]:
    if last:
        print(f"\ntrainer train, real rows, {label}: {last['rows_per_second']:.2f} rows/s, "
              f"{last['tokens_per_second']:.0f} tokens/s, MFU {last.get('mfu')}, loss {last['loss']:.4f} at step {last['step']}")
if packed and unpacked:
    print(f"packed micro-batches: {packed['rows_per_second'] / unpacked['rows_per_second']:.2f}x the rows/s of one row at a time")
PYEOF
log "done in $(( $(date +%s) - started ))s"
cp "$RES/log.txt" "$DEST/gpu-$PART-log.txt"
tar -C "$RES" -czf "$DEST/gpu-$PART-results.tar.gz" .
echo "results: $DEST/gpu-$PART-log.txt and $DEST/gpu-$PART-results.tar.gz"
