// CPU kernel of collat::greedy_match: per item (in parallel over the batch), the [L, N] fp32
// distance matrix once, then the right-to-left greedy choice (DESIGN.md section 2).
#include <limits>
#include <vector>

#include "matching_cpu.h"

namespace collat {
namespace {

at::Tensor greedy_match_cpu(const at::Tensor& pred_in, const at::Tensor& target_in, const at::Tensor& lengths,
                            c10::string_view metric_name) {
  check_match_inputs("greedy_match", pred_in, target_in, lengths);
  const Metric metric = parse_metric(std::string(metric_name));
  const at::Tensor pred = pred_in.contiguous(), target = target_in.contiguous();
  const int64_t B = pred.size(0), N = pred.size(1);
  at::Tensor perm = at::full({B, N}, -1, pred.options().dtype(at::kLong));
  if (B == 0 || N == 0) return perm;
  int64_t* perm_ptr = perm.data_ptr<int64_t>();
  cpu::for_each_item(pred, target, lengths, metric, [&](int64_t b, int64_t L, const float* dist, int64_t Np) {
    std::vector<char> taken(N, 0);
    int64_t* out = perm_ptr + b * N;
    for (int64_t j = L - 1; j >= 0; --j) {
      const float* row = dist + j * Np;
      int64_t best = -1;
      float best_value = std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < N; ++i) {
        if (taken[i]) continue;
        const float v = row[i] != row[i] ? std::numeric_limits<float>::infinity() : row[i];
        if (best < 0 || v < best_value) {  // strict: ties keep the smaller index
          best = i;
          best_value = v;
        }
      }
      taken[best] = 1;
      out[j] = best;
    }
  });
  return perm;
}

}  // namespace

TORCH_LIBRARY_IMPL(collat, CPU, m) { m.impl("greedy_match", &greedy_match_cpu); }

}  // namespace collat
