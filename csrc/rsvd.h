// Argument checks and declarations for spd::rsvd (randomized SVD: top-k singular values and
// right singular vectors of a [M, d] matrix).
#pragma once

#include <tuple>

#include <ATen/ATen.h>

namespace spd {

inline void check_rsvd_args(const at::Tensor& a, int64_t k, int64_t oversample, int64_t niters) {
  constexpr const char* op = "spd::rsvd";
  TORCH_CHECK(a.dim() == 2, op, ": a must be 2-D [M, d], got shape ", a.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble, op,
              ": a must be float32 or float64, got ", a.scalar_type());
  const int64_t mn = std::min(a.size(0), a.size(1));
  TORCH_CHECK(mn >= 1, op, ": a must be non-empty, got shape ", a.sizes());
  TORCH_CHECK(k >= 1 && k <= mn, op, ": k must be in [1, min(M, d)] = [1, ", mn, "], got k = ", k,
              " for a of shape ", a.sizes());
  TORCH_CHECK(oversample >= 0, op, ": oversample must be >= 0, got ", oversample);
  TORCH_CHECK(niters >= 0, op, ": niters must be >= 0, got ", niters);
}

// Randomized range finder with power iterations (Halko, Martinsson & Tropp 2011, alg. 4.4 with
// re-orthonormalisation) written with ATen ops, so it runs on any device. The Gaussian test matrix
// is drawn on the CPU from a generator seeded with `seed` (the same numbers as
// torch.randn(d, l, generator=torch.Generator().manual_seed(seed), dtype=a.dtype)), so results are
// deterministic for a seed. V's column signs are fixed: the largest-magnitude entry is positive.
std::tuple<at::Tensor, at::Tensor> rsvd_aten(const at::Tensor& a, int64_t k, int64_t oversample,
                                             int64_t niters, int64_t seed);

// Column-sign convention shared by every rsvd path: returns v [d, k] with each column's
// largest-magnitude entry made positive.
at::Tensor rsvd_fix_signs(const at::Tensor& v);

#ifdef SPD_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> rsvd_cuda(const at::Tensor& a, int64_t k, int64_t oversample,
                                             int64_t niters, int64_t seed);
#endif

}  // namespace spd
