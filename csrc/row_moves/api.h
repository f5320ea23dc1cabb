// CPU entry point of scatter_rows (its GPU path is Triton, spar_kernels/row_moves.py). Plain C++
// types: pointers as uintptr_t, sizes and strides in bytes.
#pragma once
#include <cstdint>

namespace spar {
// scatter_rows' CPU path: row index[i] of x = row i of src, i < M, rows moved as raw bytes (any dtype).
//   x: n_x rows of row_bytes, row r at x + r * x_row_stride (bytes); src: M rows, row i at
//   src + i * src_row_stride; index: [M] contiguous int64 (index_int64) or int32.
// Indices outside [0, n_x) are skipped (the Python wrapper range-checks them first). With duplicate
// indices the last one wins, whole rows only: threads split the columns, never the rows.
void scatter_rows_cpu(uintptr_t x, int64_t n_x, int64_t x_row_stride, uintptr_t index, bool index_int64, int64_t M,
                      uintptr_t src, int64_t src_row_stride, int64_t row_bytes);
}  // namespace spar
