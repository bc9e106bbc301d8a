// The schema of every custom op, declared once. One implementation per backend lives beside it:
// <op>.cpp registers the CPU kernel, <op>.cu the CUDA kernel (TORCH_LIBRARY_IMPL), and
// collat/matching.py registers the fake (meta) implementation for torch.compile.
#include <torch/extension.h>

TORCH_LIBRARY(collat, m) {
  // perm[b, j] = predicted row matched to text row j (greedy, right-to-left), -1 for j >= lengths[b].
  m.def("greedy_match(Tensor pred, Tensor target, Tensor lengths, str metric) -> Tensor");
  // Same contract, exact minimum-cost rectangular assignment.
  m.def("optimal_match(Tensor pred, Tensor target, Tensor lengths, str metric) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "collat custom ops; use them through torch.ops.collat or collat.ops";
}
