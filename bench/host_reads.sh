#!/usr/bin/env bash
# Host reads and device syncs per LoRA training step on wgpu: how often the host waits for the GPU.
#
# A read (a tensor's values brought back to the host) makes the host wait until the device has finished everything
# queued before it; while it waits, it queues nothing, so the GPU idles for as long as the host then takes to build
# and queue the next step. A step that reads nothing lets the host run ahead. cubecl funnels every read and every
# sync of the wgpu runtime through its server's `read` and `sync`: this script puts breakpoints there and at the
# entry of `shared::train::train_step`, and counts the reads and syncs between one step's entry and the next
# (gdb's Python API; a breakpoint whose `stop` returns false counts without stopping).
#
# Each run trains the tiny preset with the recipe's step (batch 1, accumulation 8) and logs every LOGGING steps;
# it needs a build with symbols (the debug build; `bash bench/gpu_pack.sh` strips its copies).
#
#   bash bench/host_reads.sh                        # f16 (the default on a GPU) and f32
#   PRECISIONS=f16 STEPS=9 LOGGING=3 bash bench/host_reads.sh
set -euo pipefail
cd "$(dirname "$0")/.."
trainer=$(realpath "${TRAINER:-target/debug/trainer}")
read -r -a precisions <<< "${PRECISIONS:-f16 f32}"
steps=${STEPS:-6}
logging=${LOGGING:-3}
command -v gdb > /dev/null || { echo "host_reads.sh: needs gdb (apt-get install gdb)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Offsets of the functions in the binary (position-independent; gdb adds where it was loaded). A symbol may exist
# once per monomorphisation (the server is generic over its compiler): every copy gets a breakpoint.
offsets() { nm -C "$trainer" | awk -v re="$1" '$0 ~ re { print "0x" $1 }' | paste -sd, -; }
step_at=$(offsets ' shared::train::train_step$')
read_at=$(offsets 'WgpuServer<C> as cubecl_runtime::server::base::Server>::read$')
sync_at=$(offsets 'WgpuServer<C> as cubecl_runtime::server::base::Server>::sync$')
if [ -z "$step_at" ] || [ -z "$read_at" ] || [ -z "$sync_at" ]; then
  echo "host_reads.sh: $trainer lacks the symbols (train_step '$step_at', read '$read_at', sync '$sync_at')" >&2
  exit 1
fi

cat > "$tmp/count.py" <<'PYEOF'
import json, os
import gdb

events = []  # "S" at each step's entry, "R" per read, "Y" per sync

class Count(gdb.Breakpoint):
    def __init__(self, spec, tag):
        super().__init__(spec, internal=True)
        self.tag = tag
    def stop(self):
        events.append(self.tag)
        return False

binary = os.environ["HR_BINARY"]
gdb.execute("starti", to_string=True)
# The lowest address the binary is mapped at is where its offset 0 was loaded.
base = min(int(line.split()[0], 16)
           for line in gdb.execute("info proc mappings", to_string=True).splitlines()
           if line.strip().endswith(binary))
for tag, var in (("S", "HR_STEP"), ("R", "HR_READ"), ("Y", "HR_SYNC")):
    for off in os.environ[var].split(","):
        Count(f"*{base + int(off, 16):#x}", tag)
gdb.execute("continue")
steps, cur = [], None
for e in events:
    if e == "S":
        cur = {"reads": 0, "syncs": 0}
        steps.append(cur)
    elif cur is not None:
        cur["reads" if e == "R" else "syncs"] += 1
with open(os.environ["HR_OUT"], "w") as f:
    json.dump({"steps": steps}, f)
PYEOF

"$trainer" prepare --data "$(realpath data/arena-sample.parquet)" --sample-percent 10 --out "$tmp/prepared" \
  > "$tmp/prepare.log"
echo "host reads and device syncs per training step computation (tiny preset, batch 1 x accumulation 8, wgpu," \
  "a log line every $logging steps)"
for p in "${precisions[@]}"; do
  HR_BINARY="$trainer" HR_STEP="$step_at" HR_READ="$read_at" HR_SYNC="$sync_at" HR_OUT="$tmp/$p.json" \
    gdb -q -batch -x "$tmp/count.py" --args "$trainer" train \
      --prepared "$tmp/prepared" --preset tiny --lora-first-layer 0 --max-steps "$steps" --eval-steps 1000 \
      --logging-steps "$logging" --precision "$p" --device wgpu --out "$tmp/run-$p" > "$tmp/$p.log" 2>&1 \
    || { tail -20 "$tmp/$p.log" >&2; exit 1; }
  overflows=$(grep -o '"overflows": *[0-9]*' "$tmp/run-$p"/checkpoint-*/trainer_state.json | tail -1 | tr -dc 0-9 || true)
  python3 - "$tmp/$p.json" "$p" "${overflows:-0}" "$logging" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
p, overflows, logging = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
steps = r["steps"]
# The last entry also holds what follows training (evaluation, test, export): leave it out.
body = steps[:-1]
print(f"  {p}: reads per step {[s['reads'] for s in body]}, syncs {sum(s['syncs'] for s in body)};"
      f" recomputed after an overflow: {overflows}; after the last step: {steps[-1]['reads'] if steps else 0} reads"
      f" (logging, evaluation, test, checkpoint)")
PYEOF
done
echo "in f16 a step reads its gradient norm once (did the scaled gradients overflow?) and once more for each time it"
echo "overflowed and was computed again at half the scale; a logging step reads its loss once more"
