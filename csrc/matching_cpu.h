// CPU distance matrix of one batch item, shared by greedy_match.cpp and optimal_match.cpp.
//
// Vectorised across predicted rows i (8 pairs per vector lane group), never across d: each lane
// keeps its own sequential fp32 sum over d, so the result is bit-identical to a scalar loop and to
// the CUDA kernel. FMA is never emitted: the AVX2 clone is compiled with target("avx2") only (no
// "fma"), and setup.py's flags enable no FMA ISA for the default clone.
#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "matching_common.h"

namespace collat {
namespace cpu {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

constexpr int kLanes = 8;
constexpr int kRowBlock = 4;  // target rows sharing one load of predicted values

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Per-thread scratch, reused across the items a thread handles.
struct ItemScratch {
  std::vector<float> target;  // [L, D]
  std::vector<float> pred_t;  // [D, Np] (transposed, zero-padded columns)
  std::vector<float> dist;    // [L, Np]
  std::vector<float> target_norm, pred_norm;  // cosine only
};

// Vectors travel by reference: by value they would change the ABI of the non-AVX clone (-Wpsabi).
template <Metric M>
__attribute__((always_inline)) inline void accumulate(v8f& acc, const v8f& t, const v8f& p) {
  if constexpr (M == Metric::L1) {
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

// dist[r, i] for R target rows starting at `t` (row stride D) and V*8 predicted columns starting at
// column i0 of pred_t ([D, Np]).
template <Metric M, int R, int V>
__attribute__((always_inline)) inline void tile(const float* t, int64_t D, const float* pred_t, int64_t Np,
                                                int64_t i0, float* dist) {
  v8f acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = v8f{};
  for (int64_t k = 0; k < D; ++k) {
    v8f p[V];
    for (int v = 0; v < V; ++v) std::memcpy(&p[v], pred_t + k * Np + i0 + v * kLanes, sizeof(v8f));
    for (int r = 0; r < R; ++r) {
      const float x = t[r * D + k];
      const v8f tb = {x, x, x, x, x, x, x, x};
      for (int v = 0; v < V; ++v) accumulate<M>(acc[r][v], tb, p[v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) std::memcpy(dist + r * Np + i0 + v * kLanes, &acc[r][v], sizeof(v8f));
}

template <Metric M, int R>
__attribute__((always_inline)) inline void row_block(const float* t, int64_t D, const float* pred_t, int64_t Np,
                                                     float* dist) {
  int64_t i0 = 0;
  for (; i0 + 2 * kLanes <= Np; i0 += 2 * kLanes) tile<M, R, 2>(t, D, pred_t, Np, i0, dist);
  if (i0 < Np) tile<M, R, 1>(t, D, pred_t, Np, i0, dist);
}

template <Metric M>
__attribute__((always_inline)) inline void raw_distances(const float* t, int64_t L, int64_t D, const float* pred_t,
                                                         int64_t Np, float* dist) {
  int64_t j = 0;
  for (; j + kRowBlock <= L; j += kRowBlock) row_block<M, kRowBlock>(t + j * D, D, pred_t, Np, dist + j * Np);
  const int64_t rest = L - j;
  if (rest == 3) row_block<M, 3>(t + j * D, D, pred_t, Np, dist + j * Np);
  if (rest == 2) row_block<M, 2>(t + j * D, D, pred_t, Np, dist + j * Np);
  if (rest == 1) row_block<M, 1>(t + j * D, D, pred_t, Np, dist + j * Np);
}

template <Metric M>
__attribute__((target("avx2"))) void raw_distances_avx2(const float* t, int64_t L, int64_t D, const float* pred_t,
                                                       int64_t Np, float* dist) {
  raw_distances<M>(t, L, D, pred_t, Np, dist);
}

template <Metric M>
void raw_distances_generic(const float* t, int64_t L, int64_t D, const float* pred_t, int64_t Np, float* dist) {
  raw_distances<M>(t, L, D, pred_t, Np, dist);
}

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}

template <Metric M>
void dispatch_raw_distances(const float* t, int64_t L, int64_t D, const float* pred_t, int64_t Np, float* dist) {
  if (cpu_has_avx2())
    raw_distances_avx2<M>(t, L, D, pred_t, Np, dist);
  else
    raw_distances_generic<M>(t, L, D, pred_t, Np, dist);
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

// Fills s.dist[j * Np + i] (j < L, i < N; Np = round_up(N, 8)) for one item; returns Np.
template <typename scalar_t>
int64_t item_distances(const scalar_t* pred, const scalar_t* target, int64_t L, int64_t N, int64_t D, Metric metric,
                       ItemScratch& s) {
  const int64_t Np = round_up(std::max<int64_t>(N, 1), kLanes);
  s.target.resize(L * D);
  s.pred_t.assign(D * Np, 0.f);
  s.dist.resize(L * Np);
  for (int64_t j = 0; j < L * D; ++j) s.target[j] = static_cast<float>(target[j]);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t k = 0; k < D; ++k) s.pred_t[k * Np + i] = static_cast<float>(pred[i * D + k]);
  switch (metric) {
    case Metric::L1:
      dispatch_raw_distances<Metric::L1>(s.target.data(), L, D, s.pred_t.data(), Np, s.dist.data());
      break;
    case Metric::L2:
      dispatch_raw_distances<Metric::L2>(s.target.data(), L, D, s.pred_t.data(), Np, s.dist.data());
      break;
    case Metric::Cosine: {
      dispatch_raw_distances<Metric::Cosine>(s.target.data(), L, D, s.pred_t.data(), Np, s.dist.data());
      s.target_norm.resize(L);
      s.pred_norm.resize(N);
      for (int64_t j = 0; j < L; ++j) s.target_norm[j] = std::sqrt(row_square_sum(s.target.data() + j * D, D));
      std::vector<float> row(D);
      for (int64_t i = 0; i < N; ++i) {
        for (int64_t k = 0; k < D; ++k) row[k] = s.pred_t[k * Np + i];
        s.pred_norm[i] = std::sqrt(row_square_sum(row.data(), D));
      }
      for (int64_t j = 0; j < L; ++j)
        for (int64_t i = 0; i < N; ++i) {
          const float norms = s.target_norm[j] * s.pred_norm[i];
          const float denom = norms > kCosineEps ? norms : kCosineEps;
          const float ratio = s.dist[j * Np + i] / denom;
          s.dist[j * Np + i] = 1.f - ratio;
        }
      break;
    }
  }
  return Np;
}

// Runs per_item(b, L, dist, Np) over the batch in parallel; dist is item b's [L, Np] fp32 matrix.
template <typename PerItem>
void for_each_item(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& lengths, Metric metric,
                   PerItem per_item) {
  const int64_t B = pred.size(0), N = pred.size(1), D = pred.size(2);
  const at::Tensor lengths64 = lengths.to(at::kLong).contiguous();
  const int64_t* lengths_ptr = lengths64.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "collat_matching_cpu", [&] {
    const scalar_t* pred_ptr = pred.data_ptr<scalar_t>();
    const scalar_t* target_ptr = target.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      ItemScratch scratch;
      for (int64_t b = begin; b < end; ++b) {
        const int64_t L = std::min(std::max<int64_t>(lengths_ptr[b], 0), N);
        if (L == 0) {
          per_item(b, L, static_cast<const float*>(nullptr), int64_t(0));
          continue;
        }
        const int64_t Np = item_distances<scalar_t>(pred_ptr + b * N * D, target_ptr + b * N * D, L, N, D, metric,
                                                    scratch);
        per_item(b, L, static_cast<const float*>(scratch.dist.data()), Np);
      }
    });
  });
}

}  // namespace cpu
}  // namespace collat
