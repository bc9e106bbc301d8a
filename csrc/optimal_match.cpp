// CPU kernel of collat::optimal_match: per item (in parallel over the batch), the [L, N] fp32
// distance matrix, then an exact rectangular assignment of the L valid rows to distinct columns by
// shortest augmenting paths (Crouse 2016, the algorithm behind scipy's linear_sum_assignment), with
// the potentials in double. The column choice breaks ties by (reduced cost, already-assigned column
// last, smaller index), the same rule the CUDA warp uses, so both backends return the same perm.
#include <cfloat>
#include <limits>
#include <vector>

#include "matching_cpu.h"

namespace collat {
namespace {

inline double solver_cost(float x) {
  if (x != x) return FLT_MAX;  // NaN: worst finite cost keeps the problem feasible
  return x > FLT_MAX ? FLT_MAX : (x < -FLT_MAX ? -FLT_MAX : x);
}

struct AssignmentScratch {
  std::vector<double> u, v, path_cost;
  std::vector<int64_t> path, row4col, col4row;
  std::vector<char> row_seen, col_done;
};

// Assigns rows 0..L-1 of dist ([L, Np], first N columns used) to distinct columns; out[j] = column.
void solve_assignment(const float* dist, int64_t L, int64_t N, int64_t Np, AssignmentScratch& s, int64_t* out) {
  const double inf = std::numeric_limits<double>::infinity();
  s.u.assign(L, 0.0);
  s.v.assign(N, 0.0);
  s.path_cost.resize(N);
  s.path.assign(N, -1);
  s.row4col.assign(N, -1);
  s.col4row.assign(L, -1);
  s.row_seen.resize(L);
  s.col_done.resize(N);
  for (int64_t cur = 0; cur < L; ++cur) {
    std::fill(s.path_cost.begin(), s.path_cost.end(), inf);
    std::fill(s.row_seen.begin(), s.row_seen.end(), 0);
    std::fill(s.col_done.begin(), s.col_done.end(), 0);
    double min_value = 0.0;
    int64_t i = cur, sink = -1;
    while (sink < 0) {
      s.row_seen[i] = 1;
      const double u_i = s.u[i];
      const float* row = dist + i * Np;
      int64_t best = -1;
      double lowest = inf;
      bool lowest_assigned = true;
      for (int64_t c = 0; c < N; ++c) {
        if (s.col_done[c]) continue;
        const double reduced = min_value + solver_cost(row[c]) - u_i - s.v[c];
        if (reduced < s.path_cost[c]) {
          s.path[c] = i;
          s.path_cost[c] = reduced;
        }
        const double pc = s.path_cost[c];
        const bool assigned = s.row4col[c] >= 0;
        if (best < 0 || pc < lowest || (pc == lowest && !assigned && lowest_assigned)) {
          best = c;
          lowest = pc;
          lowest_assigned = assigned;
        }
      }
      min_value = lowest;
      s.col_done[best] = 1;
      if (s.row4col[best] < 0)
        sink = best;
      else
        i = s.row4col[best];
    }
    s.u[cur] += min_value;
    for (int64_t r = 0; r < L; ++r)
      if (s.row_seen[r] && r != cur) s.u[r] += min_value - s.path_cost[s.col4row[r]];
    for (int64_t c = 0; c < N; ++c)
      if (s.col_done[c]) s.v[c] -= min_value - s.path_cost[c];
    for (int64_t c = sink;;) {
      const int64_t r = s.path[c];
      s.row4col[c] = r;
      std::swap(s.col4row[r], c);
      if (r == cur) break;
    }
  }
  for (int64_t r = 0; r < L; ++r) out[r] = s.col4row[r];
}

at::Tensor optimal_match_cpu(const at::Tensor& pred_in, const at::Tensor& target_in, const at::Tensor& lengths,
                             c10::string_view metric_name) {
  check_match_inputs("optimal_match", pred_in, target_in, lengths);
  const Metric metric = parse_metric(std::string(metric_name));
  const at::Tensor pred = pred_in.contiguous(), target = target_in.contiguous();
  const int64_t B = pred.size(0), N = pred.size(1);
  at::Tensor perm = at::full({B, N}, -1, pred.options().dtype(at::kLong));
  if (B == 0 || N == 0) return perm;
  int64_t* perm_ptr = perm.data_ptr<int64_t>();
  cpu::for_each_item(pred, target, lengths, metric, [&](int64_t b, int64_t L, const float* dist, int64_t Np) {
    if (L == 0) return;
    thread_local AssignmentScratch scratch;
    solve_assignment(dist, L, N, Np, scratch, perm_ptr + b * N);
  });
  return perm;
}

}  // namespace

TORCH_LIBRARY_IMPL(collat, CPU, m) { m.impl("optimal_match", &optimal_match_cpu); }

}  // namespace collat
