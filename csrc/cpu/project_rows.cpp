// CPU kernel of spd::project_rows_: x[i] <- B_s (B_s^T x[i]) in place for rows with index[i] = s >= 0.
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../project_rows.h"

namespace spd {
namespace {

template <typename scalar_t, typename basis_t>
void project_rows_kernel(scalar_t* x, int64_t row_stride, const basis_t* bases,
                         const int64_t* index, int64_t n, int64_t d, int64_t r, int64_t s) {
  using acc_t = at::opmath_type<scalar_t>;
  // Grain: enough rows per task that the per-task buffers and scheduling are amortised.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d * r / 64));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(d), coeff(r);  // per task, O(d + r): never the size of x
    for (int64_t i = begin; i < end; ++i) {
      const int64_t sub = index[i];
      if (sub == -1) continue;
      TORCH_CHECK(sub >= 0 && sub < s, "spd::project_rows_: index[", i, "] = ", sub,
                  " is outside [-1, ", s, ")");
      scalar_t* xi = x + i * row_stride;
      const basis_t* basis = bases + sub * d * r;
      for (int64_t k = 0; k < d; ++k) row[k] = static_cast<acc_t>(xi[k]);
      std::fill(coeff.begin(), coeff.end(), acc_t(0));
      for (int64_t k = 0; k < d; ++k) {  // coeff = B^T x, streaming B row by row
        const acc_t xk = row[k];
        const basis_t* bk = basis + k * r;
        for (int64_t j = 0; j < r; ++j) coeff[j] += xk * static_cast<acc_t>(bk[j]);
      }
      for (int64_t k = 0; k < d; ++k) {  // x = B coeff
        const basis_t* bk = basis + k * r;
        acc_t acc = 0;
        for (int64_t j = 0; j < r; ++j) acc += static_cast<acc_t>(bk[j]) * coeff[j];
        xi[k] = static_cast<scalar_t>(acc);
      }
    }
  });
}

template <typename scalar_t>
void dispatch_basis(at::Tensor& x, const at::Tensor& bases, const at::Tensor& index) {
  const int64_t n = x.size(0), d = x.size(1), r = bases.size(2), s = bases.size(0);
  if (bases.scalar_type() == x.scalar_type()) {
    project_rows_kernel<scalar_t, scalar_t>(x.data_ptr<scalar_t>(), x.stride(0),
                                            bases.const_data_ptr<scalar_t>(),
                                            index.const_data_ptr<int64_t>(), n, d, r, s);
  } else {
    project_rows_kernel<scalar_t, float>(x.data_ptr<scalar_t>(), x.stride(0),
                                         bases.const_data_ptr<float>(),
                                         index.const_data_ptr<int64_t>(), n, d, r, s);
  }
}

// Rows per GEMM chunk: bounds the temporaries to kChunkRows x d (never the size of x).
constexpr int64_t kChunkRows = 512;
// A subspace with at least this many rows goes through BLAS (prefill); fewer rows (decode steps)
// take the row loop above, whose per-call cost is lower.
constexpr int64_t kGemmMinRows = 32;

// Rows of x whose index is s, projected with two GEMMs per chunk in the accumulation dtype.
void project_group_gemm(at::Tensor& x, const at::Tensor& basis, const at::Tensor& rows) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor b = basis.to(acc);
  for (int64_t start = 0; start < rows.numel(); start += kChunkRows) {
    const at::Tensor idx = rows.narrow(0, start, std::min(kChunkRows, rows.numel() - start));
    const at::Tensor chunk = x.index_select(0, idx).to(acc);
    x.index_copy_(0, idx, at::mm(at::mm(chunk, b), b.t()).to(x.scalar_type()));
  }
}

}  // namespace

void project_rows_cpu(at::Tensor& x, const at::Tensor& bases, const at::Tensor& index) {
  check_project_rows_args(x, bases, index);
  TORCH_CHECK(x.device().is_cpu(), "spd::project_rows_: CPU kernel got a tensor on ", x.device());
  if (x.numel() == 0) return;
  const int64_t n = x.size(0), s = bases.size(0);
  if (n >= kGemmMinRows) {  // group rows by subspace; large groups through BLAS
    const int64_t* idx = index.const_data_ptr<int64_t>();
    std::vector<std::vector<int64_t>> groups(s);
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(idx[i] >= -1 && idx[i] < s, "spd::project_rows_: index[", i, "] = ", idx[i],
                  " is outside [-1, ", s, ")");
      if (idx[i] >= 0) groups[idx[i]].push_back(i);
    }
    at::Tensor rest = index.clone();  // rows left for the row loop (-1 marks handled/untouched)
    int64_t* rest_idx = rest.data_ptr<int64_t>();
    for (int64_t g = 0; g < s; ++g) {
      if (static_cast<int64_t>(groups[g].size()) < kGemmMinRows) continue;
      project_group_gemm(x, bases[g], at::tensor(groups[g], index.options()));
      for (int64_t i : groups[g]) rest_idx[i] = -1;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "project_rows_cpu",
                                    [&] { dispatch_basis<scalar_t>(x, bases, rest); });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "project_rows_cpu",
                                  [&] { dispatch_basis<scalar_t>(x, bases, index); });
}

TORCH_LIBRARY_IMPL(spd, CPU, m) {
  m.impl("project_rows_", &project_rows_cpu);
}

}  // namespace spd
