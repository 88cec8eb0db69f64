// Registers the CUDA kernels (compiled by nvcc in *.cu) with the dispatcher.
#include <torch/library.h>

#include "../project_rows.h"

TORCH_LIBRARY_IMPL(spd, CUDA, m) {
  m.impl("project_rows_", &spd::project_rows_cuda);
}
