#!/usr/bin/env python3
"""tests/gpu/bf16_reference.py: how far transformers' own bfloat16 path is
from its float32 path on the fixture models (tests/fixtures/models/*), and
on any extra model directories given, with the same metric gpu_check uses:
the largest |log-probability difference| over the prompt's next tokens and
each position's top 5. This is the yardstick for "within bf16 tolerance":
run on the GPU machine (torch + transformers there, no network):

    python3 tests/gpu/bf16_reference.py [--extra DIR ...] > bf16_reference.json

Extra directories get the prompt gpu_check's generated-model checks use
(ids (i * 7919 + 13) % (vocab - 1), 40 of them)."""
import argparse
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM


def logprobs(model_dir, ids, dtype, device):
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    with torch.no_grad():
        out = m(torch.tensor([ids], device=device)).logits[0].float()
    return torch.log_softmax(out, dim=-1).cpu()


def compare(model_dir, ids, device):
    ref = logprobs(model_dir, ids, torch.float32, device)
    res = {}
    for name, dt in (("bf16", torch.bfloat16), ("f16", torch.float16)):
        lp = logprobs(model_dir, ids, dt, device)
        worst = 0.0
        for i in range(len(ids)):
            idx = set(torch.topk(ref[i], 5).indices.tolist())
            if i + 1 < len(ids):
                idx.add(ids[i + 1])
            for j in idx:
                worst = max(worst, abs(float(lp[i, j]) - float(ref[i, j])))
        res[name] = worst
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default="tests/fixtures/models")
    ap.add_argument("--extra", nargs="*", default=[])
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
           "torch": torch.__version__, "models": {}}
    for arch in sorted(os.listdir(a.fixtures)):
        d = os.path.join(a.fixtures, arch)
        g = os.path.join(d, "golden.json")
        if not os.path.exists(g):
            continue
        with open(g) as f:
            ids = json.load(f)["prompt"]
        out["models"][arch] = compare(d, ids, device)
    for d in a.extra:
        with open(os.path.join(d, "config.json")) as f:
            v = json.load(f)["vocab_size"]
        ids = [(i * 7919 + 13) % (v - 1) for i in range(40)]
        out["models"][d] = compare(d, ids, device)
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
