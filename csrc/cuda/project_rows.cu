// CUDA kernel of spd::project_rows_: x[i] <- B_s (B_s^T x[i]) in place for rows with index[i] = s >= 0.
// One launch for the whole batch; one block per row. Includes ATen only (fast to compile).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../project_rows.h"

namespace spd {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t, typename basis_t>
__global__ void __launch_bounds__(kThreads)
project_rows_kernel(scalar_t* __restrict__ x, int64_t row_stride, const basis_t* __restrict__ bases,
                    const int64_t* __restrict__ index, int64_t d, int64_t r, int64_t s) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ unsigned char smem[];
  acc_t* row = reinterpret_cast<acc_t*>(smem);  // [d]
  acc_t* coeff = row + d;                        // [r]

  const int64_t sub = index[blockIdx.x];
  if (sub == -1) return;  // uniform across the block: untouched row
  CUDA_KERNEL_ASSERT(sub >= 0 && sub < s);
  if (sub < 0 || sub >= s) return;
  scalar_t* xi = x + static_cast<int64_t>(blockIdx.x) * row_stride;
  const basis_t* basis = bases + sub * d * r;

  for (int64_t k = threadIdx.x; k < d; k += blockDim.x) row[k] = static_cast<acc_t>(xi[k]);
  __syncthreads();

  // coeff = B^T x: one thread per column j, reads of B coalesced along j.
  for (int64_t j = threadIdx.x; j < r; j += blockDim.x) {
    acc_t acc = 0;
    for (int64_t k = 0; k < d; ++k) acc += row[k] * static_cast<acc_t>(basis[k * r + j]);
    coeff[j] = acc;
  }
  __syncthreads();

  // x = B coeff: one warp per output k, lanes along j (coalesced), shuffle reduction.
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int n_warps = blockDim.x / kWarp;
  for (int64_t k = warp; k < d; k += n_warps) {
    acc_t acc = 0;
    for (int64_t j = lane; j < r; j += kWarp) acc += static_cast<acc_t>(basis[k * r + j]) * coeff[j];
    acc = warp_sum(acc);
    if (lane == 0) xi[k] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename basis_t>
void launch(at::Tensor& x, const at::Tensor& bases, const at::Tensor& index) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = x.size(0), d = x.size(1), r = bases.size(2), s = bases.size(0);
  const size_t smem = static_cast<size_t>(d + r) * sizeof(acc_t);
  TORCH_CHECK(smem <= 48 * 1024, "spd::project_rows_: d + r = ", d + r,
              " is too large for the CUDA kernel (at most ", 48 * 1024 / sizeof(acc_t), ")");
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), "spd::project_rows_: too many rows (", n, ")");
  auto stream = c10::cuda::getCurrentCUDAStream();
  project_rows_kernel<scalar_t, basis_t><<<static_cast<unsigned>(n), kThreads, smem, stream>>>(
      x.data_ptr<scalar_t>(), x.stride(0), bases.const_data_ptr<basis_t>(),
      index.const_data_ptr<int64_t>(), d, r, s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void project_rows_cuda(at::Tensor& x, const at::Tensor& bases, const at::Tensor& index) {
  check_project_rows_args(x, bases, index);
  TORCH_CHECK(x.is_cuda(), "spd::project_rows_: CUDA kernel got a tensor on ", x.device());
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "project_rows_cuda", [&] {
    if (bases.scalar_type() == x.scalar_type()) {
      launch<scalar_t, scalar_t>(x, bases, index);
    } else {
      launch<scalar_t, float>(x, bases, index);
    }
  });
}

}  // namespace spd
