// CUDA side of the matching ops, shared by greedy_match_cuda.cu and optimal_match_cuda.cu (include it
// from .cu files only): the block-wide distance matrix of one batch item and the launch plan.
//
// One block per batch item. The [L, N] fp32 distance matrix is computed by 4x4 register tiles (one
// tile per thread, several passes when there are more tiles than threads), streaming d in chunks of
// kChunk through shared memory, transposed so that a tile reads 4 target and 4 predicted values
// with two float4 loads; the next chunk is loaded into registers while the current one is computed
// (on an H200 that made the greedy kernel 1.75x faster at B = 256). Each distance is one sequential
// sum over d with explicitly rounded adds and multiplies (no FMA), the same arithmetic as the CPU
// kernel (matching_cpu.h), so perms agree bit for bit. The matrix lives in shared memory when it
// fits (e.g. N = 77: 24.6 KB; N = 200 on H100/H200), else in a global scratch buffer.
//
// With -DCOLLAT_CUDA_EMULATION this code compiles as plain C++ against cuda_emulation.h, which the
// CPU tests use to run the kernels without a GPU (tests/test_cuda_emulation.py).
#pragma once

#ifdef COLLAT_CUDA_EMULATION
// The tests run this device code on CPU through a fiber emulation of the CUDA features it uses.
#include "cuda_emulation.h"
#else
// Only c10 CUDA headers: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers, which a bare
// toolkit (CI) may lack.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <cfloat>
#include <cstdint>
#include <type_traits>

#include "matching_common.h"

namespace collat {
namespace cuda {

#ifndef COLLAT_CUDA_EMULATION
__device__ __forceinline__ float* dynamic_smem() {
  extern __shared__ float4 smem_raw[];
  return reinterpret_cast<float*>(smem_raw);
}

template <typename... KernelArgs, typename... Args>
inline void launch_kernel(void (*kernel)(KernelArgs...), unsigned blocks, int threads, size_t smem_bytes,
                          cudaStream_t stream, Args... args) {
  kernel<<<dim3(blocks), threads, smem_bytes, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

constexpr int kTile = 4;     // a thread's tile: kTile target rows x kTile predicted rows
constexpr int kChunk = 16;   // d values staged in shared memory per step
constexpr int kMaxN = 1024;  // the taken-set of a column slot is one bit of a 32-bit lane mask
constexpr int kWarp = 32;
// Threads per block at most: 65536 registers / 896 threads leaves each thread 72 registers, enough for
// the 4x4 tile, the prefetched chunk and the solver without spills, and at N = 77 (416 threads) still
// two blocks per SM. Larger N takes more passes over its tiles.
constexpr int kMaxThreads = 896;

struct Plan {
  int threads;
  int stride;         // row stride of a staged chunk (floats); multiple of 4, never a multiple of 8
  int dist_stride;    // row stride of the distance matrix (floats)
  int chunk_floats;   // staged target + pred chunks + two norm vectors
  bool dist_in_smem;
  size_t smem_bytes;  // dynamic shared memory of one block
};

__host__ __device__ inline int round_up_int(int x, int m) { return (x + m - 1) / m * m; }

// extra_bytes: per-block shared memory the caller needs after the distance matrix (8-byte aligned).
inline Plan make_plan(int N, size_t extra_bytes) {
  Plan p;
  const int n4 = round_up_int(N, kTile);
  p.stride = n4 % 8 == 0 ? n4 + 4 : n4;  // odd multiple of 4 words: at most 2-way conflicts when staging
  p.dist_stride = n4;
  p.chunk_floats = 2 * kChunk * p.stride + 2 * p.stride;
  const int tiles_per_side = n4 / kTile;
  p.threads = std::min(kMaxThreads, std::max(kWarp, round_up_int(tiles_per_side * tiles_per_side, kWarp)));
  const size_t dist_bytes = sizeof(float) * size_t(N) * p.dist_stride;
  const size_t base = sizeof(float) * size_t(p.chunk_floats) + extra_bytes;
  int device = 0, optin_bytes = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t limit = size_t(optin_bytes);
  p.dist_in_smem = base + dist_bytes <= limit;
  p.smem_bytes = p.dist_in_smem ? base + dist_bytes : base;
  TORCH_CHECK(p.smem_bytes <= limit, "collat matching: N = ", N, " needs ", p.smem_bytes,
              " bytes of shared memory per block, the device allows ", limit);
  return p;
}

// What both launchers do before their kernel: check the inputs, make them contiguous (lengths as int64),
// allocate the perm and plan the launch, with a global distance scratch where the matrix does not fit in
// shared memory. `solver_bytes(N)`: the shared memory the kernel needs after the distance matrix. The
// caller holds a CUDAGuard for pred's device across this and the launch.
struct Launch {
  at::Tensor pred, target, lengths, perm, scratch;
  Metric metric;
  int64_t B, N, D;
  Plan plan;
  bool empty() const { return B == 0 || N == 0; }
  float* scratch_ptr() const { return plan.dist_in_smem ? nullptr : scratch.data_ptr<float>(); }
};

template <typename SolverBytes>
inline Launch prepare_launch(const char* op, const at::Tensor& pred_in, const at::Tensor& target_in,
                             const at::Tensor& lengths_in, c10::string_view metric_name, SolverBytes solver_bytes) {
  check_match_inputs(op, pred_in, target_in, lengths_in);
  Launch l;
  l.metric = parse_metric(std::string(metric_name));
  TORCH_CHECK(pred_in.size(1) <= kMaxN, op, ": the CUDA kernel supports N <= ", kMaxN, ", got N = ", pred_in.size(1));
  TORCH_CHECK(pred_in.size(0) < (int64_t(1) << 31), op, ": B must be < 2^31, got ", pred_in.size(0));
  l.pred = pred_in.contiguous();
  l.target = target_in.contiguous();
  l.lengths = lengths_in.to(at::kLong).contiguous();
  l.B = l.pred.size(0), l.N = l.pred.size(1), l.D = l.pred.size(2);
  l.perm = at::empty({l.B, l.N}, l.pred.options().dtype(at::kLong));
  if (l.empty()) return l;
  l.plan = make_plan(int(l.N), solver_bytes(int(l.N)));
  if (!l.plan.dist_in_smem) l.scratch = at::empty({l.B, l.N, l.plan.dist_stride}, l.pred.options().dtype(at::kFloat));
  return l;
}

template <typename Kernel>
inline void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

__device__ __forceinline__ int clamp_length(int64_t length, int N) {
  return length < 0 ? 0 : (length > N ? N : int(length));
}

template <Metric M>
__device__ __forceinline__ float accumulate(float acc, float t, float p) {
  if constexpr (M == Metric::L1) {
    return __fadd_rn(acc, fabsf(__fsub_rn(t, p)));
  } else if constexpr (M == Metric::L2) {
    const float diff = __fsub_rn(t, p);
    return __fadd_rn(acc, __fmul_rn(diff, diff));
  } else {
    return __fadd_rn(acc, __fmul_rn(t, p));
  }
}

template <Metric M>
__device__ __forceinline__ void tile_step(float (&acc)[kTile][kTile], const float* t_chunk, const float* p_chunk,
                                          int stride, int kk, int j0, int i0) {
  const float4 t = *reinterpret_cast<const float4*>(t_chunk + kk * stride + j0);
  const float4 p = *reinterpret_cast<const float4*>(p_chunk + kk * stride + i0);
  const float tv[kTile] = {t.x, t.y, t.z, t.w};
  const float pv[kTile] = {p.x, p.y, p.z, p.w};
#pragma unroll
  for (int r = 0; r < kTile; ++r)
#pragma unroll
    for (int q = 0; q < kTile; ++q) acc[r][q] = accumulate<M>(acc[r][q], tv[r], pv[q]);
}

// Staging a chunk: slot q holds 4 consecutive d values (d = k0 + 4 (q % 4) ...) of row q / 4 of the
// stacked [target rows (padded_l); pred rows (padded_n)], so a warp reads whole 64-byte row segments.
constexpr int kQuad = 4;
constexpr int kQuadsPerRow = kChunk / kQuad;
// Slots per thread loaded into registers while the previous chunk is being computed: the global loads'
// latency hides behind the arithmetic instead of stalling every chunk (N = 77: 640 slots, 416
// threads, so every slot is prefetched). Slots beyond these are loaded when the chunk is staged.
constexpr int kPrefetch = 2;

template <typename scalar_t>
struct alignas(sizeof(scalar_t) * kQuad) Quad {
  scalar_t v[kQuad];
};

// One 16-byte (fp32) or 8-byte (fp16/bf16) load of a quad.
template <typename scalar_t>
using QuadBits = typename std::conditional<sizeof(scalar_t) == 4, float4, uint2>::type;

template <typename scalar_t>
struct ChunkLoader {
  const scalar_t* __restrict__ target;
  const scalar_t* __restrict__ pred;
  int L, N, D, padded_l, slots;
  bool vectorized;  // D % 4 == 0 and both bases aligned to a quad: every in-range quad is one aligned load

  __device__ __forceinline__ Quad<scalar_t> load(int q, int k0) const {
    const int row_all = q / kQuadsPerRow, d0 = k0 + kQuad * (q % kQuadsPerRow);
    const bool is_target = row_all < padded_l;
    const int row = is_target ? row_all : row_all - padded_l;
    Quad<scalar_t> quad;
    if (row < (is_target ? L : N) && d0 < D) {
      const scalar_t* src = (is_target ? target : pred) + int64_t(row) * D + d0;
      if (vectorized) {
        *reinterpret_cast<QuadBits<scalar_t>*>(&quad) = *reinterpret_cast<const QuadBits<scalar_t>*>(src);
        return quad;
      }
#pragma unroll
      for (int e = 0; e < kQuad; ++e) quad.v[e] = d0 + e < D ? src[e] : scalar_t(0.f);
      return quad;
    }
#pragma unroll
    for (int e = 0; e < kQuad; ++e) quad.v[e] = scalar_t(0.f);
    return quad;
  }

  // Transposed into the chunk: chunk[kk * stride + row].
  __device__ __forceinline__ void store(const Quad<scalar_t>& quad, int q, float* t_chunk, float* p_chunk,
                                        int stride) const {
    const int row_all = q / kQuadsPerRow, kk0 = kQuad * (q % kQuadsPerRow);
    float* column = row_all < padded_l ? t_chunk + row_all : p_chunk + (row_all - padded_l);
#pragma unroll
    for (int e = 0; e < kQuad; ++e) column[(kk0 + e) * stride] = static_cast<float>(quad.v[e]);
  }

  // This thread's slots s0 .. s0 + kPrefetch - 1 (slot threadIdx.x + s * blockDim.x), all loads first.
  __device__ __forceinline__ void load_group(Quad<scalar_t> (&quads)[kPrefetch], int s0, int k0) const {
#pragma unroll
    for (int s = 0; s < kPrefetch; ++s) {
      const int q = threadIdx.x + (s0 + s) * blockDim.x;
      if (q < slots) quads[s] = load(q, k0);
    }
  }

  __device__ __forceinline__ void store_group(const Quad<scalar_t> (&quads)[kPrefetch], int s0, float* t_chunk,
                                              float* p_chunk, int stride) const {
#pragma unroll
    for (int s = 0; s < kPrefetch; ++s) {
      const int q = threadIdx.x + (s0 + s) * blockDim.x;
      if (q < slots) store(quads[s], q, t_chunk, p_chunk, stride);
    }
  }
};

template <typename scalar_t>
__device__ __forceinline__ bool is_quad_aligned(const scalar_t* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(scalar_t) * kQuad) == 0;
}

// The optimal solver's view of a distance: NaN as the worst finite cost and infinities clamped, so
// that the assignment stays feasible (as the CPU solver, optimal_match.cpp).
__device__ __forceinline__ float solver_cost(float x) {
  if (x != x) return FLT_MAX;
  return x > FLT_MAX ? FLT_MAX : (x < -FLT_MAX ? -FLT_MAX : x);
}

// dist[j * dist_stride + i] for j < L, i < N, one item; all threads of the block take part.
// smem holds plan.chunk_floats floats. Ends with __syncthreads(). for_solver: every distance is
// written through solver_cost.
template <typename scalar_t, Metric M, bool for_solver = false>
__device__ void block_distances(const scalar_t* __restrict__ pred, const scalar_t* __restrict__ target, int L,
                                int N, int D, int stride, int dist_stride, float* smem, float* dist) {
  float* t_chunk = smem;
  float* p_chunk = smem + kChunk * stride;
  float* t_norm = smem + 2 * kChunk * stride;  // cosine: running sums of squares, then norms
  float* p_norm = t_norm + stride;
  const int tiles_i = (N + kTile - 1) / kTile, tiles_j = (L + kTile - 1) / kTile;
  const int num_tiles = tiles_i * tiles_j;
  const int padded_l = tiles_j * kTile, padded_n = tiles_i * kTile;
  const ChunkLoader<scalar_t> loader{target, pred, L, N, D, padded_l, (padded_l + padded_n) * kQuadsPerRow,
                                     D % kQuad == 0 && is_quad_aligned(target) && is_quad_aligned(pred)};
  const int slots_per_thread = (loader.slots + blockDim.x - 1) / blockDim.x;
  Quad<scalar_t> staged[kPrefetch];
  for (int first = 0; first < num_tiles; first += blockDim.x) {
    const int tile = first + threadIdx.x;
    const bool active = tile < num_tiles;
    const int j0 = active ? (tile / tiles_i) * kTile : 0;
    const int i0 = active ? (tile % tiles_i) * kTile : 0;
    const bool norms = M == Metric::Cosine && first == 0;  // the norms are computed in the first pass only
    if (norms)
      for (int r = threadIdx.x; r < L + N; r += blockDim.x) (r < L ? t_norm[r] : p_norm[r - L]) = 0.f;
    float acc[kTile][kTile];
#pragma unroll
    for (int r = 0; r < kTile; ++r)
#pragma unroll
      for (int q = 0; q < kTile; ++q) acc[r][q] = 0.f;
    loader.load_group(staged, 0, 0);
    for (int k0 = 0; k0 < D; k0 += kChunk) {
      const int kc = min(kChunk, D - k0);
      __syncthreads();  // the previous chunk is consumed
      loader.store_group(staged, 0, t_chunk, p_chunk, stride);
      for (int s0 = kPrefetch; s0 < slots_per_thread; s0 += kPrefetch) {  // large N: the rest, now
        Quad<scalar_t> rest[kPrefetch];
        loader.load_group(rest, s0, k0);
        loader.store_group(rest, s0, t_chunk, p_chunk, stride);
      }
      if (k0 + kChunk < D) loader.load_group(staged, 0, k0 + kChunk);
      __syncthreads();
      if (norms) {
        for (int r = threadIdx.x; r < L + N; r += blockDim.x) {
          const float* column = r < L ? t_chunk + r : p_chunk + (r - L);
          float& slot = r < L ? t_norm[r] : p_norm[r - L];
          float sum = slot;
          for (int kk = 0; kk < kc; ++kk) {
            const float x = column[kk * stride];
            sum = __fadd_rn(sum, __fmul_rn(x, x));
          }
          slot = sum;
        }
      }
      if (active) {
        if (kc == kChunk) {
#pragma unroll
          for (int kk = 0; kk < kChunk; ++kk) tile_step<M>(acc, t_chunk, p_chunk, stride, kk, j0, i0);
        } else {
          for (int kk = 0; kk < kc; ++kk) tile_step<M>(acc, t_chunk, p_chunk, stride, kk, j0, i0);
        }
      }
    }
    if (M == Metric::Cosine) {
      __syncthreads();  // every norm is complete
      if (norms)
        for (int r = threadIdx.x; r < L + N; r += blockDim.x) {
          float& slot = r < L ? t_norm[r] : p_norm[r - L];
          slot = __fsqrt_rn(slot);
        }
      __syncthreads();
    }
    if (active) {
#pragma unroll
      for (int r = 0; r < kTile; ++r)
#pragma unroll
        for (int q = 0; q < kTile; ++q) {
          const int j = j0 + r, i = i0 + q;
          if (j < L && i < N) {
            float value = acc[r][q];
            if (M == Metric::Cosine) {
              const float norms_product = __fmul_rn(t_norm[j], p_norm[i]);
              const float denom = norms_product > kCosineEps ? norms_product : kCosineEps;
              value = __fsub_rn(1.f, __fdiv_rn(value, denom));
            }
            dist[j * dist_stride + i] = for_solver ? solver_cost(value) : value;
          }
        }
    }
  }
  __syncthreads();
}

template <typename Launch>
inline void dispatch_dtype_metric(at::ScalarType dtype, Metric metric, Launch launch) {
  auto with_metric = [&](auto tag) {
    using scalar_t = decltype(tag);
    switch (metric) {
      case Metric::L1: launch(scalar_t{}, std::integral_constant<Metric, Metric::L1>{}); break;
      case Metric::L2: launch(scalar_t{}, std::integral_constant<Metric, Metric::L2>{}); break;
      case Metric::Cosine: launch(scalar_t{}, std::integral_constant<Metric, Metric::Cosine>{}); break;
    }
  };
  switch (dtype) {
    case at::kFloat: with_metric(float{}); break;
    case at::kHalf: with_metric(at::Half{}); break;
    case at::kBFloat16: with_metric(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "collat matching: unsupported dtype ", dtype);
  }
}

}  // namespace cuda
}  // namespace collat
