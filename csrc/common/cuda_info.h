// What the CUDA extension was built with and what the machine's driver supports, for the
// run-time check that a device can run the extension (spar_kernels/_device.py).
#pragma once

namespace spar {
// cudaDriverGetVersion: the CUDA version the installed driver supports (e.g. 12040 for 12.4),
// 0 when no driver is installed. Touches no device.
int cuda_driver_version();
// CUDART_VERSION of the toolkit the extension was compiled with (cudart is linked statically).
int cuda_runtime_version();
}  // namespace spar
