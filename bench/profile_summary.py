"""Summarises a cubecl profiling log (bench/profile.sh): device time and launches by kind of kernel.

Reads PROFILE_LOG (lines "| <duration> | <kernel name>", one per launch in launch order, as cubecl's profiling
logger writes them at level "basic"), STEPS (optional: the step computations in the run, for the time per step)
and WARMUP (optional, with STEPS: how many of them come first and are left out, since a first step also waits
for each new kernel's pipeline; its launches are taken to be the first WARMUP/STEPS of all, as every step of a
benchmark launches the same kernels). Prints a table by kind, the kernels that took longest, and a JSON summary
as its last line.
"""

import json
import os
import re
import sys
from collections import defaultdict

LINE = re.compile(r"\|\s*([0-9.]+)\s*(ns|µs|us|ms|s)\s*\|\s*(\S.*?)\s*$")
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


def main():
    path = os.environ["PROFILE_LOG"]
    steps = int(os.environ["STEPS"]) if os.environ.get("STEPS") else None
    warmup = int(os.environ.get("WARMUP") or 0)
    if warmup and not (steps and steps > warmup):
        sys.exit("profile_summary: WARMUP needs STEPS larger than it")
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
    skipped = round(len(launches_in_order) * warmup / steps) if warmup else 0
    if warmup:
        steps -= warmup
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
          + (f", leaving out the first {skipped:,} ({warmup} warm-up step{'s' if warmup > 1 else ''})"
             if skipped else "")
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
