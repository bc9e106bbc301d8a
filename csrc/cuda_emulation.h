// A CPU emulation of the few CUDA features the matching kernels use, so that their device code runs
// without a GPU. tests/test_cuda_emulation.py compiles greedy_match_cuda.cu and optimal_match_cuda.cu
// as C++ with -DCOLLAT_CUDA_EMULATION (matching_cuda.h then includes this file instead of the CUDA
// headers); the real build never includes it.
//
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread. A fiber runs until it reaches
// a barrier (__syncthreads, or the warp-wide __syncwarp / __reduce_min_sync / __reduce_max_sync) or
// returns; a barrier opens when every live thread of its block (warp) waits at it. The order in
// which fibers run between barriers is chosen per launch (forward, reverse, shuffled), so a data
// race between barriers shows up as results that depend on the order. The emulator refuses, with an error saying
// why: a barrier that can never open (__syncthreads under divergence, a warp op after lanes exited),
// more threads than 1024, more dynamic shared memory than the kernel was allowed
// (cudaFuncAttributeMaxDynamicSharedMemorySize, default 48 KB) or the device has, and writes past
// the end of dynamic shared memory (guard bytes checked after every block). Shared memory starts
// filled with a chosen poison byte. What it cannot show: speed, bank conflicts, the memory model
// of real warps (here every barrier is also a full fence), or faults of the real compiler.
#pragma once

#include <torch/extension.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

#define C10_CUDA_CHECK(expr)                                                            \
  do {                                                                                  \
    const cudaError_t collat_emu_error = (expr);                                        \
    TORCH_CHECK(collat_emu_error == cudaSuccess, "emulated CUDA call failed: " #expr); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace cuda
}  // namespace c10

namespace collat_emu {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
constexpr size_t kDefaultDynamicSmem = 48 * 1024;
#ifndef COLLAT_EMU_GUARD_BYTES  // 0 for AddressSanitizer runs, which then see every byte past the end
#define COLLAT_EMU_GUARD_BYTES 256
#endif
constexpr size_t kGuardBytes = COLLAT_EMU_GUARD_BYTES;
constexpr size_t kStackBytes = 64 * 1024;

enum class Order { Forward = 0, Reverse = 1, Shuffled = 2 };
enum class State { Runnable, AtBlockBarrier, AtWarpBarrier, Done };

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  unsigned index = 0;
  State state = State::Done;
};

struct Runtime {
  // Configuration (set from the tests).
  int optin_smem_bytes = 232448;  // H100 / H200: 227 KB a block when opted in
  Order order = Order::Forward;
  uint64_t seed = 0;
  unsigned char poison = 0xFF;
  // What the last launch asked for.
  int64_t launches = 0;
  size_t last_smem_bytes = 0;
  int last_threads = 0;
  unsigned last_blocks = 0;
  int64_t last_warp_reductions = 0;  // __reduce_min_sync / __reduce_max_sync calls, once per warp

  std::map<const void*, int> max_dynamic_smem;
  std::vector<Fiber> fibers;
  std::vector<float4> smem;  // 16-byte aligned, like the real dynamic shared memory
  std::vector<unsigned> warp_slots;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  std::function<void()> body;
  std::string fault;  // set by a fiber that cannot go on; the scheduler raises it
};

inline Runtime& runtime() {
  static Runtime r;
  return r;
}

inline void wait_at(State barrier) {
  Runtime& r = runtime();
  Fiber* self = r.current;
  self->state = barrier;
  swapcontext(&self->context, &r.scheduler);
}

// An exception must not unwind through a fiber's stack: the fiber records the fault and leaves for
// good, and the scheduler raises it.
inline void fail_in_fiber(const std::string& message) {
  Runtime& r = runtime();
  r.fault = message;
  r.current->state = State::Done;
  swapcontext(&r.current->context, &r.scheduler);
}

inline void fiber_entry() {
  Runtime& r = runtime();
  r.body();
  r.current->state = State::Done;  // uc_link returns to the scheduler
}

inline std::string describe_states(const std::vector<Fiber>& fibers, int threads) {
  std::string out;
  for (int w = 0; w * kWarpSize < threads; ++w) {
    int counts[4] = {0, 0, 0, 0};
    for (int t = w * kWarpSize; t < std::min(threads, (w + 1) * kWarpSize); ++t) ++counts[int(fibers[t].state)];
    out += " warp " + std::to_string(w) + ": " + std::to_string(counts[1]) + " at __syncthreads, " +
           std::to_string(counts[2]) + " at a warp barrier, " + std::to_string(counts[3]) + " exited;";
  }
  return out;
}

// Runs the current block's fibers to completion, opening barriers as they fill.
inline void run_block(int threads, std::mt19937_64& rng) {
  Runtime& r = runtime();
  std::vector<int> order(threads);
  for (int t = 0; t < threads; ++t) {
    Fiber& f = r.fibers[t];
    f.index = unsigned(t);
    f.state = State::Runnable;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = &r.scheduler;
    makecontext(&f.context, fiber_entry, 0);
  }
  while (true) {
    std::iota(order.begin(), order.end(), 0);
    if (r.order == Order::Reverse) std::reverse(order.begin(), order.end());
    if (r.order == Order::Shuffled) std::shuffle(order.begin(), order.end(), rng);
    for (int t : order) {
      Fiber& f = r.fibers[t];
      if (f.state != State::Runnable) continue;
      threadIdx = dim3(f.index);
      r.current = &f;
      swapcontext(&r.scheduler, &f.context);
      if (!r.fault.empty()) {
        const std::string fault = std::move(r.fault);
        r.fault.clear();
        TORCH_CHECK(false, "emulated CUDA: block ", blockIdx.x, " thread ", f.index, ": ", fault);
      }
    }
    r.current = nullptr;
    // Every fiber now waits at a barrier or has exited. Open what can be opened.
    bool opened = false, all_done = true, all_live_at_block = true;
    for (int t = 0; t < threads; ++t) {
      const State s = r.fibers[t].state;
      all_done = all_done && s == State::Done;
      all_live_at_block = all_live_at_block && (s == State::Done || s == State::AtBlockBarrier);
    }
    if (all_done) return;
    if (all_live_at_block) {
      for (int t = 0; t < threads; ++t)
        if (r.fibers[t].state == State::AtBlockBarrier) r.fibers[t].state = State::Runnable;
      continue;
    }
    for (int w = 0; w * kWarpSize < threads; ++w) {
      int waiting = 0;
      for (int t = w * kWarpSize; t < (w + 1) * kWarpSize; ++t) waiting += r.fibers[t].state == State::AtWarpBarrier;
      if (waiting == kWarpSize) {
        for (int t = w * kWarpSize; t < (w + 1) * kWarpSize; ++t) r.fibers[t].state = State::Runnable;
        opened = true;
      }
    }
    TORCH_CHECK(opened, "emulated CUDA: block ", blockIdx.x, " can never pass its barriers (a barrier in ",
                "divergent code, or a full-warp op after lanes exited):", describe_states(r.fibers, threads));
  }
}

template <typename... KernelArgs, typename... Args>
void launch_kernel(void (*kernel)(KernelArgs...), unsigned blocks, int threads, size_t smem_bytes, cudaStream_t,
                   Args... args) {
  Runtime& r = runtime();
  TORCH_CHECK(threads >= 1 && threads <= kMaxThreads && threads % kWarpSize == 0,
              "emulated CUDA: a block of ", threads, " threads (this emulation wants whole warps, at most ",
              kMaxThreads, ")");
  const auto found = r.max_dynamic_smem.find(reinterpret_cast<const void*>(kernel));
  const size_t allowed = found == r.max_dynamic_smem.end() ? kDefaultDynamicSmem : size_t(found->second);
  TORCH_CHECK(smem_bytes <= allowed, "emulated CUDA: launch asks for ", smem_bytes,
              " bytes of dynamic shared memory, the kernel is allowed ", allowed,
              " (cudaFuncAttributeMaxDynamicSharedMemorySize)");
  r.launches += 1;
  r.last_smem_bytes = smem_bytes;
  r.last_threads = threads;
  r.last_blocks = blocks;
  r.last_warp_reductions = 0;
  if (int(r.fibers.size()) < threads) {
    r.fibers.resize(threads);
    for (Fiber& f : r.fibers)
      if (f.stack.empty()) f.stack.resize(kStackBytes);
  }
  r.warp_slots.assign(size_t(threads), 0u);
  const size_t total = smem_bytes + kGuardBytes;
  r.smem.assign((total + sizeof(float4) - 1) / sizeof(float4), float4{});
  unsigned char* bytes = reinterpret_cast<unsigned char*>(r.smem.data());
  r.body = [&] { kernel(static_cast<KernelArgs>(args)...); };
  std::mt19937_64 rng(r.seed);
  blockDim = dim3(unsigned(threads));
  gridDim = dim3(blocks);
  for (unsigned b = 0; b < blocks; ++b) {
    std::memset(bytes, r.poison, smem_bytes);
    std::memset(bytes + smem_bytes, 0xA5, total - smem_bytes);
    blockIdx = dim3(b);
    run_block(threads, rng);
    for (size_t k = smem_bytes; k < total; ++k)
      TORCH_CHECK(bytes[k] == 0xA5, "emulated CUDA: block ", b, " wrote past the end of its ", smem_bytes,
                  " bytes of dynamic shared memory (byte ", k, ")");
  }
  r.body = nullptr;
}

}  // namespace collat_emu

inline void __syncthreads() { collat_emu::wait_at(collat_emu::State::AtBlockBarrier); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) collat_emu::fail_in_fiber("only full-warp masks are emulated");
  collat_emu::wait_at(collat_emu::State::AtWarpBarrier);
}

namespace collat_emu {
template <typename Op>
unsigned warp_reduce(unsigned mask, unsigned value, Op op) {
  if (mask != 0xffffffffu) fail_in_fiber("only full-warp masks are emulated");
  Runtime& r = runtime();
  const unsigned t = threadIdx.x, first = t - t % kWarpSize;
  r.warp_slots[t] = value;
  if (t % kWarpSize == 0) ++r.last_warp_reductions;
  wait_at(State::AtWarpBarrier);  // every lane has written its value
  unsigned result = r.warp_slots[first];
  for (int lane = 1; lane < kWarpSize; ++lane) result = op(result, r.warp_slots[first + lane]);
  wait_at(State::AtWarpBarrier);  // every lane has read them all
  return result;
}
}  // namespace collat_emu

inline unsigned __reduce_min_sync(unsigned mask, unsigned value) {
  return collat_emu::warp_reduce(mask, value, [](unsigned a, unsigned b) { return std::min(a, b); });
}

inline unsigned __reduce_max_sync(unsigned mask, unsigned value) {
  return collat_emu::warp_reduce(mask, value, [](unsigned a, unsigned b) { return std::max(a, b); });
}

inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }

// Round-to-nearest IEEE arithmetic: x86-64 SSE does exactly that when nothing is contracted
// (the emulation is compiled with -ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }

inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}
inline float __int_as_float(int i) {
  float x;
  std::memcpy(&x, &i, sizeof x);
  return x;
}
inline long long __double_as_longlong(double x) {
  long long i;
  std::memcpy(&i, &x, sizeof i);
  return i;
}
inline double __longlong_as_double(long long i) {
  double x;
  std::memcpy(&x, &i, sizeof x);
  return x;
}

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *value = collat_emu::runtime().optin_smem_bytes;
  return cudaSuccess;
}

template <typename Function>
cudaError_t cudaFuncSetAttribute(Function* kernel, cudaFuncAttribute attr, int value) {
  collat_emu::Runtime& r = collat_emu::runtime();
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > r.optin_smem_bytes)
    return cudaErrorInvalidValue;
  r.max_dynamic_smem[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

namespace collat {
namespace cuda {
inline float* dynamic_smem() { return reinterpret_cast<float*>(collat_emu::runtime().smem.data()); }
using collat_emu::launch_kernel;
}  // namespace cuda
}  // namespace collat
