// CUDA kernels of spd::capture_gram_ and spd::gather_rows. Includes ATen/c10 only (fast to compile).
//
// capture_gram_: the masked rows are gathered chunk by chunk (one gather kernel per chunk, converting
// to the gram's dtype) into one bounded buffer, and each chunk is accumulated into gram with one
// cuBLAS GEMM through at::addmm_ (accumulation in the gram's dtype; float32 grams follow torch's
// TF32 setting torch.backends.cuda.matmul.allow_tf32). Masked-out rows are never read.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../capture.h"

namespace spd {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunkElems = int64_t(1) << 22;  // 32 MiB of float64 per chunk buffer
constexpr int64_t kMaxChunkRows = 65536;

// out[r, c] = (out_t) x[rows[r], c] for r < count, c < d; grid-stride over the count * d outputs.
template <typename in_t, typename out_t>
__global__ void __launch_bounds__(kThreads)
gather_rows_kernel(const in_t* __restrict__ x, int64_t row_stride, const int64_t* __restrict__ rows,
                   int64_t count, int64_t d, out_t* __restrict__ out) {
  const int64_t total = count * d;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / d, c = e - r * d;
    out[e] = static_cast<out_t>(static_cast<at::opmath_type<in_t>>(x[rows[r] * row_stride + c]));
  }
}

template <typename in_t, typename out_t>
void launch_gather(const at::Tensor& x, const int64_t* rows, int64_t count, out_t* out) {
  const int64_t d = x.size(1);
  const int64_t total = count * d;
  if (total == 0) return;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 20);
  gather_rows_kernel<in_t, out_t>
      <<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          x.const_data_ptr<in_t>(), x.stride(0), rows, count, d, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Indices of the set mask entries, in order, as a contiguous int64 vector on the device (one sync).
at::Tensor masked_row_indices(const at::Tensor& row_mask) {
  return at::nonzero(row_mask).view({-1});
}

}  // namespace

void capture_gram_cuda(at::Tensor& gram, const at::Tensor& grad, const at::Tensor& row_mask) {
  check_capture_gram_args(gram, grad, row_mask);
  TORCH_CHECK(grad.is_cuda(), "spd::capture_gram_: CUDA kernel got a tensor on ", grad.device());
  if (grad.size(0) == 0 || grad.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor rows = masked_row_indices(row_mask);
  const int64_t m = rows.numel(), d = grad.size(1);
  if (m == 0) return;
  const int64_t chunk = std::min(m, capture_chunk_rows(d, kChunkElems, kMaxChunkRows));
  at::Tensor buf = at::empty({chunk, d}, gram.options().memory_format(at::MemoryFormat::Contiguous));
  for (int64_t start = 0; start < m; start += chunk) {
    const int64_t count = std::min(chunk, m - start);
    const int64_t* idx = rows.const_data_ptr<int64_t>() + start;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "capture_gram_cuda", [&] {
      if (gram.scalar_type() == at::kDouble) {
        launch_gather<scalar_t, double>(grad, idx, count, buf.data_ptr<double>());
      } else {
        launch_gather<scalar_t, float>(grad, idx, count, buf.data_ptr<float>());
      }
    });
    at::Tensor b = buf.narrow(0, 0, count);
    gram.addmm_(b.t(), b);  // cuBLAS on the current stream, after the gather
  }
}

at::Tensor gather_rows_cuda(const at::Tensor& x, const at::Tensor& row_mask) {
  check_gather_rows_args(x, row_mask);
  TORCH_CHECK(x.is_cuda(), "spd::gather_rows: CUDA kernel got a tensor on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor rows = masked_row_indices(row_mask);
  const int64_t m = rows.numel(), d = x.size(1);
  at::Tensor out = at::empty({m, d}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (m == 0 || d == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gather_rows_cuda", [&] {
    launch_gather<scalar_t, scalar_t>(x, rows.const_data_ptr<int64_t>(), m, out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace spd
