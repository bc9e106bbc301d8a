"""Deliberately broken variants of the ops (one-line mutants) against the adversarial suite: each must
be killed (a test fails). Usage: python scripts/mutate_ops.py [M1 M5 ...] (default: all). Restores
every file it touches, also on Ctrl-C. The runner is scripts/mutate.py's run_mutant."""
import sys

from mutate import run_mutant

mutants = [
 ("M1 output layout ignores stride-0 (old _empty_in_layout_of)", "kernels/attention.py",
  "    order = sorted(range(last), key=outer_first) + [last]", "    order = sorted(range(t.dim()), key=lambda i: (-t.stride(i), i))", "tests/adversarial/test_ops_attention.py"),
 ("M2 forward reads padding values", "kernels/attention.py",
  "        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)\n        acc",
  "        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=n_valid[:, None] & d_valid[None, :], other=0.0)\n        acc", "tests/adversarial/test_ops_attention.py"),
 ("M3 SDPA fallback: NaN query row to 0", "collat/ops/attention.py",
  "        return out + 0 * q.sum(dim=-1, keepdim=True)", "        return out", "tests/adversarial/test_ops_attention.py"),
 ("M4 SDPA fallback: padding keys not zeroed", "collat/ops/attention.py",
  "    k, v = k.masked_fill(padding, 0), v.masked_fill(padding, 0)\n    # SDPA gives", "    # SDPA gives", "tests/adversarial/test_ops_attention.py"),
 ("M5 token_l1: ticket not zeroed by the prepare kernel", "kernels/token_l1.py",
  "        tl.store(counter_ptr, 0)", "        pass", "tests/adversarial/test_ops_token_l1.py"),
 ("M6 token_l1: target read for invalid entries", "kernels/token_l1.py",
  "            y = tl.load(target_rows_ptr[:, None] + cols[None, :] * stride_td, mask=load_mask, other=0.0)",
  "            y = tl.load(target_rows_ptr[:, None] + cols[None, :] * stride_td, mask=is_target_row[:, None] & col_ok[None, :], other=0.0)", "tests/adversarial/test_ops_token_l1.py"),
 ("M7 token_l1: matched flags not cleared (reused workspace)", "kernels/token_l1.py",
  "            tl.store(flags_row_ptr + rows, tl.zeros([BLOCK_I], dtype=tl.float32), mask=rows < Np)", "            pass", "tests/adversarial/test_ops_token_l1.py"),
 ("M8 matching: no range check of lengths", "collat/ops/matching.py",
  "        if low < 0 or high > N:", "        if False:", "tests/adversarial/test_ops_matching.py"),
 ("M9 attention: tickets kept after an interrupted launch", "kernels/attention.py",
  "            tickets.zero_()", "            pass", "tests/adversarial/test_ops_attention.py"),
 ("M10 reference greedy: NaN wins argmin", "collat/ops/reference.py",
  "    dist = pairwise_distance(target, pred, metric).nan_to_num(nan=math.inf, posinf=math.inf)", "    dist = pairwise_distance(target, pred, metric)", "tests/adversarial/test_ops_matching.py"),
 ("M11 reference token_l1: out-of-range perm entries counted", "collat/ops/reference.py",
  "    valid = (perm >= 0) & (perm < num_pred)", "    valid = perm >= 0", "tests/adversarial/test_ops_token_l1.py"),
 ("M12 reference attention: padding values read", "collat/ops/reference.py",
  "        k, v = k.masked_fill(padding, 0), v.masked_fill(padding, 0)\n", "", "tests/adversarial/test_ops_attention.py"),
 ("M13 attention empties: Nk=0 not handled in the reference", "collat/ops/reference.py",
  "    if k.shape[-2] == 0:\n        return torch.matmul(scores, v)  # no keys: zeros [B, H, Nq, d]\n", "", "tests/adversarial/test_ops_attention.py"),
]
only = sys.argv[1:]
for mutant in mutants:
    if only and mutant[0].split()[0] not in only:
        continue
    record = run_mutant(*mutant)
    print(f"{record['name']}: {'KILLED' if record['killed'] else 'SURVIVED'} ({record['summary']}) {record['by'][:2]}",
          flush=True)
