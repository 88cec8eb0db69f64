// Argument checks and launcher declarations for spd::capture_gram_ and spd::gather_rows.
// Header-only ATen so that .cu files stay cheap to compile.
#pragma once

#include <algorithm>

#include <ATen/ATen.h>

namespace spd {

inline bool is_capture_input_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// x [N, d] (unit stride along d, any row stride), row_mask [N] bool contiguous, same device.
inline void check_rows_and_mask(const char* op, const char* name, const at::Tensor& x,
                                const at::Tensor& row_mask) {
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be 2-D [N, d], got shape ", x.sizes());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, op, ": ", name,
              " must have unit stride along d (rows may be strided), got strides ", x.strides());
  TORCH_CHECK(is_capture_input_dtype(x.scalar_type()), op, ": ", name,
              " must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  TORCH_CHECK(row_mask.dim() == 1 && row_mask.size(0) == x.size(0), op,
              ": row_mask must be 1-D with ", name, ".shape[0] = ", x.size(0),
              " entries, got shape ", row_mask.sizes());
  TORCH_CHECK(row_mask.scalar_type() == at::kBool, op, ": row_mask must be bool, got ",
              row_mask.scalar_type());
  TORCH_CHECK(row_mask.is_contiguous(), op, ": row_mask must be contiguous");
  TORCH_CHECK(row_mask.device() == x.device(), op, ": ", name,
              " and row_mask must be on one device, got ", x.device(), ", ", row_mask.device());
}

// gram [d, d] float32/float64 (any strides), grad [N, d], row_mask [N] bool; one device.
inline void check_capture_gram_args(const at::Tensor& gram, const at::Tensor& grad,
                                    const at::Tensor& row_mask) {
  constexpr const char* op = "spd::capture_gram_";
  check_rows_and_mask(op, "grad", grad, row_mask);
  TORCH_CHECK(gram.dim() == 2 && gram.size(0) == grad.size(1) && gram.size(1) == grad.size(1), op,
              ": gram must be [d, d] with d = grad.shape[1] = ", grad.size(1), ", got shape ",
              gram.sizes());
  TORCH_CHECK(gram.scalar_type() == at::kDouble || gram.scalar_type() == at::kFloat, op,
              ": gram must be float64 or float32, got ", gram.scalar_type());
  TORCH_CHECK(gram.device() == grad.device(), op, ": gram and grad must be on one device, got ",
              gram.device(), ", ", grad.device());
  TORCH_CHECK(!gram.is_same(grad), op, ": gram and grad must be distinct tensors");
}

inline void check_gather_rows_args(const at::Tensor& x, const at::Tensor& row_mask) {
  check_rows_and_mask("spd::gather_rows", "x", x, row_mask);
}

// Rows per gathered chunk: a bounded buffer of about `elems` elements, never fewer than 256 rows
// (so that each GEMM is big enough to run near peak) and never more than `max_rows`.
inline int64_t capture_chunk_rows(int64_t d, int64_t elems, int64_t max_rows) {
  return std::clamp<int64_t>(elems / std::max<int64_t>(d, 1), 256, max_rows);
}

void capture_gram_cpu(at::Tensor& gram, const at::Tensor& grad, const at::Tensor& row_mask);
at::Tensor gather_rows_cpu(const at::Tensor& x, const at::Tensor& row_mask);
#ifdef SPD_WITH_CUDA
void capture_gram_cuda(at::Tensor& gram, const at::Tensor& grad, const at::Tensor& row_mask);
at::Tensor gather_rows_cuda(const at::Tensor& x, const at::Tensor& row_mask);
#endif

}  // namespace spd
