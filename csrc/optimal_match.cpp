// CPU kernel of collat::optimal_match: per item (in parallel over the batch), the [L, N] fp32
// distance matrix, then an exact rectangular assignment of the L valid rows to distinct columns:
// a row and column reduction when it is (nearly) square, Jonker-Volgenant's augmenting row
// reduction, which assigns most rows, then a shortest augmenting path for each row left (Crouse
// 2016, the algorithm behind scipy's linear_sum_assignment), with the potentials in double (costs
// stay fp32: they are exact in double). Row scans are vectorised (AVX2, 4 doubles). A Dijkstra step
// settles the cheapest column by path cost, a free column before an assigned one on ties, then the
// smaller index. Under exact ties the perm may differ from the CUDA kernel's (which has no
// augmenting row reduction); the total cost does not.
#include <cfloat>
#include <limits>
#include <numeric>
#include <vector>

#include "matching_cpu.h"

namespace collat {
namespace {

constexpr int64_t kSolverLanes = 4;  // doubles per AVX2 vector

inline float solver_cost(float x) {
  if (x != x) return FLT_MAX;  // NaN: worst finite cost keeps the problem feasible
  return x > FLT_MAX ? FLT_MAX : (x < -FLT_MAX ? -FLT_MAX : x);
}

struct AssignmentScratch {
  std::vector<double> u, v;       // row [L] and column [Nc] potentials
  std::vector<double> path_cost;  // [Nc] shortest path cost to each column in the current search
  std::vector<int64_t> path;      // [Nc] row preceding each column on its shortest path
  std::vector<int64_t> done;      // [Nc] all bits set once the column is settled in the current search
  std::vector<int64_t> row4col;   // [Nc] row assigned to each column, -1 if none
  std::vector<int64_t> col4row;   // [L] column assigned to each row, -1 if none
  std::vector<int64_t> seen_rows, done_cols;  // what the current search touched
  std::vector<int64_t> todo, later;           // augmenting row reduction: rows to (re)assign
};

// Relaxes every unsettled column through row i (shift = path cost to row i minus u_i) and returns
// the lowest path cost among the unsettled columns.
__attribute__((target("avx2"))) double relax_row_avx2(const float* cost, double shift, int64_t i, int64_t Nc,
                                                      AssignmentScratch& s) {
  const __m256d shift_v = _mm256_set1_pd(shift);
  const __m256d inf_v = _mm256_set1_pd(std::numeric_limits<double>::infinity());
  const __m256d row_v = _mm256_castsi256_pd(_mm256_set1_epi64x(i));
  const double* __restrict v = s.v.data();
  const double* __restrict done_bits = reinterpret_cast<const double*>(s.done.data());
  double* __restrict path_cost = s.path_cost.data();
  double* __restrict path = reinterpret_cast<double*>(s.path.data());
  __m256d lowest_v = inf_v;
  for (int64_t c = 0; c < Nc; c += kSolverLanes) {
    const __m256d reduced =
        _mm256_add_pd(_mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(cost + c)), _mm256_loadu_pd(v + c)), shift_v);
    const __m256d done = _mm256_loadu_pd(done_bits + c);
    const __m256d old = _mm256_loadu_pd(path_cost + c);
    const __m256d better = _mm256_andnot_pd(done, _mm256_cmp_pd(reduced, old, _CMP_LT_OQ));
    const __m256d updated = _mm256_blendv_pd(old, reduced, better);
    _mm256_storeu_pd(path_cost + c, updated);
    _mm256_storeu_pd(path + c, _mm256_blendv_pd(_mm256_loadu_pd(path + c), row_v, better));
    lowest_v = _mm256_min_pd(lowest_v, _mm256_blendv_pd(updated, inf_v, done));
  }
  const __m128d half = _mm_min_pd(_mm256_castpd256_pd128(lowest_v), _mm256_extractf128_pd(lowest_v, 1));
  return std::min(_mm_cvtsd_f64(half), _mm_cvtsd_f64(_mm_unpackhi_pd(half, half)));
}

double relax_row_generic(const float* cost, double shift, int64_t i, int64_t Nc, AssignmentScratch& s) {
  double lowest = std::numeric_limits<double>::infinity();
  for (int64_t c = 0; c < Nc; ++c) {
    if (s.done[c]) continue;
    const double reduced = (cost[c] - s.v[c]) + shift;
    if (reduced < s.path_cost[c]) {
      s.path_cost[c] = reduced;
      s.path[c] = i;
    }
    lowest = std::min(lowest, s.path_cost[c]);
  }
  return lowest;
}

// The unsettled column whose path cost is `lowest`: a free one first, then the smallest index.
__attribute__((target("avx2"))) int64_t settle_column_avx2(double lowest, int64_t Nc, const AssignmentScratch& s) {
  const __m256d lowest_v = _mm256_set1_pd(lowest);
  const double* done_bits = reinterpret_cast<const double*>(s.done.data());
  const double* path_cost = s.path_cost.data();
  int64_t best = -1;
  for (int64_t c = 0; c < Nc; c += kSolverLanes) {
    const __m256d done = _mm256_loadu_pd(done_bits + c);
    int mask = _mm256_movemask_pd(
        _mm256_andnot_pd(done, _mm256_cmp_pd(_mm256_loadu_pd(path_cost + c), lowest_v, _CMP_EQ_OQ)));
    while (mask) {
      const int64_t col = c + __builtin_ctz(mask);
      if (s.row4col[col] < 0) return col;
      if (best < 0) best = col;
      mask &= mask - 1;
    }
  }
  return best;
}

int64_t settle_column_generic(double lowest, int64_t N, const AssignmentScratch& s) {
  int64_t best = -1;
  for (int64_t c = 0; c < N; ++c) {
    if (s.done[c] || s.path_cost[c] != lowest) continue;
    if (s.row4col[c] < 0) return c;
    if (best < 0) best = c;
  }
  return best;
}

struct TwoSmallest {
  double first_value, second_value;
  int64_t first, second;  // columns; second = -1 when N == 1
};

// Keeps the two smallest (value, column) pairs offered, in lexicographic order.
inline void offer(TwoSmallest& t, double x, int64_t c) {
  if (t.first < 0 || x < t.first_value || (x == t.first_value && c < t.first)) {
    t.second_value = t.first_value;
    t.second = t.first;
    t.first_value = x;
    t.first = c;
  } else if (t.second < 0 || x < t.second_value || (x == t.second_value && c < t.second)) {
    t.second_value = x;
    t.second = c;
  }
}

// The two smallest reduced costs cost[c] - v[c] of a row, c < N (ties to the smaller column).
__attribute__((target("avx2"))) TwoSmallest two_smallest_avx2(const float* cost, int64_t N, const double* v) {
  const double inf = std::numeric_limits<double>::infinity();
  TwoSmallest t{inf, inf, -1, -1};
  const int64_t N4 = N / kSolverLanes * kSolverLanes;
  if (N4 > 0) {
    // Per lane, the two smallest so far; strict comparisons keep the earlier column on ties.
    __m256d m1 = _mm256_set1_pd(inf), m2 = m1;
    __m256d i1 = _mm256_castsi256_pd(_mm256_set1_epi64x(-1)), i2 = i1;
    __m256i index = _mm256_setr_epi64x(0, 1, 2, 3);
    const __m256i step = _mm256_set1_epi64x(kSolverLanes);
    for (int64_t c = 0; c < N4; c += kSolverLanes) {
      const __m256d x = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(cost + c)), _mm256_loadu_pd(v + c));
      const __m256d idx = _mm256_castsi256_pd(index);
      const __m256d below1 = _mm256_cmp_pd(x, m1, _CMP_LT_OQ), below2 = _mm256_cmp_pd(x, m2, _CMP_LT_OQ);
      m2 = _mm256_blendv_pd(_mm256_blendv_pd(m2, x, below2), m1, below1);
      i2 = _mm256_blendv_pd(_mm256_blendv_pd(i2, idx, below2), i1, below1);
      m1 = _mm256_blendv_pd(m1, x, below1);
      i1 = _mm256_blendv_pd(i1, idx, below1);
      index = _mm256_add_epi64(index, step);
    }
    alignas(32) double first_values[4], second_values[4];
    alignas(32) int64_t firsts[4], seconds[4];
    _mm256_store_pd(first_values, m1);
    _mm256_store_pd(second_values, m2);
    _mm256_store_pd(reinterpret_cast<double*>(firsts), i1);
    _mm256_store_pd(reinterpret_cast<double*>(seconds), i2);
    for (int lane = 0; lane < kSolverLanes; ++lane) {
      if (firsts[lane] >= 0) offer(t, first_values[lane], firsts[lane]);
      if (seconds[lane] >= 0) offer(t, second_values[lane], seconds[lane]);
    }
  }
  for (int64_t c = N4; c < N; ++c) offer(t, cost[c] - v[c], c);
  return t;
}

TwoSmallest two_smallest_generic(const float* cost, int64_t N, const double* v) {
  const double inf = std::numeric_limits<double>::infinity();
  TwoSmallest t{inf, inf, -1, -1};
  for (int64_t c = 0; c < N; ++c) offer(t, cost[c] - v[c], c);
  return t;
}

inline TwoSmallest two_smallest(const float* cost, int64_t N, const AssignmentScratch& s) {
  return cpu::cpu_has_avx2() ? two_smallest_avx2(cost, N, s.v.data()) : two_smallest_generic(cost, N, s.v.data());
}

// Jonker-Volgenant's augmenting row reduction, kept valid for rectangular problems: each free row
// takes its cheapest column j1 (lowering v[j1] by the gap to its second cheapest, so every reduced
// cost stays >= 0) and evicts j1's row, which tries again. Columns never become free, so when L < N,
// where v starts at 0, the free columns keep v = 0. Leaves u tight on the assigned rows; the rows
// still free go to the shortest augmenting paths.
void augmenting_row_reduction(const float* cost, int64_t stride, int64_t L, int64_t N, AssignmentScratch& s) {
  s.todo.resize(L);
  std::iota(s.todo.begin(), s.todo.end(), int64_t(0));
  // Progress is certain only in exact arithmetic, and late steps shuffle tiny gaps: bound the work
  // (3 steps a row measured best at B=256, N=L=77 from v = 0; after the square start of
  // start_potentials, 1 to 3 measured alike). Rows left free go to the augmenting paths.
  int64_t budget = 3 * L + 16;
  for (int pass = 0; pass < 2 && !s.todo.empty(); ++pass) {
    s.later.clear();
    for (size_t k = 0; k < s.todo.size() && budget > 0; --budget) {
      const int64_t i = s.todo[k++];
      const TwoSmallest t = two_smallest(cost + i * stride, N, s);
      int64_t j = t.first;
      int64_t evicted = s.row4col[j];
      const bool gap = t.second >= 0 && t.first_value < t.second_value;
      if (gap) {
        s.v[j] -= t.second_value - t.first_value;
      } else if (evicted >= 0 && t.second >= 0) {
        j = t.second;  // a tie: prefer the other cheapest column, if it is free nobody gets evicted
        evicted = s.row4col[j];
      }
      s.row4col[j] = i;
      s.col4row[i] = j;
      s.u[i] = cost[i * stride + j] - s.v[j];
      if (evicted >= 0) {
        s.col4row[evicted] = -1;
        if (gap)
          s.todo[--k] = evicted;  // retry at once: v[j] moved, so it will not simply take j again
        else
          s.later.push_back(evicted);
      }
    }
    s.todo.swap(s.later);
  }
}

// Rows the solver works on: L, or N when N - L <= N / 16 (dummy rows, see start_potentials). The
// CUDA solver pads up to N / 8 missing rows; here the augmenting row reduction already does well
// on rectangular problems: at B = 256, N = 77, D = 512 (1 thread) padding took 51.9 rather than
// 58.2 ms at L = 76, about the same at L = 72, and 48.6 rather than 46.3 ms at L = 68.
inline int64_t solver_rows(int64_t L, int64_t N) { return N - L <= N / 16 ? N : L; }

// Square and nearly square problems start from a row then a column reduction, as Jonker-Volgenant
// do: u_i = min_c cost(i, c), v_c = min_i (cost(i, c) - u_i); every reduced cost stays >= 0 and the
// augmenting row reduction and the paths have far less left to do. A rectangular problem cannot
// start so (a column left unassigned must keep v = 0), but one with few rows missing is made square by
// dummy rows of equal cost, the largest real one: every full assignment pays it once per dummy row,
// so the real rows' optimum is the same (optimal_match_cuda.cu, start_potentials, says more).
// dist has `rows` rows of `stride`; rows L .. rows - 1 are written here. Otherwise u and v stay 0.
void start_potentials(float* dist, int64_t stride, int64_t rows, int64_t L, int64_t N, AssignmentScratch& s) {
  if (rows != N) return;
  float highest = -FLT_MAX;
  for (int64_t r = 0; r < L; ++r) {
    const float* row = dist + r * stride;
    float lowest = row[0];
    for (int64_t c = 0; c < N; ++c) {
      lowest = row[c] < lowest ? row[c] : lowest;
      highest = row[c] > highest ? row[c] : highest;
    }
    s.u[r] = lowest;
  }
  for (int64_t r = L; r < N; ++r) std::fill(dist + r * stride, dist + r * stride + N, highest);
  for (int64_t c = 0; c < N; ++c) s.v[c] = double(dist[c]) - s.u[0];
  for (int64_t r = 1; r < N; ++r) {
    const float* row = dist + r * stride;
    for (int64_t c = 0; c < N; ++c) {
      const double reduced = double(row[c]) - s.u[r];
      s.v[c] = reduced < s.v[c] ? reduced : s.v[c];
    }
  }
}

// Assigns rows 0 .. rows - 1 of dist ([rows, stride], first N columns used, stride >= N rounded up
// to 4; rows = solver_rows(L, N)) to distinct columns; out[j] = column for j < L. dist is sanitised in
// place (NaN, +-inf), its dummy rows written, and its padding columns set to +inf, which no path
// ever takes.
void solve_assignment(float* dist, int64_t rows, int64_t L, int64_t N, int64_t stride, AssignmentScratch& s,
                      int64_t* out) {
  const double inf = std::numeric_limits<double>::infinity();
  const int64_t Nc = cpu::round_up(N, kSolverLanes);
  TORCH_INTERNAL_ASSERT(stride >= Nc);
  s.u.assign(rows, 0.0);
  s.v.assign(Nc, 0.0);
  s.path_cost.resize(Nc);
  s.path.assign(Nc, -1);
  s.done.assign(Nc, 0);
  s.row4col.assign(Nc, -1);
  s.col4row.assign(rows, -1);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = dist + r * stride;
    if (r < L)
      for (int64_t c = 0; c < N; ++c) row[c] = solver_cost(row[c]);
    for (int64_t c = N; c < Nc; ++c) row[c] = std::numeric_limits<float>::infinity();
  }
  start_potentials(dist, stride, rows, L, N, s);
  augmenting_row_reduction(dist, stride, rows, N, s);
  const bool avx2 = cpu::cpu_has_avx2();
  for (int64_t cur = 0; cur < rows; ++cur) {
    if (s.col4row[cur] >= 0) continue;
    s.u[cur] = two_smallest(dist + cur * stride, N, s).first_value;
    std::fill(s.path_cost.begin(), s.path_cost.end(), inf);
    s.seen_rows.clear();
    s.done_cols.clear();
    double min_value = 0.0;
    int64_t i = cur, sink = -1;
    while (sink < 0) {
      s.seen_rows.push_back(i);
      const float* row = dist + i * stride;
      const double shift = min_value - s.u[i];
      const double lowest = avx2 ? relax_row_avx2(row, shift, i, Nc, s) : relax_row_generic(row, shift, i, Nc, s);
      const int64_t best = avx2 ? settle_column_avx2(lowest, Nc, s) : settle_column_generic(lowest, N, s);
      min_value = lowest;
      s.done[best] = -1;
      s.done_cols.push_back(best);
      if (s.row4col[best] < 0)
        sink = best;
      else
        i = s.row4col[best];
    }
    // Dual update (every reduced cost stays >= 0, zero along the new assignment), then augment.
    s.u[cur] += min_value;
    for (const int64_t r : s.seen_rows)
      if (r != cur) s.u[r] += min_value - s.path_cost[s.col4row[r]];
    for (const int64_t c : s.done_cols) {
      s.v[c] -= min_value - s.path_cost[c];
      s.done[c] = 0;
    }
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
  cpu::for_each_item(pred, target, lengths, metric, [&](int64_t b, int64_t L, const cpu::PackedItem* item) {
    if (L == 0) return;
    const int64_t stride = cpu::full_distances(*item), rows = solver_rows(L, N);
    item->s->dist.resize(rows * stride);
    thread_local AssignmentScratch scratch;
    solve_assignment(item->s->dist.data(), rows, L, N, stride, scratch, perm_ptr + b * N);
  });
  return perm;
}

}  // namespace

TORCH_LIBRARY_IMPL(collat, CPU, m) { m.impl("optimal_match", &optimal_match_cpu); }

}  // namespace collat
