// Argument checks and launcher declarations for spd::project_rows_.
// Header-only ATen so that .cu files stay cheap to compile.
#pragma once

#include <ATen/ATen.h>

namespace spd {

// x [N, d] (unit stride along d, any row stride), bases [S, d, r] contiguous with
// orthonormal columns, index [N] int64 with values in [-1, S).
inline void check_project_rows_args(const at::Tensor& x, const at::Tensor& bases,
                                    const at::Tensor& index) {
  TORCH_CHECK(x.dim() == 2, "spd::project_rows_: x must be 2-D [N, d], got shape ", x.sizes());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1,
              "spd::project_rows_: x must have unit stride along d (rows may be strided), got strides ",
              x.strides());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kDouble,
              "spd::project_rows_: x must be float32, float16, bfloat16 or float64, got ",
              x.scalar_type());
  TORCH_CHECK(bases.dim() == 3, "spd::project_rows_: bases must be 3-D [S, d, r], got shape ",
              bases.sizes());
  TORCH_CHECK(bases.size(1) == x.size(1), "spd::project_rows_: bases.shape[1] (", bases.size(1),
              ") must equal x.shape[1] (", x.size(1), ")");
  TORCH_CHECK(bases.is_contiguous(), "spd::project_rows_: bases must be contiguous");
  TORCH_CHECK(bases.scalar_type() == x.scalar_type() || bases.scalar_type() == at::kFloat,
              "spd::project_rows_: bases must be float32 or the dtype of x (", x.scalar_type(),
              "), got ", bases.scalar_type());
  TORCH_CHECK(index.dim() == 1 && index.size(0) == x.size(0),
              "spd::project_rows_: index must be 1-D with x.shape[0] = ", x.size(0),
              " entries, got shape ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kLong, "spd::project_rows_: index must be int64, got ",
              index.scalar_type());
  TORCH_CHECK(index.is_contiguous(), "spd::project_rows_: index must be contiguous");
  TORCH_CHECK(bases.device() == x.device() && index.device() == x.device(),
              "spd::project_rows_: x, bases and index must be on one device, got ", x.device(), ", ",
              bases.device(), ", ", index.device());
}

void project_rows_cpu(at::Tensor& x, const at::Tensor& bases, const at::Tensor& index);
#ifdef SPD_WITH_CUDA
void project_rows_cuda(at::Tensor& x, const at::Tensor& bases, const at::Tensor& index);
#endif

}  // namespace spd
