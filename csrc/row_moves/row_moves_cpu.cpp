// scatter_rows' CPU twin: a memcpy per row. OpenMP splits each row's bytes into 64-byte-aligned
// column chunks (one per thread) and every thread walks all rows in order, so duplicate indices
// resolve to the last source row, never a torn mix of rows.
#include <algorithm>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "row_moves/api.h"

namespace spar {
namespace {

template <typename I>
void scatter_chunk(char* x, int64_t n_x, int64_t sx, const I* index, int64_t M, const char* src, int64_t ss,
                   int64_t begin, int64_t len) {
  for (int64_t i = 0; i < M; ++i) {
    const int64_t r = static_cast<int64_t>(index[i]);
    if (r < 0 || r >= n_x) continue;
    std::memcpy(x + r * sx + begin, src + i * ss + begin, static_cast<size_t>(len));
  }
}

}  // namespace

void scatter_rows_cpu(uintptr_t x, int64_t n_x, int64_t x_row_stride, uintptr_t index, bool index_int64, int64_t M,
                      uintptr_t src, int64_t src_row_stride, int64_t row_bytes) {
  if (M <= 0 || n_x <= 0 || row_bytes <= 0) return;
  char* xp = reinterpret_cast<char*>(x);
  const char* sp = reinterpret_cast<const char*>(src);
  // threads only when each gets at least 1 KiB of every row and there is enough work overall
  constexpr int64_t kMinChunk = 1024;
  int64_t chunks = 1;
#ifdef _OPENMP
  if (M * row_bytes >= (int64_t{1} << 16))
    chunks = std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), row_bytes / kMinChunk));
#endif
  // chunk size rounded up to 64 bytes (whole cache lines per thread when rows are line-aligned)
  const int64_t step = ((row_bytes + chunks - 1) / chunks + 63) / 64 * 64;
  chunks = (row_bytes + step - 1) / step;
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(chunks)) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = c * step;
    const int64_t len = std::min(step, row_bytes - begin);
    if (index_int64)
      scatter_chunk(xp, n_x, x_row_stride, reinterpret_cast<const int64_t*>(index), M, sp, src_row_stride, begin, len);
    else
      scatter_chunk(xp, n_x, x_row_stride, reinterpret_cast<const int32_t*>(index), M, sp, src_row_stride, begin, len);
  }
}

}  // namespace spar
