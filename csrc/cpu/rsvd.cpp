// spd::rsvd with ATen ops (the CPU kernel, and the CUDA fallback where cuSOLVER's gesvdr does not
// apply): randomized range finder with power iterations, then an exact SVD of the small projection.
#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include "../rsvd.h"

namespace spd {

at::Tensor rsvd_fix_signs(const at::Tensor& v) {
  if (v.numel() == 0) return v;
  at::Tensor idx = v.abs().argmax(0, /*keepdim=*/true);               // [1, k]
  at::Tensor sign = at::where(v.gather(0, idx) < 0, -1.0, 1.0).to(v.scalar_type());
  return v * sign;
}

std::tuple<at::Tensor, at::Tensor> rsvd_aten(const at::Tensor& a, int64_t k, int64_t oversample,
                                             int64_t niters, int64_t seed) {
  check_rsvd_args(a, k, oversample, niters);
  const int64_t d = a.size(1);
  const int64_t l = std::min(k + oversample, std::min(a.size(0), d));
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
  at::Tensor omega = at::randn({d, l}, gen, a.options().device(at::kCPU)).to(a.device());
  // Orthonormal basis of range(A Omega), refined by power iterations on (A A^T).
  at::Tensor q = std::get<0>(at::linalg_qr(at::matmul(a, omega)));          // [M, l]
  for (int64_t i = 0; i < niters; ++i) {
    at::Tensor z = std::get<0>(at::linalg_qr(at::matmul(a.t(), q)));        // [d, l]
    q = std::get<0>(at::linalg_qr(at::matmul(a, z)));                       // [M, l]
  }
  at::Tensor b = at::matmul(q.t(), a);                                      // [l, d]
  auto [ub, s, vh] = at::linalg_svd(b, /*full_matrices=*/false);            // vh [l, d]
  at::Tensor v = rsvd_fix_signs(vh.narrow(0, 0, k).t());                    // [d, k]
  return {s.narrow(0, 0, k).contiguous(), v.contiguous()};
}

TORCH_LIBRARY_IMPL(spd, CPU, m) {
  m.impl("rsvd", &rsvd_aten);
}

}  // namespace spd
