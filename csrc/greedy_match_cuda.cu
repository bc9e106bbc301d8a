// CUDA kernel of collat::greedy_match: one block per batch item computes the [L, N] distance matrix
// (matching_cuda.h), then its first warp makes the L greedy choices, right to left. Each choice is
// a warp argmin over the untaken columns (lane c % 32 owns column c) on 64-bit keys
// (order-preserving float bits << 32 | column), so ties go to the smallest column, as on the CPU.
#include "matching_cuda.h"

namespace collat {
namespace cuda {
namespace {

// Orders like the float value (NaN as +inf, -0 as +0), then by column.
__device__ __forceinline__ unsigned long long choice_key(float value, int column) {
  if (value != value) value = __int_as_float(0x7f800000);
  value = __fadd_rn(value, 0.f);  // -0 -> +0: they tie, as in the CPU's float comparison
  const uint32_t bits = __float_as_uint(value);
  const uint32_t ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return ((unsigned long long)ordered << 32) | uint32_t(column);
}

__device__ void warp_greedy(const float* dist, int dist_stride, int L, int N, int64_t* out) {
  const int lane = threadIdx.x % kWarp;
  uint32_t taken = 0;  // bit m: column lane + 32 m is taken
  for (int j = L - 1; j >= 0; --j) {
    const float* row = dist + j * dist_stride;
    unsigned long long best = ~0ull;
    for (int m = 0, c = lane; c < N; ++m, c += kWarp)
      if (!((taken >> m) & 1u)) best = min(best, choice_key(row[c], c));
    // 64-bit min in two 32-bit warp reductions (redux.sync): the value's bits, then the column.
    const unsigned high = unsigned(best >> 32);
    const unsigned best_high = __reduce_min_sync(0xffffffffu, high);
    const int chosen = int(__reduce_min_sync(0xffffffffu, high == best_high ? unsigned(best) : 0xffffffffu));
    if (chosen % kWarp == lane) taken |= 1u << (chosen / kWarp);
    if (lane == 0) out[j] = chosen;
  }
}

template <typename scalar_t, Metric M>
__global__ void __launch_bounds__(kMaxThreads)
    greedy_match_kernel(const scalar_t* __restrict__ pred, const scalar_t* __restrict__ target,
                        const int64_t* __restrict__ lengths, int64_t* __restrict__ perm, int N, int D, int stride,
                        int dist_stride, int chunk_floats, float* __restrict__ dist_scratch) {
  float* smem = dynamic_smem();
  const int64_t b = blockIdx.x;
  const int L = clamp_length(lengths[b], N);
  int64_t* out = perm + b * N;
  for (int j = L + threadIdx.x; j < N; j += blockDim.x) out[j] = -1;
  if (L == 0) return;
  float* dist = dist_scratch ? dist_scratch + b * N * dist_stride : smem + chunk_floats;
  block_distances<scalar_t, M>(pred + b * N * D, target + b * N * D, L, N, D, stride, dist_stride, smem, dist);
  if (threadIdx.x < kWarp) warp_greedy(dist, dist_stride, L, N, out);
}

at::Tensor greedy_match_cuda(const at::Tensor& pred_in, const at::Tensor& target_in, const at::Tensor& lengths_in,
                             c10::string_view metric_name) {
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const Launch l = prepare_launch("greedy_match", pred_in, target_in, lengths_in, metric_name,
                                  [](int) { return size_t(0); });
  if (l.empty()) return l.perm;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype_metric(l.pred.scalar_type(), l.metric, [&](auto scalar_tag, auto metric_tag) {
    using scalar_t = decltype(scalar_tag);
    constexpr Metric M = decltype(metric_tag)::value;
    auto kernel = greedy_match_kernel<scalar_t, M>;
    allow_smem(kernel, l.plan.smem_bytes);
    launch_kernel(kernel, unsigned(l.B), l.plan.threads, l.plan.smem_bytes, stream, l.pred.data_ptr<scalar_t>(),
                  l.target.data_ptr<scalar_t>(), l.lengths.data_ptr<int64_t>(), l.perm.data_ptr<int64_t>(), int(l.N),
                  int(l.D), l.plan.stride, l.plan.dist_stride, l.plan.chunk_floats, l.scratch_ptr());
  });
  return l.perm;
}

}  // namespace
}  // namespace cuda

#ifndef COLLAT_CUDA_EMULATION
TORCH_LIBRARY_IMPL(collat, CUDA, m) { m.impl("greedy_match", &cuda::greedy_match_cuda); }
#endif

}  // namespace collat
