// CPU building blocks of the matching kernels, shared by greedy_match.cpp and optimal_match.cpp.
//
// One batch item at a time. Text rows are taken in groups of 8 from the right (the greedy order)
// and packed as panels [D, 8], one text row per vector lane; predicted rows stay as they are
// ([N, D], no copy for fp32) and are broadcast. Distances thus vectorise across text rows, never
// across d: each lane keeps its own sequential fp32 sum over d, bit-identical to a scalar loop and
// to the CUDA kernel (matching_common.h). The compiler never fuses: the AVX2 clones are compiled
// with target("avx2") only (no "fma"), and setup.py enables no FMA ISA elsewhere. The one FMA is
// written by hand: t - p as fma(-p, 1, t), which is exact (p * 1 needs no rounding), so it rounds
// like the subtraction, but runs on the multiply pipes and leaves the add pipes to the sums.
//
// The greedy kernel compares a group only with the predicted rows still free (a list, so nothing
// is moved when rows get taken): about half the arithmetic of the full [L, N] matrix.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "matching_common.h"

namespace collat {
namespace cpu {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

constexpr int kLanes = 8;      // text rows per group (one vector)
constexpr int kPredBlock = 8;  // predicted rows sharing one load of a text panel

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Whether the AVX2 (+ FMA) code paths run. COLLAT_CPU_GENERIC=1 forces the portable ones, so that
// tests cover them on AVX2 machines.
inline bool cpu_has_avx2() {
  static const bool has = [] {
    const char* generic = std::getenv("COLLAT_CPU_GENERIC");
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           !(generic != nullptr && std::string(generic) == "1");
  }();
  return has;
}

// Per-thread scratch, reused across the items a thread handles.
struct ItemScratch {
  std::vector<float> target_rows, pred_rows;  // fp32 copies of half/bf16 inputs
  std::vector<float> zeros;                   // [D]: the text row of padding lanes
  std::vector<float> panel;                   // [D, 8]: one group of text rows
  std::vector<float> group_dist;              // [n, 8]: distance of each listed predicted row to each lane
  std::vector<float> dist;                    // optimal: the full [L, stride] matrix
  std::vector<float> target_norm, pred_norm;  // cosine only
  std::vector<int32_t> live;                  // predicted rows to compare with, ascending
  std::vector<const float*> live_rows;        // their addresses
  std::vector<uint8_t> chosen;                // greedy: listed rows taken by the current group
};

// ---------------------------------------------------------------------------------------------
// Distances of one group (8 text lanes) to a list of predicted rows.

// Vectors travel by reference: by value they would change the ABI of the non-AVX clone (-Wpsabi).
// kFma (AVX2 clone only): p is overwritten with t - p by the exact hand-written FMA.
template <Metric M, bool kFma>
__attribute__((always_inline)) inline void accumulate(v8f& acc, const v8f& t, v8f& p) {
  if constexpr (M == Metric::L1 && kFma) {
    const v8f one = {1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f};
    asm("vfnmadd213ps %[t], %[one], %[p]" : [p] "+x"(p) : [one] "x"(one), [t] "x"(t));  // p = t - 1 * p
    const v8f abs_diff = (v8f)((v8i)p & 0x7fffffff);
    acc = acc + abs_diff;
  } else if constexpr (M == Metric::L1) {
    const v8f diff = t - p;
    const v8f abs_diff = (v8f)((v8i)diff & 0x7fffffff);
    acc = acc + abs_diff;
  } else if constexpr (M == Metric::L2) {
    const v8f diff = t - p;
    const v8f sq = diff * diff;
    acc = acc + sq;
  } else {
    const v8f prod = t * p;
    acc = acc + prod;
  }
}

// out[r * 8 + lane] for R predicted rows and the 8 lanes of panel ([D, 8]).
template <Metric M, bool kFma, int R>
__attribute__((always_inline)) inline void group_tile(const float* panel, int64_t D, const float* const* rows,
                                                      float* out) {
  v8f acc[R];
  for (int r = 0; r < R; ++r) acc[r] = v8f{};
  for (int64_t k = 0; k < D; ++k) {
    v8f t;
    std::memcpy(&t, panel + k * kLanes, sizeof(v8f));
    for (int r = 0; r < R; ++r) {
      const float x = rows[r][k];
      v8f p = {x, x, x, x, x, x, x, x};
      accumulate<M, kFma>(acc[r], t, p);
    }
  }
  for (int r = 0; r < R; ++r) std::memcpy(out + r * kLanes, &acc[r], sizeof(v8f));
}

template <Metric M, bool kFma>
__attribute__((always_inline)) inline void group_distances(const float* panel, int64_t D, const float* const* rows,
                                                           int64_t n, float* out) {
  int64_t c = 0;
  for (; c + kPredBlock <= n; c += kPredBlock) group_tile<M, kFma, kPredBlock>(panel, D, rows + c, out + c * kLanes);
  rows += c;
  out += c * kLanes;
  switch (n - c) {
    case 7: group_tile<M, kFma, 7>(panel, D, rows, out); break;
    case 6: group_tile<M, kFma, 6>(panel, D, rows, out); break;
    case 5: group_tile<M, kFma, 5>(panel, D, rows, out); break;
    case 4: group_tile<M, kFma, 4>(panel, D, rows, out); break;
    case 3: group_tile<M, kFma, 3>(panel, D, rows, out); break;
    case 2: group_tile<M, kFma, 2>(panel, D, rows, out); break;
    case 1: group_tile<M, kFma, 1>(panel, D, rows, out); break;
    default: break;
  }
}

template <Metric M>
__attribute__((target("avx2"))) void group_distances_avx2(const float* panel, int64_t D, const float* const* rows,
                                                         int64_t n, float* out) {
  group_distances<M, true>(panel, D, rows, n, out);
}

template <Metric M>
void group_distances_generic(const float* panel, int64_t D, const float* const* rows, int64_t n, float* out) {
  group_distances<M, false>(panel, D, rows, n, out);
}

template <Metric M>
void dispatch_group_distances(const float* panel, int64_t D, const float* const* rows, int64_t n, float* out) {
  if (cpu_has_avx2())
    group_distances_avx2<M>(panel, D, rows, n, out);
  else
    group_distances_generic<M>(panel, D, rows, n, out);
}

// Sequential sum of squares of one row (same order as the CUDA kernel).
inline float row_square_sum(const float* x, int64_t D) {
  float acc = 0.f;
  for (int64_t k = 0; k < D; ++k) {
    const float sq = x[k] * x[k];
    acc = acc + sq;
  }
  return acc;
}

// ---------------------------------------------------------------------------------------------
// Packing a group: panel[k * 8 + lane] = rows[lane][k] (an 8 x 8 block transpose per 8 values of d).

// Values d >= k_begin only (the AVX2 version's tail).
inline void pack_panel_generic(const float* const* rows, int64_t D, float* panel, int64_t k_begin = 0) {
  for (int64_t k = k_begin; k < D; ++k)
    for (int lane = 0; lane < 8; ++lane) panel[k * 8 + lane] = rows[lane][k];
}

__attribute__((target("avx2"))) inline void pack_panel_avx2(const float* const* rows, int64_t D, float* panel) {
  const int64_t D8 = D / 8 * 8;
  for (int64_t k0 = 0; k0 < D8; k0 += 8) {
    __m256 r[8], a[8], b[8];
    for (int q = 0; q < 8; ++q) r[q] = _mm256_loadu_ps(rows[q] + k0);
    for (int q = 0; q < 8; q += 2) {
      a[q] = _mm256_unpacklo_ps(r[q], r[q + 1]);
      a[q + 1] = _mm256_unpackhi_ps(r[q], r[q + 1]);
    }
    for (int q = 0; q < 8; q += 4) {
      b[q] = _mm256_shuffle_ps(a[q], a[q + 2], _MM_SHUFFLE(1, 0, 1, 0));
      b[q + 1] = _mm256_shuffle_ps(a[q], a[q + 2], _MM_SHUFFLE(3, 2, 3, 2));
      b[q + 2] = _mm256_shuffle_ps(a[q + 1], a[q + 3], _MM_SHUFFLE(1, 0, 1, 0));
      b[q + 3] = _mm256_shuffle_ps(a[q + 1], a[q + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int q = 0; q < 4; ++q) {
      _mm256_storeu_ps(panel + (k0 + q) * 8, _mm256_permute2f128_ps(b[q], b[q + 4], 0x20));
      _mm256_storeu_ps(panel + (k0 + q + 4) * 8, _mm256_permute2f128_ps(b[q], b[q + 4], 0x31));
    }
  }
  pack_panel_generic(rows, D, panel, D8);
}

// ---------------------------------------------------------------------------------------------
// One batch item, packed: fp32 text and predicted rows, the list of predicted rows, norms for cosine.

struct PackedItem {
  const float* target;  // [L, D] fp32
  const float* pred;    // [N, D] fp32
  int64_t L, N, D;
  Metric metric;
  ItemScratch* s;
};

template <typename scalar_t>
PackedItem pack_item(const scalar_t* pred, const scalar_t* target, int64_t L, int64_t N, int64_t D, Metric metric,
                     ItemScratch& s) {
  PackedItem item{nullptr, nullptr, L, N, D, metric, &s};
  if constexpr (std::is_same_v<scalar_t, float>) {
    item.target = target;
    item.pred = pred;
  } else {
    s.target_rows.resize(L * D);
    s.pred_rows.resize(N * D);
    for (int64_t j = 0; j < L * D; ++j) s.target_rows[j] = static_cast<float>(target[j]);
    for (int64_t j = 0; j < N * D; ++j) s.pred_rows[j] = static_cast<float>(pred[j]);
    item.target = s.target_rows.data();
    item.pred = s.pred_rows.data();
  }
  if (static_cast<int64_t>(s.zeros.size()) != D) s.zeros.assign(D, 0.f);
  s.panel.resize(D * kLanes);
  s.group_dist.resize(N * kLanes);
  s.live.resize(N);
  s.live_rows.resize(N);
  for (int64_t i = 0; i < N; ++i) {
    s.live[i] = static_cast<int32_t>(i);
    s.live_rows[i] = item.pred + i * D;
  }
  if (metric == Metric::Cosine) {
    s.target_norm.resize(L);
    s.pred_norm.resize(N);
    for (int64_t j = 0; j < L; ++j) s.target_norm[j] = std::sqrt(row_square_sum(item.target + j * D, D));
    for (int64_t i = 0; i < N; ++i) s.pred_norm[i] = std::sqrt(row_square_sum(item.pred + i * D, D));
  }
  return item;
}

// Group g holds text rows hi = L - 1 - 8g, hi - 1, ... (at most 8, not below 0), lane l = row hi - l.
inline int64_t group_count(const PackedItem& item) { return (item.L + kLanes - 1) / kLanes; }
inline int64_t group_top(int64_t L, int64_t g) { return L - 1 - g * kLanes; }
inline int64_t group_size(int64_t L, int64_t g) { return std::min<int64_t>(kLanes, group_top(L, g) + 1); }

// s.group_dist[c * 8 + l] = distance of text row (group_top - l) to predicted row s.live[c], c < n.
inline void group_block_distances(const PackedItem& item, int64_t g, int64_t n) {
  ItemScratch& s = *item.s;
  const int64_t D = item.D, hi = group_top(item.L, g), size = group_size(item.L, g);
  const float* rows[kLanes];
  for (int l = 0; l < kLanes; ++l) rows[l] = l < size ? item.target + (hi - l) * D : s.zeros.data();
  if (cpu_has_avx2())
    pack_panel_avx2(rows, D, s.panel.data());
  else
    pack_panel_generic(rows, D, s.panel.data());
  float* out = s.group_dist.data();
  switch (item.metric) {
    case Metric::L1:
      dispatch_group_distances<Metric::L1>(s.panel.data(), D, s.live_rows.data(), n, out);
      break;
    case Metric::L2:
      dispatch_group_distances<Metric::L2>(s.panel.data(), D, s.live_rows.data(), n, out);
      break;
    case Metric::Cosine:
      dispatch_group_distances<Metric::Cosine>(s.panel.data(), D, s.live_rows.data(), n, out);
      for (int64_t c = 0; c < n; ++c)
        for (int64_t l = 0; l < size; ++l) {
          const float norms = s.target_norm[hi - l] * s.pred_norm[s.live[c]];
          const float denom = norms > kCosineEps ? norms : kCosineEps;
          const float ratio = out[c * kLanes + l] / denom;
          out[c * kLanes + l] = 1.f - ratio;
        }
      break;
  }
}

// The full matrix: s.dist[j * row_stride + i] for j < L, i < N. Returns row_stride.
inline int64_t full_distances(const PackedItem& item) {
  ItemScratch& s = *item.s;
  const int64_t N = item.N, stride = round_up(std::max<int64_t>(N, 1), kLanes);
  s.dist.resize(item.L * stride);
  for (int64_t g = 0; g < group_count(item); ++g) {
    group_block_distances(item, g, N);
    const int64_t hi = group_top(item.L, g), size = group_size(item.L, g);
    for (int64_t l = 0; l < size; ++l) {
      float* row = s.dist.data() + (hi - l) * stride;
      for (int64_t i = 0; i < N; ++i) row[i] = s.group_dist[i * kLanes + l];
    }
  }
  return stride;
}

// Runs per_item(b, L, item) over the batch in parallel; item is null for L == 0.
template <typename PerItem>
void for_each_item(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& lengths, Metric metric,
                   PerItem per_item) {
  const int64_t B = pred.size(0), N = pred.size(1), D = pred.size(2);
  const at::Tensor lengths64 = lengths.to(at::kLong).contiguous();
  const int64_t* lengths_ptr = lengths64.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "collat_matching_cpu", [&] {
    const scalar_t* pred_ptr = pred.data_ptr<scalar_t>();
    const scalar_t* target_ptr = target.data_ptr<scalar_t>();
    // Items are handed out one at a time from a shared counter rather than in one fixed slice per
    // thread: their cost varies with L_b, and a thread that gets less CPU time just takes fewer.
    std::atomic<int64_t> next_item{0};
    const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B));
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      ItemScratch scratch;
      for (int64_t b = next_item++; b < B; b = next_item++) {
        const int64_t L = std::min(std::max<int64_t>(lengths_ptr[b], 0), N);
        if (L == 0) {
          per_item(b, L, static_cast<const PackedItem*>(nullptr));
          continue;
        }
        const PackedItem item =
            pack_item<scalar_t>(pred_ptr + b * N * D, target_ptr + b * N * D, L, N, D, metric, scratch);
        per_item(b, L, &item);
      }
    });
  });
}

}  // namespace cpu
}  // namespace collat
