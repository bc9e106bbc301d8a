// CPU kernel of collat::greedy_match (docs/design.md §2), in parallel over the batch.
//
// Per item, text rows are taken right to left in groups of 8 (matching_cpu.h): the group's
// distances to the predicted rows still free are computed together, then its rows choose one after
// another, and the chosen rows leave the list. A row is thus compared with at most 7 taken rows;
// the full [L, N] matrix, about twice the arithmetic, is never built. Each distance is computed
// exactly as in the full matrix, so the perm is the same.
#include <limits>

#include "matching_cpu.h"

namespace collat {
namespace {

void greedy_item(const cpu::PackedItem& item, int64_t* out) {
  cpu::ItemScratch& s = *item.s;
  int64_t n_free = item.N;  // s.live[0, n_free): untaken predicted rows, ascending
  for (int64_t g = 0; g < cpu::group_count(item); ++g) {
    cpu::group_block_distances(item, g, n_free);
    s.chosen.assign(n_free, 0);
    const int64_t hi = cpu::group_top(item.L, g), size = cpu::group_size(item.L, g);
    for (int64_t l = 0; l < size; ++l) {
      const float* dist = s.group_dist.data() + l;
      int64_t best = -1;
      float best_value = std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < n_free; ++c) {
        if (s.chosen[c]) continue;
        const float v = dist[c * cpu::kLanes];
        const float value = v != v ? std::numeric_limits<float>::infinity() : v;
        if (best < 0 || value < best_value) {  // strict, and the list ascends: ties keep the smaller index
          best = c;
          best_value = value;
        }
      }
      s.chosen[best] = 1;
      out[hi - l] = s.live[best];
    }
    int64_t kept = 0;
    for (int64_t c = 0; c < n_free; ++c) {
      if (s.chosen[c]) continue;
      s.live[kept] = s.live[c];
      s.live_rows[kept] = s.live_rows[c];
      ++kept;
    }
    n_free = kept;
  }
}

at::Tensor greedy_match_cpu(const at::Tensor& pred_in, const at::Tensor& target_in, const at::Tensor& lengths,
                            c10::string_view metric_name) {
  check_match_inputs("greedy_match", pred_in, target_in, lengths);
  const Metric metric = parse_metric(std::string(metric_name));
  const at::Tensor pred = pred_in.contiguous(), target = target_in.contiguous();
  const int64_t B = pred.size(0), N = pred.size(1);
  at::Tensor perm = at::full({B, N}, -1, pred.options().dtype(at::kLong));
  if (B == 0 || N == 0) return perm;
  int64_t* perm_ptr = perm.data_ptr<int64_t>();
  cpu::for_each_item(pred, target, lengths, metric, [&](int64_t b, int64_t L, const cpu::PackedItem* item) {
    if (L > 0) greedy_item(*item, perm_ptr + b * N);
  });
  return perm;
}

}  // namespace

TORCH_LIBRARY_IMPL(collat, CPU, m) { m.impl("greedy_match", &greedy_match_cpu); }

}  // namespace collat
