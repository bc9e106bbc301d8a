// CUDA kernel of collat::optimal_match: one block per batch item computes the [L, N] distance
// matrix (matching_cuda.h), then its first warp solves the rectangular assignment exactly with
// shortest augmenting paths (Crouse 2016, as scipy's linear_sum_assignment), potentials in double.
// Square and nearly square problems (N - L <= N / 8) first get a row and column reduction
// (start_potentials), which halves the Dijkstra steps there. Rows are then added one at a time;
// each Dijkstra step scans the unfinished columns in parallel (lane c % 32 owns column c and its
// state: in registers for N <= 128, else in shared memory) and picks the minimum by (path cost,
// assigned column last, smaller column) with warp reductions: the same rule as the CPU solver
// (optimal_match.cpp), which however also runs an augmenting row reduction: under exactly tied
// optima the two backends may return different perms of the same cost.
#include <cfloat>
#include <cstdlib>
#include <string>

#include "matching_cuda.h"

namespace collat {
namespace cuda {
namespace {

constexpr int kAssignedFlag = 1 << 20;  // above every column index (N <= kMaxN)

// Unsigned integers that order like the doubles (-0 taken as +0, so that it ties with +0).
__device__ __forceinline__ unsigned long long ordered_bits(double x) {
  const unsigned long long bits = static_cast<unsigned long long>(__double_as_longlong(__dadd_rn(x, 0.0)));
  return (bits >> 63) ? ~bits : (bits | (1ull << 63));
}

__device__ __forceinline__ double from_ordered_bits(unsigned long long ordered) {
  const unsigned long long bits = (ordered >> 63) ? (ordered & ~(1ull << 63)) : ~ordered;
  return __longlong_as_double(static_cast<long long>(bits));
}

// Arrays of N entries (rounded up); the row arrays use the solver's rows (L, or N with dummy rows).
struct SolverState {
  double* u;          // [rows] row potentials
  double* v;          // [N] column potentials
  double* path_cost;  // [N] shortest path cost to each column in the current search
  int* path;          // [N] row preceding each column on its shortest path
  int* row4col;       // [N] row assigned to each column, -1 if none
  int* col4row;       // [rows] column assigned to each row
  unsigned char* row_seen;  // [rows]
  unsigned char* col_done;  // [N]
};

inline size_t solver_bytes(int N) {
  const size_t n = size_t(round_up_int(N, kTile));
  return n * (3 * sizeof(double) + 3 * sizeof(int) + 2) + 16;
}

__device__ SolverState carve_solver(void* base, int N) {
  const int n = round_up_int(N, kTile);
  SolverState s;
  s.u = reinterpret_cast<double*>(base);
  s.v = s.u + n;
  s.path_cost = s.v + n;
  s.path = reinterpret_cast<int*>(s.path_cost + n);
  s.row4col = s.path + n;
  s.col4row = s.row4col + n;
  s.row_seen = reinterpret_cast<unsigned char*>(s.col4row + n);
  s.col_done = s.row_seen + n;
  return s;
}

// Reduced cost of (row i, column c) on the current search: min_value + cost - u_i - v_c, in that order.
// cost is finite: block_distances wrote it through solver_cost.
__device__ __forceinline__ double reduced_cost(double min_value, float cost, double u_i, double v_c) {
  return __dsub_rn(__dsub_rn(__dadd_rn(min_value, double(cost)), u_i), v_c);
}

// A lane's candidate: the lowest path cost, then unassigned columns first, then the smaller column.
__device__ __forceinline__ void keep_lowest(double cost, int key, double& lowest, int& lowest_key) {
  if (cost < lowest || (cost == lowest && key < lowest_key)) {
    lowest = cost;
    lowest_key = key;
  }
}

// Lexicographic warp min of (cost, key) in three 32-bit reductions (redux.sync) over the cost's
// order-preserving bits (high word, low word), then the key. Every lane gets the key and the cost.
__device__ __forceinline__ int warp_lowest(double lowest, int lowest_key, double& min_value) {
  const unsigned long long ordered = ordered_bits(lowest);
  const unsigned high = unsigned(ordered >> 32), low = unsigned(ordered);
  const unsigned best_high = __reduce_min_sync(0xffffffffu, high);
  const unsigned best_low = __reduce_min_sync(0xffffffffu, high == best_high ? low : 0xffffffffu);
  const bool holds_min = high == best_high && low == best_low;
  min_value = from_ordered_bits((static_cast<unsigned long long>(best_high) << 32) | best_low);
  return int(__reduce_min_sync(0xffffffffu, holds_min ? unsigned(lowest_key) : 0xffffffffu));
}

// Rows the solver works on: L, or N when N - L <= N / 8 (see start_potentials) unless the plain
// start was asked for.
__device__ __forceinline__ int solver_rows(int L, int N, bool reduced_start) {
  return reduced_start && N - L <= N / 8 ? N : L;
}

// Initial potentials, before any row is assigned: u = 0 and v = 0, except for (nearly) square
// problems, which start from a row then a column reduction as Jonker-Volgenant do: u_i = min_c
// cost(i, c), then v_c = min_i (cost(i, c) - u_i). Every reduced cost stays >= 0, so the searches
// are unchanged, but far fewer Dijkstra steps remain. A rectangular problem cannot start so, since a
// column that ends up unassigned must keep v = 0; but one with few rows missing (N - L <= N / 8) is
// made square by N - L dummy rows of equal cost: every full assignment pays that cost once per
// dummy row, so the optimum of the real rows is the same. Their cost, the largest real one, leaves
// the column reduction as the real rows alone make it. Steps an item counted in the emulation at
// N = 77, D = 512, random L1 costs (plain start -> this one): L = 77 825 -> 407, L = 76 865 -> 376,
// L = 72 673 -> 388, L = 68 526 -> 421, L = 66 474 -> 457, L = 64 435 -> 499. On an H200 at B = 256
// (fp32 L1): L = 77 471 -> 330 us, L = 72 372 -> 319 us.
// Rows are scanned by lane r % 32; each lane starts at its own column so that the warp's loads fall
// in different banks (the row stride is a multiple of 16 words).
// rows: solver_rows(L, N, reduced_start); the reductions are made when it is N.
__device__ void start_potentials(float* dist, int dist_stride, int rows, int L, int N, bool reduced_start,
                                 const SolverState& s) {
  const int lane = threadIdx.x % kWarp;
  for (int c = lane; c < N; c += kWarp) s.v[c] = 0.0;
  for (int r = lane; r < rows; r += kWarp) s.u[r] = 0.0;
  if (!reduced_start || rows != N) return;
  for (int r = lane; r < L; r += kWarp) {
    const float* row = dist + r * dist_stride;
    float lowest = row[r];
    for (int k = 1; k < N; ++k) {
      const float cost = row[r + k < N ? r + k : r + k - N];
      lowest = cost < lowest ? cost : lowest;
    }
    s.u[r] = double(lowest);
  }
  if (L < N) {
    // Costs are finite (block_distances wrote them through solver_cost): order-preserving bits.
    unsigned highest = 0;
    for (int c = lane; c < N; c += kWarp)
      for (int r = 0; r < L; ++r) {
        const unsigned bits = __float_as_uint(dist[r * dist_stride + c]);
        const unsigned ordered = (bits >> 31) ? ~bits : (bits | 0x80000000u);
        highest = ordered > highest ? ordered : highest;
      }
    highest = __reduce_max_sync(0xffffffffu, highest);
    const float dummy_cost = __uint_as_float((highest >> 31) ? (highest & 0x7fffffffu) : ~highest);
    for (int c = lane; c < N; c += kWarp)
      for (int r = L; r < N; ++r) dist[r * dist_stride + c] = dummy_cost;
  }
  __syncwarp();  // every u written
  for (int c = lane; c < N; c += kWarp) {
    double lowest = __dsub_rn(double(dist[c]), s.u[0]);
    for (int r = 1; r < N; ++r) {
      const double reduced = __dsub_rn(double(dist[r * dist_stride + c]), s.u[r]);
      lowest = reduced < lowest ? reduced : lowest;
    }
    s.v[c] = lowest;
  }
  __syncwarp();
}

// Flips the shortest augmenting path from row cur to the free column sink (one lane).
__device__ __forceinline__ void augment(const SolverState& s, int sink, int cur) {
  for (int c = sink;;) {
    const int r = s.path[c];
    s.row4col[c] = r;
    const int previous = s.col4row[r];
    s.col4row[r] = c;
    c = previous;
    if (r == cur) break;
  }
}

// Assigns rows 0 .. rows - 1 of dist (potentials from start_potentials); out[r] for r < L.
__device__ void warp_assignment(const float* dist, int dist_stride, int rows, int L, int N, SolverState s,
                                int64_t* out) {
  const int lane = threadIdx.x % kWarp;
  const double inf = __longlong_as_double(0x7ff0000000000000LL);
  for (int c = lane; c < N; c += kWarp) {
    s.row4col[c] = -1;
    s.path[c] = -1;
  }
  for (int r = lane; r < rows; r += kWarp) s.col4row[r] = -1;
  for (int cur = 0; cur < rows; ++cur) {
    for (int c = lane; c < N; c += kWarp) {
      s.path_cost[c] = inf;
      s.col_done[c] = 0;
    }
    for (int r = lane; r < rows; r += kWarp) s.row_seen[r] = 0;
    __syncwarp();
    double min_value = 0.0;
    int i = cur, sink = -1;
    while (sink < 0) {
      if (lane == 0) s.row_seen[i] = 1;
      const double u_i = s.u[i];
      const float* row = dist + i * dist_stride;
      double lowest = inf;
      int lowest_key = 0x7fffffff;
      for (int c = lane; c < N; c += kWarp) {  // a lane only touches its own columns here
        if (s.col_done[c]) continue;
        const double reduced = reduced_cost(min_value, row[c], u_i, s.v[c]);
        double cost = s.path_cost[c];
        if (reduced < cost) {
          s.path[c] = i;
          s.path_cost[c] = reduced;
          cost = reduced;
        }
        keep_lowest(cost, (s.row4col[c] >= 0 ? kAssignedFlag : 0) | c, lowest, lowest_key);
      }
      const int chosen = warp_lowest(lowest, lowest_key, min_value) & (kAssignedFlag - 1);
      if (chosen % kWarp == lane) s.col_done[chosen] = 1;
      const int owner = s.row4col[chosen];
      if (owner < 0)
        sink = chosen;
      else
        i = owner;
    }
    __syncwarp();  // path costs, paths and done flags written by their lanes are visible to all
    for (int r = lane; r < rows; r += kWarp) {
      if (r == cur)
        s.u[r] = __dadd_rn(s.u[r], min_value);
      else if (s.row_seen[r])
        s.u[r] = __dadd_rn(s.u[r], __dsub_rn(min_value, s.path_cost[s.col4row[r]]));
    }
    for (int c = lane; c < N; c += kWarp)
      if (s.col_done[c]) s.v[c] = __dsub_rn(s.v[c], __dsub_rn(min_value, s.path_cost[c]));
    __syncwarp();
    if (lane == 0) augment(s, sink, cur);
    __syncwarp();
  }
  for (int r = lane; r < L; r += kWarp) out[r] = s.col4row[r];
}

// The same solver with each lane's column state (v, path cost, done, assigned) in registers: lane
// owns columns lane + 32 k, k < K, so N <= 32 K. A Dijkstra step then reads only u[i] and the
// distance row from shared memory, and a new search resets registers instead of shared arrays. Same
// arithmetic, same order of operations and the same tie rule as warp_assignment: the same perms. The
// rows seen by a search (other than cur) are exactly the rows of its done, assigned columns, so each
// column's lane updates its row's u.
// Inlined, so that the compiler sees the state is in shared memory and addresses it as such (with the
// column loop made branch-free, 1.67x faster on an H200 than the out-of-line version).
template <int K>
__device__ __forceinline__ void warp_assignment_in_registers(const float* dist, int dist_stride, int rows, int L,
                                                             int N, SolverState s, int64_t* out) {
  const int lane = threadIdx.x % kWarp;
  const double inf = __longlong_as_double(0x7ff0000000000000LL);
  double v[K], path_cost[K];
  unsigned assigned = 0;  // bit k: column lane + 32 k has a row
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c = lane + kWarp * k;
    v[k] = c < N ? s.v[c] : 0.0;
    if (c < N) s.row4col[c] = -1;
  }
  for (int r = lane; r < rows; r += kWarp) s.col4row[r] = -1;
  __syncwarp();
  for (int cur = 0; cur < rows; ++cur) {
    unsigned done = 0;  // bit k: column lane + 32 k is settled in this search
#pragma unroll
    for (int k = 0; k < K; ++k) path_cost[k] = inf;
    double min_value = 0.0;
    int i = cur, sink = -1;
    while (sink < 0) {
      const double u_i = s.u[i];
      const float* row = dist + i * dist_stride;
      double lowest = inf;
      int lowest_key = 0x7fffffff;
#pragma unroll
      for (int k = 0; k < K; ++k) {  // selects rather than branches: one path for every lane
        const int c = lane + kWarp * k;
        const bool open = c < N && !((done >> k) & 1u);
        const double reduced = reduced_cost(min_value, row[c < N ? c : N - 1], u_i, v[k]);
        const bool better = open && reduced < path_cost[k];
        if (better) s.path[c] = i;
        path_cost[k] = better ? reduced : path_cost[k];
        const int key = (((assigned >> k) & 1u) ? kAssignedFlag : 0) | c;
        keep_lowest(open ? path_cost[k] : inf, open ? key : 0x7fffffff, lowest, lowest_key);
      }
      const int chosen = warp_lowest(lowest, lowest_key, min_value) & (kAssignedFlag - 1);
      if (chosen % kWarp == lane) done |= 1u << (chosen / kWarp);
      const int owner = s.row4col[chosen];
      if (owner < 0)
        sink = chosen;
      else
        i = owner;
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (!((done >> k) & 1u)) continue;
      const double delta = __dsub_rn(min_value, path_cost[k]);
      if ((assigned >> k) & 1u) {
        const int r = s.row4col[lane + kWarp * k];
        s.u[r] = __dadd_rn(s.u[r], delta);
      }
      v[k] = __dsub_rn(v[k], delta);
    }
    if (lane == 0) s.u[cur] = __dadd_rn(s.u[cur], min_value);
    if (sink % kWarp == lane) assigned |= 1u << (sink / kWarp);
    __syncwarp();  // paths written by their lanes are visible to lane 0
    if (lane == 0) augment(s, sink, cur);
    __syncwarp();
  }
  for (int r = lane; r < L; r += kWarp) out[r] = s.col4row[r];
}

constexpr int kMaxRegisterColumns = 4;  // columns a lane keeps in registers: N <= 128

template <typename scalar_t, Metric M>
__global__ void __launch_bounds__(kMaxThreads)
    optimal_match_kernel(const scalar_t* __restrict__ pred, const scalar_t* __restrict__ target,
                         const int64_t* __restrict__ lengths, int64_t* __restrict__ perm, int N, int D, int stride,
                         int dist_stride, int chunk_floats, float* __restrict__ dist_scratch, bool in_registers,
                         bool reduced_start) {
  float* smem = dynamic_smem();
  const int64_t b = blockIdx.x;
  const int L = clamp_length(lengths[b], N);
  int64_t* out = perm + b * N;
  for (int j = L + threadIdx.x; j < N; j += blockDim.x) out[j] = -1;
  if (L == 0) return;
  float* dist = dist_scratch ? dist_scratch + b * N * dist_stride : smem + chunk_floats;
  float* solver_base = smem + chunk_floats + (dist_scratch ? 0 : N * dist_stride);
  block_distances<scalar_t, M, /*for_solver=*/true>(pred + b * N * D, target + b * N * D, L, N, D, stride,
                                                    dist_stride, smem, dist);
  if (threadIdx.x >= kWarp) return;
  const SolverState state = carve_solver(solver_base, N);
  const int rows = solver_rows(L, N, reduced_start);
  start_potentials(dist, dist_stride, rows, L, N, reduced_start, state);
  switch (in_registers ? (N + kWarp - 1) / kWarp : 0) {
    case 1: warp_assignment_in_registers<1>(dist, dist_stride, rows, L, N, state, out); break;
    case 2: warp_assignment_in_registers<2>(dist, dist_stride, rows, L, N, state, out); break;
    case 3: warp_assignment_in_registers<3>(dist, dist_stride, rows, L, N, state, out); break;
    case 4: warp_assignment_in_registers<4>(dist, dist_stride, rows, L, N, state, out); break;
    default: warp_assignment(dist, dist_stride, rows, L, N, state, out); break;
  }
  static_assert(kMaxRegisterColumns == 4, "the switch above lists every register solver");
}

at::Tensor optimal_match_cuda(const at::Tensor& pred_in, const at::Tensor& target_in, const at::Tensor& lengths_in,
                              c10::string_view metric_name) {
  const c10::cuda::CUDAGuard guard(pred_in.device());
  const Launch l = prepare_launch("optimal_match", pred_in, target_in, lengths_in, metric_name, solver_bytes);
  if (l.empty()) return l.perm;
  const int64_t N = l.N;
  // COLLAT_CUDA_OPTIMAL_SOLVER=shared keeps every column's state in shared memory even where it fits
  // in registers (for A/B timing and for the tests, which require the same perms from both).
  const char* solver = std::getenv("COLLAT_CUDA_OPTIMAL_SOLVER");
  const bool in_registers = N <= kMaxRegisterColumns * kWarp && !(solver && std::string(solver) == "shared");
  // COLLAT_CUDA_OPTIMAL_START=plain starts every problem from zero potentials (for A/B timing and the
  // tests' step counts).
  const char* start = std::getenv("COLLAT_CUDA_OPTIMAL_START");
  const bool reduced_start = !(start && std::string(start) == "plain");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype_metric(l.pred.scalar_type(), l.metric, [&](auto scalar_tag, auto metric_tag) {
    using scalar_t = decltype(scalar_tag);
    constexpr Metric M = decltype(metric_tag)::value;
    auto kernel = optimal_match_kernel<scalar_t, M>;
    allow_smem(kernel, l.plan.smem_bytes);
    launch_kernel(kernel, unsigned(l.B), l.plan.threads, l.plan.smem_bytes, stream, l.pred.data_ptr<scalar_t>(),
                  l.target.data_ptr<scalar_t>(), l.lengths.data_ptr<int64_t>(), l.perm.data_ptr<int64_t>(), int(N),
                  int(l.D), l.plan.stride, l.plan.dist_stride, l.plan.chunk_floats, l.scratch_ptr(), in_registers,
                  reduced_start);
  });
  return l.perm;
}

}  // namespace
}  // namespace cuda

#ifndef COLLAT_CUDA_EMULATION
TORCH_LIBRARY_IMPL(collat, CUDA, m) { m.impl("optimal_match", &cuda::optimal_match_cuda); }
#endif

}  // namespace collat
