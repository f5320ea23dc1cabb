// The hot loops of the adaln_layernorm / gated_residual CPU twin. No include guard on purpose:
// adaln_cpu.cpp includes this file once per instruction-set variant (common/cpu_rows.h).
// Rows spread over OpenMP threads; fp32 math in per-thread buffers; one rounding to T.

template <typename T>
void adaln_run(const T* x, int64_t B, int64_t N, int64_t C, int64_t sxb, int64_t sxn, int64_t sxc,
               const float* shift, const float* scale1, T* y, int64_t syb, int64_t syn, int64_t syc, float eps) {
#pragma omp parallel
  {
    std::vector<float> buf(C);
    float* h = buf.data();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < B * N; ++r) {
      const int64_t b = r / N, n = r % N;
      cpu::load_row(x + b * sxb + n * sxn, sxc, h, C);
      // fp64 sums (still vectorized): a long fp32 running sum would lose ~log2(C) bits
      double sum = 0.0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < C; ++c) sum += h[c];
      const float mean = float(sum / double(C));
      double sq = 0.0;
#pragma omp simd reduction(+ : sq)
      for (int64_t c = 0; c < C; ++c) {
        const float d = h[c] - mean;
        sq += double(d * d);
      }
      const float rstd = float(1.0 / std::sqrt(sq / double(C) + double(eps)));
      const float* sh = shift + b * C;
      const float* sc = scale1 + b * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) h[c] = (h[c] - mean) * rstd * sc[c] + sh[c];
      cpu::store_row(h, y + b * syb + n * syn, syc, C);
    }
  }
}

template <typename T>
void gated_run(const T* x, int64_t B, int64_t N, int64_t C, int64_t sxb, int64_t sxn, int64_t sxc, const T* y,
               int64_t syb, int64_t syn, int64_t syc, const float* gate, T* out, int64_t sob, int64_t son,
               int64_t soc) {
  const bool dense = sxc == 1 && syc == 1 && soc == 1;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < B * N; ++r) {
    const int64_t b = r / N, n = r % N;
    const T* xr = x + b * sxb + n * sxn;
    const T* yr = y + b * syb + n * syn;
    T* o = out + b * sob + n * son;
    const float* g = gate + b * C;
    if (dense) {  // out may be x (in place): element c is read before it is written, never after
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[c] = from_float<T>(to_float(xr[c]) + g[c] * to_float(yr[c]));
    } else {
      for (int64_t c = 0; c < C; ++c)
        o[c * soc] = from_float<T>(to_float(xr[c * sxc]) + g[c] * to_float(yr[c * syc]));
    }
  }
}
