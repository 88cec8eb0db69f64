// CUDA spd::rsvd: cuSOLVER's randomized SVD cusolverDnXgesvdr, on torch's cuSOLVER handle and the
// current stream. Plain C++ (host calls only), so it is compiled by the host compiler, not nvcc.
//
// gesvdr computes the rank-k SVD of a column-major m x n matrix A ~ U S V^T with k + p sample
// columns (p = oversampling) and niters power iterations. Its contract, as used here:
//   - k + p < min(m, n) (hence k < min(m, n)), checked before the call (NVIDIA's own RAFT
//     randomized_svd enforces the same); oversample is reduced to fit, and where even p = 0 does
//     not fit (k = min(M, d)) the ATen algorithm of the CPU kernel is used instead (on the GPU);
//   - A (lda >= m) is overwritten, so it always gets a private copy;
//   - Srand holds min(m, n) values (the first k are used); Urand is ldu x k (ldu >= m) and Vrand
//     ldv x k (ldv >= n), each referenced only when its job is 'S'; we allocate k + p columns;
//   - workspace sizes (bytes, device and host) come from cusolverDnXgesvdr_bufferSize;
//   - d_info < 0 means the (-info)-th argument was illegal.
// A row-major [M, d] tensor is a column-major d x M matrix (A^T). We always hand gesvdr the
// orientation with m >= n (gesvd proper requires m >= n; gesvdr's docs do not say, so we do not
// rely on m < n): for M >= d the column-major M x d matrix A (a transposed copy; we want its RIGHT
// singular vectors, jobv = 'S'), for M < d the column-major d x M matrix A^T (a plain copy; we want
// its LEFT singular vectors, jobu = 'S').
#include <vector>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cusolverDn.h>

#include "../rsvd.h"

namespace spd {
namespace {

#define SPD_CUSOLVER_CHECK(EXPR)                                                                  \
  do {                                                                                            \
    const cusolverStatus_t status_ = (EXPR);                                                      \
    TORCH_CHECK(status_ == CUSOLVER_STATUS_SUCCESS, "spd::rsvd: ", #EXPR, " failed: ",            \
                at::cuda::solver::cusolverGetErrorMessage(status_), " (status ",                  \
                static_cast<int>(status_), ")");                                                  \
  } while (0)

struct DnParams {
  cusolverDnParams_t p = nullptr;
  DnParams() { SPD_CUSOLVER_CHECK(cusolverDnCreateParams(&p)); }
  ~DnParams() {
    if (p) cusolverDnDestroyParams(p);
  }
  DnParams(const DnParams&) = delete;
  DnParams& operator=(const DnParams&) = delete;
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> rsvd_cuda(const at::Tensor& a, int64_t k, int64_t oversample,
                                             int64_t niters, int64_t seed) {
  check_rsvd_args(a, k, oversample, niters);
  TORCH_CHECK(a.is_cuda(), "spd::rsvd: CUDA kernel got a tensor on ", a.device());
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t M = a.size(0), d = a.size(1);
  const int64_t mn = std::min(M, d);
  if (k >= mn) return rsvd_aten(a, k, oversample, niters, seed);  // gesvdr needs k + p < min(m, n)
  const int64_t p = std::min(oversample, mn - 1 - k);

  const bool tall = M >= d;  // column-major m x n with m >= n
  const int64_t m = tall ? M : d, n = tall ? d : M;
  // Column-major m x n buffer: for tall, A itself (row-major [d, M] = a^T contiguous); else A^T
  // (row-major [M, d] = a contiguous). Always a private copy: gesvdr destroys its input.
  const auto opts = a.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor work = tall ? at::empty({d, M}, opts) : at::empty({M, d}, opts);
  work.copy_(tall ? a.t() : a);  // never a view of a (.contiguous() may return one)
  const int64_t lda = m;
  at::Tensor s = at::empty({n}, opts);          // min(m, n) = n singular values
  at::Tensor vecs = at::empty({k + p, d}, opts);  // column-major d x (k + p): ld = d
  const signed char jobu = tall ? 'N' : 'S';
  const signed char jobv = tall ? 'S' : 'N';
  void* u_ptr = tall ? nullptr : vecs.data_ptr();
  void* v_ptr = tall ? vecs.data_ptr() : nullptr;
  const int64_t ldu = m, ldv = n;  // valid even where not referenced
  const cudaDataType dtype = a.scalar_type() == at::kDouble ? CUDA_R_64F : CUDA_R_32F;

  cusolverDnHandle_t handle = at::cuda::getCurrentCUDASolverDnHandle();
  SPD_CUSOLVER_CHECK(cusolverDnSetStream(handle, at::cuda::getCurrentCUDAStream()));
  DnParams params;
  size_t device_bytes = 0, host_bytes = 0;
  SPD_CUSOLVER_CHECK(cusolverDnXgesvdr_bufferSize(
      handle, params.p, jobu, jobv, m, n, k, p, niters, dtype, work.data_ptr(), lda, dtype,
      s.data_ptr(), dtype, u_ptr, ldu, dtype, v_ptr, ldv, dtype, &device_bytes, &host_bytes));
  at::Tensor device_ws =
      at::empty({static_cast<int64_t>(std::max<size_t>(device_bytes, 1))}, a.options().dtype(at::kByte));
  std::vector<char> host_ws(std::max<size_t>(host_bytes, 1));
  at::Tensor info = at::zeros({1}, a.options().dtype(at::kInt));
  SPD_CUSOLVER_CHECK(cusolverDnXgesvdr(
      handle, params.p, jobu, jobv, m, n, k, p, niters, dtype, work.data_ptr(), lda, dtype,
      s.data_ptr(), dtype, u_ptr, ldu, dtype, v_ptr, ldv, dtype, device_ws.data_ptr(), device_bytes,
      host_ws.data(), host_bytes, info.data_ptr<int>()));
  const int info_host = info.item<int>();  // synchronises the stream (host_ws must outlive the call)
  TORCH_CHECK(info_host == 0, "spd::rsvd: cusolverDnXgesvdr reported info = ", info_host,
              info_host < 0 ? " (an illegal argument)" : " (did not converge)", " for a of shape ",
              a.sizes(), ", k = ", k, ", p = ", p, ", niters = ", niters);
  // vecs row j = singular vector j (a column of the column-major d x (k + p) result).
  at::Tensor v = rsvd_fix_signs(vecs.narrow(0, 0, k).t());  // [d, k]
  return {s.narrow(0, 0, k).contiguous(), v.contiguous()};
}

}  // namespace spd
