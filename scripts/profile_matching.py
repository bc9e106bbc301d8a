"""Two warm-up calls, then one greedy_match and one optimal_match call (B=256, N=77, D=512, fp32, l1),
for ncu -k regex:match_kernel --launch-skip 2 --launch-count 2."""
import torch

import collat.ops  # noqa: F401

g = torch.Generator().manual_seed(0)
pred = torch.randn(256, 77, 512, generator=g).cuda()
target = torch.randn(256, 77, 512, generator=g).cuda()
lengths = torch.full((256,), 77, device="cuda")
for _ in range(2):
    torch.ops.collat.greedy_match(pred, target, lengths, "l1")
    torch.ops.collat.optimal_match(pred, target, lengths, "l1")
torch.cuda.synchronize()
