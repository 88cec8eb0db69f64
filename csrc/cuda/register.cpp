// Registers the CUDA kernels (compiled by nvcc in *.cu) and the cuSOLVER wrapper with the dispatcher.
#include <torch/library.h>

#include "../capture.h"
#include "../project_rows.h"
#include "../rsvd.h"

TORCH_LIBRARY_IMPL(spd, CUDA, m) {
  m.impl("project_rows_", &spd::project_rows_cuda);
  m.impl("capture_gram_", &spd::capture_gram_cuda);
  m.impl("gather_rows", &spd::gather_rows_cuda);
  m.impl("rsvd", &spd::rsvd_cuda);
}
