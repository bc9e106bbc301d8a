// The CUDA matching kernels (csrc/*_cuda.cu), compiled as C++ against csrc/cuda_emulation.h and
// bound to Python for tests/test_cuda_emulation.py. Built by the test with -DCOLLAT_CUDA_EMULATION.
#include "greedy_match_cuda.cu"
#include "optimal_match_cuda.cu"

namespace {

at::Tensor greedy_match(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& lengths,
                        const std::string& metric) {
  return collat::cuda::greedy_match_cuda(pred, target, lengths, metric);
}

at::Tensor optimal_match(const at::Tensor& pred, const at::Tensor& target, const at::Tensor& lengths,
                         const std::string& metric) {
  return collat::cuda::optimal_match_cuda(pred, target, lengths, metric);
}

void configure(int optin_smem_bytes, int order, uint64_t seed, int poison) {
  TORCH_CHECK(order >= 0 && order <= 2, "order must be 0 (forward), 1 (reverse) or 2 (shuffled), got ", order);
  TORCH_CHECK(poison >= 0 && poison <= 255, "poison must be a byte, got ", poison);
  collat_emu::Runtime& r = collat_emu::runtime();
  r.optin_smem_bytes = optin_smem_bytes;
  r.order = static_cast<collat_emu::Order>(order);
  r.seed = seed;
  r.poison = static_cast<unsigned char>(poison);
  r.max_dynamic_smem.clear();
}

// Faulty kernels, for the tests that check what the emulation refuses or exposes.
__global__ void warp_op_after_lanes_exit() {
  if (threadIdx.x % 32 != 0) return;
  __syncwarp();
}

__global__ void partial_warp_mask() { __syncwarp(0x0000ffffu); }

__global__ void write_past_shared_memory(int floats) {
  if (threadIdx.x == 0) collat::cuda::dynamic_smem()[floats] = 1.f;
}

__global__ void read_without_barrier(float* out) {  // thread 0 writes, the others read, no __syncthreads
  float* smem = collat::cuda::dynamic_smem();
  if (threadIdx.x == 0) smem[0] = 1.f;
  out[threadIdx.x] = smem[0];
}

void run_faulty(const std::string& kind, int64_t smem_bytes, at::Tensor out) {
  if (kind == "warp_op_after_lanes_exit")
    collat_emu::launch_kernel(warp_op_after_lanes_exit, 1, 64, 0, nullptr);
  else if (kind == "partial_warp_mask")
    collat_emu::launch_kernel(partial_warp_mask, 1, 32, 0, nullptr);
  else if (kind == "write_past_shared_memory")
    collat_emu::launch_kernel(write_past_shared_memory, 1, 32, size_t(smem_bytes), nullptr, int(smem_bytes / 4));
  else if (kind == "read_without_barrier")
    collat_emu::launch_kernel(read_without_barrier, 1, int(out.numel()), size_t(smem_bytes), nullptr,
                              out.data_ptr<float>());
  else
    TORCH_CHECK(false, "unknown faulty kernel '", kind, "'");
}

pybind11::dict last_launch() {
  const collat_emu::Runtime& r = collat_emu::runtime();
  pybind11::dict out;
  out["launches"] = r.launches;
  out["blocks"] = r.last_blocks;
  out["threads"] = r.last_threads;
  out["smem_bytes"] = r.last_smem_bytes;
  out["warp_reductions"] = r.last_warp_reductions;
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("greedy_match", &greedy_match);
  m.def("optimal_match", &optimal_match);
  m.def("configure", &configure, pybind11::arg("optin_smem_bytes") = 232448, pybind11::arg("order") = 0,
        pybind11::arg("seed") = 0, pybind11::arg("poison") = 0xFF);
  m.def("last_launch", &last_launch);
  m.def("run_faulty", &run_faulty);
}
