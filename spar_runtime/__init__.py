"""spar_runtime: a lean runtime executing the whole SPAR graph on spar_kernels ops."""
