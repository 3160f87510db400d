#!/usr/bin/env bash
# Host work per step: how long the threads that feed the GPU run on the CPU for one step, with the time they spend
# waiting left out. That time bounds a step from below whatever the GPU: a step cannot take less than the busiest
# of these threads takes to queue it.
#
# A wgpu step passes through three threads, each feeding the next through a queue: the main thread (the model's
# forward and autodiff's backward, recording tensor operations), cubecl's upstream device thread `DSU-` (burn's
# fusion: searching, tracing and compiling fused kernels), and its downstream device thread `DSD-` (the cubecl
# server: memory management, binding and launching kernels, submitting command buffers). A thread whose next
# queue is full, or that waits for results, spins and yields before it sleeps, and that is CPU time too, so
# counting CPU time per thread says nothing. This script samples the benchmark's timed steps alone with `perf`
# (the benchmark enables and disables sampling through a control fifo, BENCH_PERF_CONTROL) and counts, per
# thread, the samples outside the waiting code (cubecl's channel send and server loop, sched_yield, the
# scheduler, sleeps) as work.
#
# On lavapipe the device threads compete with the emulated GPU for the cores, which makes steps slower but not
# the host's work larger. A short sequence keeps the emulated kernels from crowding the host threads out (the
# host's work barely depends on the sequence length: it is per operation, not per value).
#
#   bash bench/host_work.sh DIR              # DIR: an HF model dir; bench train DIR wgpu 64 10 f16
#   SEQ=512 STEPS=5 PRECISION=f32 TRAINER=path/to/trainer bash bench/host_work.sh DIR
#   MODE=forward BATCH=8 bash bench/host_work.sh DIR
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 1 ] || { sed -n '2,23p' "$0" >&2; exit 2; }
command -v perf > /dev/null || { echo "host_work.sh: needs perf (apt-get install linux-perf)" >&2; exit 1; }
trainer=$(realpath "${TRAINER:-target/release/trainer}")
model=$(realpath "$1")
seq=${SEQ:-64}
steps=${STEPS:-10}
precision=${PRECISION:-f16}
freq=${FREQ:-1999}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkfifo "$tmp/ctl" "$tmp/ack"
if [ "${MODE:-train}" = forward ]; then
  half=$([ "$precision" = f16 ] && echo f16 || echo f32)
  command=(bench forward "$model" wgpu "${BATCH:-1}" "$seq" "$steps" "$half")
else
  command=(bench train "$model" wgpu "$seq" "$steps" "$precision" "${BATCH:-1}")
fi
BENCH_PERF_CONTROL=$tmp/ctl BENCH_PERF_ACK=$tmp/ack perf record -q -F "$freq" -D -1 \
  --control "fifo:$tmp/ctl,$tmp/ack" -o "$tmp/perf.data" "$trainer" "${command[@]}" > "$tmp/out" 2> "$tmp/err" || {
  echo "host_work.sh: the benchmark failed:" >&2; tail -n 20 "$tmp/err" >&2; exit 1; }
json=$(grep '^{' "$tmp/out" | tail -n 1)
perf report -i "$tmp/perf.data" --no-children --sort pid,dso,symbol -g none -n -t $'\t' 2> /dev/null \
  | grep -v '^#' | grep -v '^$' > "$tmp/samples.tsv"
PERF_FREQ=$freq STEPS=$steps JSON=$json python3 - "$tmp/samples.tsv" <<'PY'
import json, os, re, sys
from collections import defaultdict

freq, steps = float(os.environ["PERF_FREQ"]), int(os.environ["STEPS"])
bench = json.loads(os.environ["JSON"])
step_s = bench.get("seconds_per_step", bench.get("seconds_per_batch"))
# Waiting: cubecl's channel (a full queue's spin on the sending side, the idle server loop), yielding, sleeping,
# and the kernel's scheduler. Everything else a thread does is work.
WAIT = re.compile(r"submit_inner|custom_channel::Server::start|sched_yield|do_sched_yield|__schedule|"
                  r"finish_task_switch|nanosleep|clock_nanosleep|futex|irqentry_exit|exit_to_user_mode|"
                  r"_raw_spin_unlock|do_syscall_64|entry_SYSCALL|spin_loop")
main_pid = None
work, wait, symbols = defaultdict(float), defaultdict(float), defaultdict(lambda: defaultdict(float))
for line in open(sys.argv[1]):
    cols = line.rstrip("\n").split("\t")
    if len(cols) < 5:
        continue
    n = float(cols[1])
    pid, comm = cols[2].strip().split(":", 1)
    symbol = cols[4].strip()
    symbol = re.sub(r"^\[[.k]\]\s+", "", symbol)
    if main_pid is None or int(pid) < main_pid:
        main_pid = int(pid)
    key = (int(pid), comm.strip())
    if WAIT.search(symbol):
        wait[key] += n
    else:
        work[key] += n
        symbols[key][symbol] += n

def group(key):
    pid, comm = key
    if pid == main_pid:
        return "main"
    for prefix, name in (("DSU-", "DSU- (fusion)"), ("DSD-", "DSD- (cubecl server)")):
        if comm.startswith(prefix):
            return name
    # Unnamed threads: lavapipe's workers (the emulated GPU), wgpu's poller, rayon's pool.
    return "other (emulated GPU, ...)" if comm == "trainer" else comm.rstrip("0123456789")

g_work, g_wait, g_sym = defaultdict(float), defaultdict(float), defaultdict(lambda: defaultdict(float))
for key in set(work) | set(wait):
    g = group(key)
    g_work[g] += work[key]
    g_wait[g] += wait[key]
    for s, n in symbols[key].items():
        g_sym[g][s] += n
per = lambda n: n / freq / steps * 1e3
print(f"{steps} timed steps (or batches) of {step_s * 1e3:.0f} ms (wall), sampled at {freq:.0f} Hz; CPU ms per step:")
print(f"{'thread':24} {'work':>8} {'waiting':>8}")
host = ["main", "DSU- (fusion)", "DSD- (cubecl server)"]
for g in sorted(g_work.keys() | g_wait.keys(), key=lambda g: -(g_work[g] + g_wait[g])):
    print(f"{g:24} {per(g_work[g]):8.1f} {per(g_wait[g]):8.1f}")
busiest = max(host, key=lambda g: g_work.get(g, 0.0))
print(f"host work per step: {per(sum(g_work.get(g, 0) for g in host)):.1f} ms in all; the busiest thread, "
      f"{busiest}, {per(g_work.get(busiest, 0)):.1f} ms: a step cannot be faster than that on this CPU")
for g in host:
    top = sorted(g_sym[g].items(), key=lambda kv: -kv[1])[:8]
    if top:
        print(f"\n{g}: most work in")
        for s, n in top:
            print(f"  {per(n):6.2f} ms  {s[:110]}")
summary = {"seconds_per_step": step_s, "steps": steps,
           "work_ms_per_step": {g: round(per(g_work[g]), 2) for g in g_work},
           "waiting_ms_per_step": {g: round(per(g_wait[g]), 2) for g in g_wait},
           "host_work_ms_per_step": round(per(sum(g_work.get(g, 0) for g in host)), 2),
           "busiest_host_thread": busiest, "busiest_host_thread_ms": round(per(g_work.get(busiest, 0)), 2)}
print(json.dumps(summary))
PY
