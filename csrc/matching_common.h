// Shared by the CPU and CUDA matching kernels: metric parsing and the op-level input checks.
//
// The arithmetic contract that makes perms bit-identical across backends: every distance is one
// sequential fp32 sum over d = 0..D-1 (inputs converted to fp32 first, each add and multiply rounded
// on its own, never fused), so CPU lanes and CUDA threads produce the same bits.
//   l1:     sum |t - p|
//   l2:     sum (t - p) * (t - p)
//   cosine: 1 - dot / max(sqrt(|t|^2) * sqrt(|p|^2), 1e-8), dot and the squared norms summed the same way
// A NaN distance counts as +inf when choosing (so a row is always matched), and the optimal solver
// sees NaN/inf costs as FLT_MAX so that the assignment stays feasible.
#pragma once

#include <torch/extension.h>

#include <string>

namespace collat {

enum class Metric : int { L1 = 0, L2 = 1, Cosine = 2 };

constexpr float kCosineEps = 1e-8f;

inline Metric parse_metric(const std::string& metric) {
  if (metric == "l1") return Metric::L1;
  if (metric == "l2") return Metric::L2;
  if (metric == "cosine") return Metric::Cosine;
  TORCH_CHECK(false, "metric must be one of 'l1', 'l2', 'cosine', got '", metric, "'");
}

// The raw op's own checks (the Python front raises friendlier ValueError/TypeError first).
inline void check_match_inputs(const char* op, const at::Tensor& pred, const at::Tensor& target,
                               const at::Tensor& lengths) {
  TORCH_CHECK(pred.dim() == 3, op, ": pred must be [B, N, D], got ", pred.sizes());
  TORCH_CHECK(target.sizes() == pred.sizes(), op, ": target must have pred's shape ", pred.sizes(),
              ", got ", target.sizes());
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == pred.size(0), op, ": lengths must be [B] = [",
              pred.size(0), "], got ", lengths.sizes());
  TORCH_CHECK(lengths.scalar_type() == at::kInt || lengths.scalar_type() == at::kLong, op,
              ": lengths must be int32 or int64, got ", lengths.scalar_type());
  const auto dtype = pred.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": pred must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(target.scalar_type() == dtype, op, ": target dtype ", target.scalar_type(),
              " must equal pred dtype ", dtype);
  TORCH_CHECK(target.device() == pred.device() && lengths.device() == pred.device(), op,
              ": pred, target and lengths must be on one device, got ", pred.device(), ", ",
              target.device(), ", ", lengths.device());
  TORCH_CHECK(pred.size(1) < (1 << 30) && pred.size(2) < (int64_t(1) << 31), op,
              ": N and D must fit in int32");
}

}  // namespace collat
