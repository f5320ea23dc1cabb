// Build and driver versions of the CUDA extension (see cuda_info.h).
#include <cuda_runtime.h>

#include "common/cuda_info.h"

namespace spar {

int cuda_driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return v;
}

int cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace spar
