// The hot loops of the dwconv_glu CPU twin. No include guard on purpose: dwconv_glu_cpu.cpp
// includes this file once per instruction-set variant (common/cpu_rows.h).
//
// Work items are (sample, vector of kConvVec channels of the a half with the matching gate
// channels). An item keeps its 2 x 9 weight vectors and 2 accumulators in registers and sweeps
// every pixel of the image: per pixel 18 loads of neighbour vectors (from L1/L2) and 18 FMAs.
// Interior pixels skip the bounds checks. The last vector of a C that is not a multiple of
// kConvVec is handled with a runtime width.
constexpr int64_t kConvVec = 16;

template <bool kFull, typename T>
void conv_glu_item(const T* xb, int64_t H, int64_t W, int64_t C, int64_t sxn, int64_t c0, int64_t cw,
                   const float* w9, const float* bias, T* ob, int64_t son) {
  constexpr int64_t V = kConvVec;
  const int64_t n = kFull ? V : cw;
  float wa[9][V], wg[9][V], ba[V], bg[V];
  for (int t = 0; t < 9; ++t)
    for (int64_t c = 0; c < V; ++c) {
      wa[t][c] = c < n ? w9[t * 2 * C + c0 + c] : 0.f;
      wg[t][c] = c < n ? w9[t * 2 * C + C + c0 + c] : 0.f;
    }
  for (int64_t c = 0; c < V; ++c) {
    ba[c] = bias && c < n ? bias[c0 + c] : 0.f;
    bg[c] = bias && c < n ? bias[C + c0 + c] : 0.f;
  }
  for (int64_t row = 0; row < H; ++row) {
    for (int64_t col = 0; col < W; ++col) {
      const bool interior = row > 0 && row < H - 1 && col > 0 && col < W - 1;
      float aa[V], ag[V];
      for (int64_t c = 0; c < V; ++c) {
        aa[c] = ba[c];
        ag[c] = bg[c];
      }
#pragma GCC unroll 9
      for (int t = 0; t < 9; ++t) {
        const int64_t rr = row + t / 3 - 1, cc = col + t % 3 - 1;
        if (!interior && (rr < 0 || rr >= H || cc < 0 || cc >= W)) continue;
        const T* src = xb + (rr * W + cc) * sxn + c0;
        if (kFull) {
#pragma omp simd
          for (int64_t c = 0; c < V; ++c) {
            aa[c] += to_float(src[c]) * wa[t][c];
            ag[c] += to_float(src[C + c]) * wg[t][c];
          }
        } else {
          for (int64_t c = 0; c < n; ++c) {
            aa[c] += to_float(src[c]) * wa[t][c];
            ag[c] += to_float(src[C + c]) * wg[t][c];
          }
        }
      }
      T* o = ob + (row * W + col) * son + c0;
      if (kFull) {
#pragma omp simd
        for (int64_t c = 0; c < V; ++c) o[c] = from_float<T>(aa[c] * fast::silu(ag[c]));
      } else {
        for (int64_t c = 0; c < n; ++c) o[c] = from_float<T>(aa[c] * fast::silu(ag[c]));
      }
    }
  }
}

template <typename T>
void dwconv_glu_run(const T* x, int64_t B, int64_t H, int64_t W, int64_t C, int64_t sxb, int64_t sxn,
                    const float* w9, const float* bias, T* out, int64_t sob, int64_t son) {
  const int64_t n_vec = (C + kConvVec - 1) / kConvVec;
#pragma omp parallel for schedule(static)
  for (int64_t item = 0; item < B * n_vec; ++item) {
    const int64_t b = item / n_vec, c0 = (item % n_vec) * kConvVec;
    const int64_t cw = std::min(kConvVec, C - c0);
    if (cw == kConvVec)
      conv_glu_item<true>(x + b * sxb, H, W, C, sxn, c0, cw, w9, bias, out + b * sob, son);
    else
      conv_glu_item<false>(x + b * sxb, H, W, C, sxn, c0, cw, w9, bias, out + b * sob, son);
  }
}

