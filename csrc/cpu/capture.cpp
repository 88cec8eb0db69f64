// CPU kernels of spd::capture_gram_ (gram += sum over masked rows of g_i g_i^T) and
// spd::gather_rows (the masked rows, in order).
//
// capture_gram_ never materialises the gathered rows: masked rows are gathered (and converted to
// the gram's dtype) chunk by chunk into one bounded buffer, and each chunk is accumulated with one
// BLAS GEMM (at::addmm_; on the upper block-triangle only for large calls, see accumulate_upper):
// the cost is the GEMM on the masked rows plus one pass over them.
#include <cstring>
#include <type_traits>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../capture.h"

namespace spd {
namespace {

// Chunk buffer: ~4 MiB of float64 (512 rows at d = 1024), at least 256 rows so that each GEMM runs
// near peak. Measured on 2 threads: chunk sizes from 256 to 8192 rows are within noise of each other.
constexpr int64_t kChunkElems = int64_t(1) << 19;
constexpr int64_t kMaxChunkRows = 8192;

std::vector<int64_t> masked_rows(const at::Tensor& row_mask) {
  const bool* mask = row_mask.const_data_ptr<bool>();
  const int64_t n = row_mask.numel();
  std::vector<int64_t> rows;
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += mask[i];
  rows.reserve(count);
  for (int64_t i = 0; i < n; ++i)
    if (mask[i]) rows.push_back(i);
  return rows;
}

// out[r, :] = (out_t) x[rows[r], :] for r in [0, count).
template <typename in_t, typename out_t>
void gather_convert(const in_t* x, int64_t row_stride, const int64_t* rows, int64_t count, int64_t d,
                    out_t* out) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const in_t* src = x + rows[r] * row_stride;
      out_t* dst = out + r * d;
      if constexpr (std::is_same_v<in_t, out_t>) {
        std::memcpy(dst, src, sizeof(out_t) * d);
      } else {
        for (int64_t c = 0; c < d; ++c)
          dst[c] = static_cast<out_t>(static_cast<at::opmath_type<in_t>>(src[c]));
      }
    }
  });
}

// Symmetric accumulation for large calls: b^T b is symmetric, so only its upper block-triangle is
// computed, into a zeroed d x d scratch, one GEMM per band of kSymBlock rows
// (delta[i0:i1, i0:] += b[:, i0:i1]^T b[:, i0:]); at the end of the call gram += delta and its
// strictly-lower blocks += the transposed upper ones (gram itself need not be symmetric). That is
// (1/2 + kSymBlock / 2d) of the full GEMM's flops: 56% at d = 1024 (what BLAS syrk would do; ATen
// exposes no syrk). Used when d >= 2 kSymBlock and the call has >= d rows, so that the O(d^2)
// finish is small next to the GEMMs; otherwise one full GEMM per chunk straight into gram.
constexpr int64_t kSymBlock = 128;

bool use_symmetric(int64_t d, int64_t m) { return d >= 2 * kSymBlock && m >= d; }

void accumulate_upper(at::Tensor& delta, const at::Tensor& b) {
  const int64_t d = delta.size(0);
  for (int64_t i0 = 0; i0 < d; i0 += kSymBlock) {
    const int64_t nb = std::min(kSymBlock, d - i0);
    at::Tensor band = delta.narrow(0, i0, nb).narrow(1, i0, d - i0);
    band.addmm_(b.narrow(1, i0, nb).t(), b.narrow(1, i0, d - i0));
  }
}

void add_symmetric(at::Tensor& gram, const at::Tensor& delta) {
  const int64_t d = gram.size(0);
  for (int64_t i0 = 0; i0 < d; i0 += kSymBlock) {
    const int64_t nb = std::min(kSymBlock, d - i0), j0 = i0 + nb;
    // the band: diagonal block (both triangles computed) and the upper blocks to its right
    gram.narrow(0, i0, nb).narrow(1, i0, d - i0).add_(delta.narrow(0, i0, nb).narrow(1, i0, d - i0));
    if (j0 < d)  // the lower blocks below the diagonal block: transposes of the upper ones
      gram.narrow(0, j0, d - j0).narrow(1, i0, nb).add_(delta.narrow(0, i0, nb).narrow(1, j0, d - j0).t());
  }
}

template <typename in_t, typename gram_t>
void capture_chunks(at::Tensor& gram, const at::Tensor& grad, const std::vector<int64_t>& rows) {
  const int64_t d = grad.size(1), m = static_cast<int64_t>(rows.size());
  const int64_t chunk = std::min(m, capture_chunk_rows(d, kChunkElems, kMaxChunkRows));
  at::Tensor buf = at::empty({chunk, d}, gram.options().memory_format(at::MemoryFormat::Contiguous));
  const in_t* x = grad.const_data_ptr<in_t>();
  const bool symmetric = use_symmetric(d, m);
  at::Tensor delta = symmetric ? at::zeros({d, d}, buf.options()) : at::Tensor();
  for (int64_t start = 0; start < m; start += chunk) {
    const int64_t count = std::min(chunk, m - start);
    gather_convert<in_t, gram_t>(x, grad.stride(0), rows.data() + start, count, d,
                                 buf.data_ptr<gram_t>());
    at::Tensor b = buf.narrow(0, 0, count);
    if (symmetric) {
      accumulate_upper(delta, b);
    } else {
      gram.addmm_(b.t(), b);  // gram += b^T b over the gathered rows only
    }
  }
  if (symmetric) add_symmetric(gram, delta);
}

}  // namespace

void capture_gram_cpu(at::Tensor& gram, const at::Tensor& grad, const at::Tensor& row_mask) {
  check_capture_gram_args(gram, grad, row_mask);
  TORCH_CHECK(grad.device().is_cpu(), "spd::capture_gram_: CPU kernel got a tensor on ", grad.device());
  if (grad.size(0) == 0 || grad.size(1) == 0) return;
  const std::vector<int64_t> rows = masked_rows(row_mask);
  if (rows.empty()) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "capture_gram_cpu", [&] {
    if (gram.scalar_type() == at::kDouble) {
      capture_chunks<scalar_t, double>(gram, grad, rows);
    } else {
      capture_chunks<scalar_t, float>(gram, grad, rows);
    }
  });
}

at::Tensor gather_rows_cpu(const at::Tensor& x, const at::Tensor& row_mask) {
  check_gather_rows_args(x, row_mask);
  TORCH_CHECK(x.device().is_cpu(), "spd::gather_rows: CPU kernel got a tensor on ", x.device());
  const std::vector<int64_t> rows = masked_rows(row_mask);
  const int64_t m = static_cast<int64_t>(rows.size()), d = x.size(1);
  at::Tensor out = at::empty({m, d}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (m == 0 || d == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gather_rows_cpu", [&] {
    gather_convert<scalar_t, scalar_t>(x.const_data_ptr<scalar_t>(), x.stride(0), rows.data(), m, d,
                                       out.data_ptr<scalar_t>());
  });
  return out;
}

TORCH_LIBRARY_IMPL(spd, CPU, m) {
  m.impl("capture_gram_", &capture_gram_cpu);
  m.impl("gather_rows", &gather_rows_cpu);
}

}  // namespace spd
