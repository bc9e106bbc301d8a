"""On a GPU: the CUDA and CPU optimal_match kernels on the real-shape test's inputs (several seeds);
saves every item whose perms differ (inputs and both perms) for analysis on CPU.
Usage: python3 scripts/capture_optimal_mismatches.py OUT.pt"""
import sys

import torch

sys.path.insert(0, "tests")
from test_matching import random_lengths  # noqa: E402

import collat.matching  # noqa: E402,F401  (loads the extension)

found, checked = [], 0
for seed in range(4):
    for D in (512, 768):
        for metric in ("l1", "l2", "cosine"):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                torch.manual_seed(seed)  # seed 0 = the test's inputs
                B, N = 256, 77
                pred = torch.randn(B, N, D, device="cuda").to(dtype)
                target = torch.randn(B, N, D, device="cuda").to(dtype)
                lengths = random_lengths(B, N, "cuda")
                gpu = torch.ops.collat.optimal_match(pred, target, lengths, metric).cpu()
                cpu = torch.ops.collat.optimal_match(pred.cpu(), target.cpu(), lengths.cpu(), metric)
                checked += B
                for b in (gpu != cpu).any(1).nonzero().flatten().tolist():
                    found.append(dict(seed=seed, D=D, metric=metric, dtype=str(dtype), item=b, pred=pred[b].cpu(),
                                      target=target[b].cpu(), length=int(lengths[b]), gpu=gpu[b], cpu=cpu[b]))
                    print("differs:", seed, D, metric, dtype, "item", b, "length", int(lengths[b]),
                          "columns differing", int((gpu[b] != cpu[b]).sum()))
print(f"optimal_match CUDA vs CPU: {len(found)} of {checked} items differ")
torch.save(found, sys.argv[1])
