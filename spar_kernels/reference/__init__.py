"""Plain-PyTorch references, one module per op, written for clarity and upcasting exactly
where the kernels upcast. Tests compare every backend against these (and against fp64)."""
