#!/usr/bin/env python3
"""steptrace.py CSV [STEPS]: where a decode step's time goes, from a kernel
timeline of gpu_bench --only single (tests/gpu/ktrace.c's CSV, or the
same columns from nsys stats cuda_gpu_trace; tests/gpu/run.sh profile).

With programmatic dependent launch a kernel starts long before its inputs
are ready (it prefetches weights, then waits), so a kernel's duration says
little. What adds to the step is how much later each kernel ends than the
one before it: "d_end" below (the step's first kernel: its duration, so
the host's time between steps is left out). Steps are cut at each
block-table update (else each embedding); the last STEPS (default 16)
full steps are summarized per kernel name (mean d_end and duration in
microseconds, and launches a step), and one step is listed kernel by
kernel."""
import csv
import re
import sys


def short(name):
    name = re.sub(r'\(.*$', '', name)          # drop the argument list
    name = re.sub(r'^void ', '', name)
    name = name.replace('__nv_bfloat16', 'bf16').replace('__half', 'f16')
    return name[:70]


def main():
    path = sys.argv[1]
    nsteps = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    rows = []
    with open(path, newline='') as f:
        for r in csv.DictReader(f):
            name = r.get('Name', '')
            if not name or 'memcpy' in name.lower() or 'memset' in name.lower():
                continue
            try:
                start, dur = int(r['Start (ns)']), int(r['Duration (ns)'])
            except (KeyError, ValueError):
                continue
            grid = '%s,%s,%s' % (r.get('GrdX', '?'), r.get('GrdY', '?'), r.get('GrdZ', '?'))
            if r.get('SmemExecuted'):  # ktrace.c: the SM's shared memory size
                grid += ' r%s s%sk' % (r.get('Reg/Trd', '?'), int(r['SmemExecuted']) // 1024)
            rows.append((start, dur, short(name), grid))
    rows.sort()
    # a step's first kernel: the block-table update, else the embedding
    first = 'table_update_k' if any(r[2].startswith('table_update_k') for r in rows) else 'embed_k'
    cuts = [i for i, r in enumerate(rows) if r[2].startswith(first)]
    if len(cuts) < 3:
        print('fewer than 3 steps found (%d kernels)' % len(rows))
        return 1
    steps = [rows[cuts[i]:cuts[i + 1]] for i in range(len(cuts) - 1)][-nsteps:]
    stats, totals = {}, []
    for st in steps:
        t0 = st[0][0]
        prev_end = t0
        end_max = t0  # the step: from its first kernel's start to its last end
        for start, dur, name, grid in st:
            end = start + dur
            d = end - max(prev_end, t0)
            s = stats.setdefault(name, [0, 0.0, 0.0])
            s[0] += 1
            s[1] += d
            s[2] += dur
            prev_end = max(prev_end, end)
            end_max = max(end_max, end)
        totals.append(end_max - t0)
    n = len(steps)
    print('# %d steps; step (first kernel start to last end): mean %.1f us, min %.1f us'
          % (n, sum(totals) / n / 1e3, min(totals) / 1e3))
    print('# per kernel name: launches a step, mean d_end us (sum a step), mean duration us')
    for name, (cnt, d, dur) in sorted(stats.items(), key=lambda kv: -kv[1][1]):
        print('%-70s %5.1f %7.2f (%7.1f) %7.2f' % (name, cnt / n, d / cnt / 1e3, d / n / 1e3,
                                                   dur / cnt / 1e3))
    st = steps[len(steps) // 2]
    t0 = st[0][0]
    prev_end = t0
    print('# one step, kernel by kernel: start us, duration us, d_end us, grid (registers,'
          ' shared memory of the SM), name')
    for start, dur, name, grid in st:
        end = start + dur
        print('%8.2f %7.2f %7.2f %-24s %s' % ((start - t0) / 1e3, dur / 1e3,
                                             (end - max(prev_end, t0)) / 1e3, grid, name))
        prev_end = max(prev_end, end)
    return 0


if __name__ == '__main__':
    sys.exit(main())
