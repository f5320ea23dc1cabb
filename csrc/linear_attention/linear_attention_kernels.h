// The hot loops of the linear_attention CPU twin. No include guard on purpose:
// linear_attention_cpu.cpp includes this file once per instruction-set variant (common/cpu_rows.h).

// ReLU linear attention for head dims d = e = HD (SANA: 32). Phase 1, per (b, h): the state
// [HD, HD] and normaliser in register-sized blocks of kLaRows rows of the state, accumulated over
// all keys; phase 2, per query row: relu(q) @ state / (relu(q) . z + eps). fp32 throughout.
// kAccFloats: the fp32 accumulators the variant keeps in registers (linear_attention_cpu.cpp
// passes 256 for AVX-512's 32 zmm, 64 for AVX2's 16 ymm): a block wider than the register file
// spills and runs at a fraction of the speed.
template <typename T, int HD, int kAccFloats>
void linear_attention_run(const T* q, const T* k, const T* v, int64_t B, int64_t Nq, int64_t Nk, int64_t H,
                          int64_t sqb, int64_t sqn, int64_t sqh, int64_t skb, int64_t skn, int64_t skh,
                          int64_t svb, int64_t svn, int64_t svh, T* out, int64_t sob, int64_t son, int64_t soh,
                          float eps) {
  constexpr int kLaRows = kAccFloats / HD < 1 ? 1 : (kAccFloats / HD > HD ? HD : kAccFloats / HD);
  static_assert(HD % kLaRows == 0, "linear_attention: the state's row blocks must tile HD");
  constexpr int64_t SE = HD * HD + HD;
  std::vector<float> ws(B * H * SE);
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      float* S = ws.data() + bh * SE;
      float* z = S + HD * HD;
      alignas(64) float vf[HD];
      for (int d0 = 0; d0 < HD; d0 += kLaRows) {
        alignas(64) float acc[kLaRows][HD] = {};
        float zz[kLaRows] = {};
        for (int64_t n = 0; n < Nk; ++n) {
          const T* kr = k + b * skb + n * skn + h * skh + d0;
          const T* vr = v + b * svb + n * svn + h * svh;
          const float* vrow = vf;
          if constexpr (std::is_same<T, float>::value) {
            vrow = vr;  // fp32: read v in place
          } else {
            for (int e = 0; e < HD; ++e) vf[e] = to_float(vr[e]);
          }
#pragma GCC unroll 8
          for (int i = 0; i < kLaRows; ++i) {
            const float kd = fast::relu(to_float(kr[i]));
            zz[i] += kd;
#pragma omp simd
            for (int e = 0; e < HD; ++e) acc[i][e] += kd * vrow[e];
          }
        }
        for (int i = 0; i < kLaRows; ++i) {
          z[d0 + i] = zz[i];
          for (int e = 0; e < HD; ++e) S[(d0 + i) * HD + e] = acc[i][e];
        }
      }
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < B * H * Nq; ++r) {
      const int64_t bh = r / Nq, n = r % Nq, b = bh / H, h = bh % H;
      const float* S = ws.data() + bh * SE;
      const float* z = S + HD * HD;
      const T* qr = q + b * sqb + n * sqn + h * sqh;
      alignas(64) float num[HD] = {};
      float den = 0.f;
#pragma GCC unroll 32
      for (int d = 0; d < HD; ++d) {  // unrolled: num stays in registers
        const float qd = fast::relu(to_float(qr[d]));
        den += qd * z[d];
#pragma omp simd
        for (int e = 0; e < HD; ++e) num[e] += qd * S[d * HD + e];
      }
      const float dd = den + eps;
      T* o = out + b * sob + n * son + h * soh;
#pragma omp simd
      for (int e = 0; e < HD; ++e) o[e] = from_float<T>(num[e] / dd);
    }
  }
}

