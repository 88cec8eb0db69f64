// Operator schemas of the `spd` namespace and the pybind11 build-information module spd_ext._C.
// Kernels live in cpu/ and cuda/; fake (meta) kernels are registered in spd_ext/ops.py.
#include <torch/extension.h>

#ifndef SPD_VERSION
#define SPD_VERSION "unknown"
#endif
#ifndef SPD_TORCH_VERSION
#define SPD_TORCH_VERSION "unknown"
#endif
#ifndef SPD_CUDA_ARCHS
#define SPD_CUDA_ARCHS ""
#endif
#ifndef SPD_BUILD_SYSTEM
#define SPD_BUILD_SYSTEM "unknown"
#endif
#ifndef SPD_CUDA_VERSION
#define SPD_CUDA_VERSION ""
#endif

TORCH_LIBRARY(spd, m) {
  // x[i] <- B_s (B_s^T x[i]) in place for every row i with index[i] = s >= 0; rows with -1 untouched.
  m.def("project_rows_(Tensor(a!) x, Tensor bases, Tensor index) -> ()");
  // gram += sum over rows i with row_mask[i] of grad[i] grad[i]^T, in gram's dtype (float64/float32).
  m.def("capture_gram_(Tensor(a!) gram, Tensor grad, Tensor row_mask) -> ()");
  // The rows of x with row_mask set, in order: [M, d].
  m.def("gather_rows(Tensor x, Tensor row_mask) -> Tensor");
  // Randomized SVD of a [M, d]: top-k singular values S [k] and right singular vectors V [d, k].
  m.def("rsvd(Tensor a, int k, int oversample=10, int niters=2, int seed=0) -> (Tensor S, Tensor V)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "spd native extension: ops are registered under torch.ops.spd";
  m.def("build_info", [] {
    pybind11::dict info;
    info["version"] = SPD_VERSION;
    info["torch_version"] = SPD_TORCH_VERSION;
#ifdef SPD_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
    info["cuda_version"] = SPD_CUDA_VERSION;
    info["cuda_archs"] = SPD_CUDA_ARCHS;
    info["build_system"] = SPD_BUILD_SYSTEM;
    return info;
  });
}
