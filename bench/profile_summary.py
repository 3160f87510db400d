"""Summarises a cubecl profiling log (bench/profile.sh): device time and launches by kind of kernel.

Reads PROFILE_LOG (lines "| <duration> | <kernel name>", one per launch in launch order, as cubecl's profiling
logger writes them at level "basic") and STEPS (optional: how many timed steps end the run, after its warm-up).
With STEPS it reports only those steps, found as the run's last STEPS equal runs of launches (see step_period),
and gives figures per step; where the last steps differ, it says so and leaves out the first WARMUP (default 1)
of STEPS + WARMUP equal shares instead. Prints a table by kind, the kernels that took longest, and a JSON
summary as its last line.
"""

import json
import os
import re
import sys
from collections import defaultdict

# Anchored at the line's start: the summary table cubecl also writes to the log has the duration in a later column.
LINE = re.compile(r"^\|\s*([0-9.]+)\s*(ns|µs|us|ms|s)\s*\|\s*(\S.*?)\s*$")
UNIT_MS = {"ns": 1e-6, "µs": 1e-3, "us": 1e-3, "ms": 1.0, "s": 1e3}

# Kinds by the kernel's name, first match wins. The order matters: a fused kernel that ends in a matmul or a
# reduction is burn fusion's, and is counted as what it mostly is (the matmul or the reduction).
KINDS = [
    ("matmul", re.compile(r"matmul|gemm|mma", re.I)),
    ("reduction", re.compile(r"reduce|argmax|argmin|sum|mean|max|softmax|cumsum|cumulative", re.I)),
    ("fused element-wise", re.compile(r"fuse|elemwise|elementwise", re.I)),
    ("copy / layout", re.compile(r"contiguous|copy|slice|permute|transpose|cat|flip|gather|select|index|scatter",
                                  re.I)),
    ("random", re.compile(r"random|bernoulli|uniform|normal", re.I)),
    ("fill / cast", re.compile(r"fill|full|zeros|ones|cast|convert|quant", re.I)),
    ("unfused element-wise", re.compile(r"binop|unop|unary|binary|cmp|compare|mask|clamp|powf|exp|log|tanh|erf",
                                         re.I)),
]


def kind_of(name):
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def short(name, width=90):
    # cubecl names carry their full generic parameters; the head says what the kernel is.
    return name if len(name) <= width else name[: width - 3] + "..."


def step_period(names, steps):
    """The launches of one step: the largest p such that the last steps * p launches are `steps` equal runs of p
    kernels, or None. Every step of a settled run launches the same kernels in the same order, while warm-up steps
    launch more (each new pipeline's first use, an f16 step computed again after an overflow, autotuning's
    candidates), so the run's tail repeats with the step's period. The largest p, since parts of a step repeat
    too (the optimizer's update of same-shaped tensors)."""
    for p in range(len(names) // steps, 0, -1):
        if all(names[-i] == names[-i - p] for i in range(1, (steps - 1) * p + 1)):
            return p
    return None


def main():
    path = os.environ["PROFILE_LOG"]
    steps = int(os.environ["STEPS"]) if os.environ.get("STEPS") else None
    warmup = int(os.environ.get("WARMUP") or 1)
    by_kind = defaultdict(lambda: [0, 0.0])
    by_name = defaultdict(lambda: [0, 0.0])
    unmeasured = 0
    launches_in_order = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if "not measured" in line:
                unmeasured += 1
                continue
            m = LINE.search(line)
            if m:
                launches_in_order.append((m.group(3), float(m.group(1)) * UNIT_MS[m.group(2)]))
    skipped = 0
    if steps:
        period = step_period([n for n, _ in launches_in_order], steps) if steps > 1 else None
        if period:
            skipped = len(launches_in_order) - steps * period
        else:
            skipped = round(len(launches_in_order) * warmup / (steps + warmup))
            print(f"profile_summary: the last {steps} steps did not launch the same kernels; taking the warm-up "
                  f"as the first {warmup} of {steps + warmup} equal shares of the launches, per-step figures are "
                  "approximate", file=sys.stderr)
    for name, ms in launches_in_order[skipped:]:
        for table, key in ((by_kind, kind_of(name)), (by_name, name)):
            table[key][0] += 1
            table[key][1] += ms
    total_ms = sum(t for _, t in by_kind.values())
    launches = sum(n for n, _ in by_kind.values())
    if launches == 0:
        sys.exit(f"profile_summary: no timed kernel in {path}")

    print(f"{launches:,} kernel launches, {total_ms:,.1f} ms of device time"
          + (f" ({unmeasured} not measured)" if unmeasured else "")
          + (f", leaving out the first {skipped:,} (the warm-up)" if skipped else "")
          + (f", {total_ms / steps:,.2f} ms and {launches / steps:,.0f} launches per step over {steps} steps"
             if steps else ""))
    print("\n| kind | launches | device time (ms) | share | mean per launch (µs) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for kind, (n, t) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
        print(f"| {kind} | {n:,} | {t:,.1f} | {100 * t / total_ms:.1f}% | {1000 * t / n:,.1f} |")
    print("\nlongest kernels (all their launches together):")
    print("| kernel | kind | launches | device time (ms) | share |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, (n, t) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:15]:
        print(f"| `{short(name)}` | {kind_of(name)} | {n:,} | {t:,.1f} | {100 * t / total_ms:.1f}% |")
    summary = {
        "launches": launches,
        "device_ms": round(total_ms, 3),
        "by_kind": {k: {"launches": n, "ms": round(t, 3)} for k, (n, t) in by_kind.items()},
    }
    if steps:
        summary["steps"] = steps
        summary["warmup_launches_left_out"] = skipped
        summary["device_ms_per_step"] = round(total_ms / steps, 3)
        summary["launches_per_step"] = round(launches / steps, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
