// The row loops of the quantize_fp8 CPU twin. No include guard on purpose: quantize_fp8_cpu.cpp
// includes this file once per instruction-set variant (common/isa_variants.inc); SPAR_ISA_AVX2 is
// 1 where the variant may use AVX2/FMA/F16C intrinsics (the AVX-512 variant runs the same
// 256-bit code), 0 in a baseline build without them (the scalar loops of quantize_fp8.h only).
//
// Vector loops (bit-identical to quant::quantize, which handles the tails):
// - amax: an integer max over the bits of |x| (for non-negative floats the bit order is the
//   value order, and a NaN's bits are above +inf's, so a NaN wins as in quant::amax_combine);
//   fp16/bf16 rows take it 16 lanes at a time on the 16-bit codes.
// - x / scale: RN(x / s), the IEEE division (the AVX-512 variant: the reciprocal and two
//   Markstein corrections in FMAs, see Div).
// - e4m3 encode of a = |x / s|, branch-free: adding M = max(2^(E+20), 2^14) (E = a's exponent)
//   rounds a to the e4m3 grid (steps of 2^(E-3), 2^-9 below 2^-6), nearest even, in the FPU; the
//   code is then the grid index plus 8 per binade. Only for a finite scale: then |x| <= amax
//   gives a <= 448 (1 + 3 ulp) < 464, so no lane saturates or is NaN; a row with a NaN or infinite
//   scale takes the scalar loop.

// SPAR_QUANT_ZMM: the AVX-512 variant's 32-element steps in 512-bit registers (quantize32 below);
// a program that compiles this file's AVX-512 math for an AVX2 CPU (tests/cpp/
// quantize_fp8_avx512_div.cpp) defines SPAR_QUANT_NO_ZMM and gets the 256-bit steps.
#if SPAR_ISA_AVX512 && !defined(SPAR_QUANT_NO_ZMM)
#define SPAR_QUANT_ZMM 1
#else
#define SPAR_QUANT_ZMM 0
#endif

#if SPAR_ISA_AVX2
// 8 lanes of a = |x / s| >= 0 (a < 464) -> 16 * (e4m3 code + 1128) as int32 (see the header
// comment): r = a + M holds k (the grid index, <= 16) in its low 16 bits and M's exponent in its
// high 16, so one multiply-add of the 16-bit halves gives 16 k + 128 (E' + 147) =
// 16 (k + 8 (E' + 6) + 1128), the code with an offset taken off after packing to 16 bits.
inline __m256i e4m3_code16_abs(__m256 a) {
  const __m256i u = _mm256_castps_si256(a);
  // A = the binade's exponent bits, at least 2^-6's (below it the step stays 2^-9)
  const __m256i A = _mm256_max_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7f800000)),
                                     _mm256_set1_epi32(121 << 23));
  const __m256 M = _mm256_castsi256_ps(_mm256_add_epi32(A, _mm256_set1_epi32(20 << 23)));
  const __m256i r = _mm256_castps_si256(_mm256_add_ps(a, M));  // M + k steps, k rounded to even
  return _mm256_madd_epi16(r, _mm256_set1_epi32(0x00010010));   // lo * 16 + hi * 1
}
constexpr int16_t kCodeOffset16 = 16 * 1128;

// 16-bit lanes of 16 * (code + 1128) -> codes
inline __m256i codes_from16(__m256i v) {
  return _mm256_srli_epi16(_mm256_sub_epi16(v, _mm256_set1_epi16(kCodeOffset16)), 4);
}

#if SPAR_ISA_AVX512
// RN(x / s) for a finite s > 0 without a division (the divider of the CPUs with AVX-512 takes
// 5-16 cycles a vector): q0 = RN(x r), r = RN(1 / s); two Markstein corrections
// q <- RN(q + RN(x - q s) r) (x - q s is exact in the FMA) give RN(x / s): after the first q is
// faithful, and with r within half an ulp of 1 / s the second rounds correctly. Quotients whose
// remainder underflows (|x| < 2^-100) are below 2^-50 and encode to a zero code either way.
struct Div {
  __m256 s, r;
#if SPAR_QUANT_ZMM
  __m512 s16, r16;
  explicit Div(float scale)
      : s(_mm256_set1_ps(scale)), r(_mm256_set1_ps(1.0f / scale)), s16(_mm512_set1_ps(scale)),
        r16(_mm512_set1_ps(1.0f / scale)) {}
#else
  explicit Div(float scale) : s(_mm256_set1_ps(scale)), r(_mm256_set1_ps(1.0f / scale)) {}
#endif
  __m256 operator()(__m256 x) const {
    __m256 q = _mm256_mul_ps(x, r);
    q = _mm256_fmadd_ps(_mm256_fnmadd_ps(q, s, x), r, q);
    return _mm256_fmadd_ps(_mm256_fnmadd_ps(q, s, x), r, q);
  }
#if SPAR_QUANT_ZMM
  __m512 operator()(__m512 x) const {  // the same three roundings, 16 lanes
    __m512 q = _mm512_mul_ps(x, r16);
    q = _mm512_fmadd_ps(_mm512_fnmadd_ps(q, s16, x), r16, q);
    return _mm512_fmadd_ps(_mm512_fnmadd_ps(q, s16, x), r16, q);
  }
#endif
};
#else
struct Div {  // RN(x / s): the IEEE division (3.5 cycles a vector on Zen 3, cheaper than the FMAs)
  __m256 s;
  explicit Div(float scale) : s(_mm256_set1_ps(scale)) {}
  __m256 operator()(__m256 x) const { return _mm256_div_ps(x, s); }
};
#endif

// |x| of 16 fp16/bf16 lanes as two fp32 vectors in "unpack order" (elements 0-3, 8-11 and
// 4-7, 12-15); _mm256_packus_epi32 of their codes restores the element order. fp16 widens
// through F16C (exact), in element order, then is split the same way.
inline void load16_abs(const bf16_t* p, __m256i& bits16, __m256& lo, __m256& hi) {
  bits16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i a = _mm256_and_si256(bits16, _mm256_set1_epi16(0x7fff));
  lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), a));
  hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), a));
}
inline void load16_abs(const f16_t* p, __m256i& bits16, __m256& lo, __m256& hi) {
  bits16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i a = _mm256_and_si256(bits16, _mm256_set1_epi16(0x7fff));
  const __m256 f0 = _mm256_cvtph_ps(_mm256_castsi256_si128(a));       // elements 0-7
  const __m256 f1 = _mm256_cvtph_ps(_mm256_extracti128_si256(a, 1));  // elements 8-15
  lo = _mm256_permute2f128_ps(f0, f1, 0x20);
  hi = _mm256_permute2f128_ps(f0, f1, 0x31);
}

// 16 fp16/bf16 elements -> 16-bit lanes of 16 * (code + 1128), in element order
template <typename T>
inline __m256i quantize16(const T* p, const Div& div, __m256i& bits) {
  __m256 lo, hi;
  load16_abs(p, bits, lo, hi);
  return _mm256_packus_epi32(e4m3_code16_abs(div(lo)), e4m3_code16_abs(div(hi)));
}

#if SPAR_QUANT_ZMM
// 16 lanes of a = |x / s| -> 16 * (e4m3 code + 1128) as int32: the 8-lane e4m3_code16_abs above
// in 512-bit intrinsics, repeated because the 16-bit multiply-add (vpmaddwd) that ends it has no
// width-generic form (GCC's vector extensions do not express it)
inline __m512i e4m3_code16_abs(__m512 a) {
  const __m512i u = _mm512_castps_si512(a);
  const __m512i A = _mm512_max_epi32(_mm512_and_si512(u, _mm512_set1_epi32(0x7f800000)),
                                     _mm512_set1_epi32(121 << 23));
  const __m512 M = _mm512_castsi512_ps(_mm512_add_epi32(A, _mm512_set1_epi32(20 << 23)));
  const __m512i r = _mm512_castps_si512(_mm512_add_ps(a, M));
  return _mm512_madd_epi16(r, _mm512_set1_epi32(0x00010010));
}

// 32 16-bit lanes of 16 * (code + 1128), in element order, and the inputs' 16-bit high halves
// (sign in bit 15) -> 32 bytes of e4m3 codes at q
inline void store_codes32(__m512i v, __m512i sign_bits, uint8_t* q) {
  const __m512i codes = _mm512_srli_epi16(_mm512_sub_epi16(v, _mm512_set1_epi16(kCodeOffset16)), 4);
  const __m512i sign = _mm512_and_si512(_mm512_srli_epi16(sign_bits, 8), _mm512_set1_epi16(0x80));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm512_cvtepi16_epi8(_mm512_or_si512(codes, sign)));
}

// 32 bf16 elements -> 32 bytes: widened by interleaving with zeros (each 128-bit lane's elements
// 0-3 in lo, 4-7 in hi), and the in-lane pack of the two codes vectors restores the order
inline void quantize32(const bf16_t* p, const Div& div, uint8_t* q) {
  const __m512i bits = _mm512_loadu_si512(p);
  const __m512i a = _mm512_and_si512(bits, _mm512_set1_epi16(0x7fff));
  const __m512 lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), a));
  const __m512 hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), a));
  store_codes32(_mm512_packus_epi32(e4m3_code16_abs(div(lo)), e4m3_code16_abs(div(hi))), bits, q);
}

// 32 fp16 elements -> 32 bytes: widened through F16C in element order, then 128-bit lanes
// regrouped so that lo / hi hold each 8-element group's first / last four (bf16's order)
inline void quantize32(const f16_t* p, const Div& div, uint8_t* q) {
  const __m512i bits = _mm512_loadu_si512(p);
  const __m512i a = _mm512_and_si512(bits, _mm512_set1_epi16(0x7fff));
  const __m512 f0 = _mm512_cvtph_ps(_mm512_castsi512_si256(a));        // elements 0-15
  const __m512 f1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(a, 1));  // elements 16-31
  const __m512 lo = _mm512_shuffle_f32x4(f0, f1, 0x88), hi = _mm512_shuffle_f32x4(f0, f1, 0xdd);
  store_codes32(_mm512_packus_epi32(e4m3_code16_abs(div(lo)), e4m3_code16_abs(div(hi))), bits, q);
}

// 16 fp32 elements -> 16 bytes
inline void quantize16_f32(const float* p, const Div& div, uint8_t* q) {
  const __m512i x = _mm512_loadu_si512(p);
  const __m512 a = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(0x7fffffff)));
  const __m512i codes = _mm512_srli_epi32(_mm512_sub_epi32(e4m3_code16_abs(div(a)), _mm512_set1_epi32(kCodeOffset16)), 4);
  const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(x, 24), _mm512_set1_epi32(0x80));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(_mm512_or_si512(codes, sign)));
}
inline void quantize32(const float* p, const Div& div, uint8_t* q) {
  quantize16_f32(p, div, q);
  quantize16_f32(p + 16, div, q + 16);
}
#else
// 32 fp16/bf16 elements -> 32 bytes (sign bits from the inputs' sign-saturated high bytes)
template <typename T>
inline void quantize32(const T* p, const Div& div, uint8_t* q) {
  __m256i b0, b1;
  const __m256i c0 = codes_from16(quantize16(p, div, b0)), c1 = codes_from16(quantize16(p + 16, div, b1));
  const __m256i sign = _mm256_and_si256(_mm256_packs_epi16(b0, b1), _mm256_set1_epi8(char(0x80)));
  const __m256i bytes = _mm256_or_si256(_mm256_packus_epi16(c0, c1), sign);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permute4x64_epi64(bytes, 0xd8));
}

// fp32: 16 elements -> 16-bit lanes of 16 * (code + 1128) in the order 0-3, 8-11, 4-7, 12-15, and
// the elements' signs in bit 15 of `sign` (in the same order)
inline __m256i quantize16_f32(const float* p, const Div& div, __m256i& sign) {
  const __m256i x0 = _mm256_castps_si256(_mm256_loadu_ps(p));
  const __m256i x1 = _mm256_castps_si256(_mm256_loadu_ps(p + 8));
  const __m256i abs = _mm256_set1_epi32(0x7fffffff);
  sign = _mm256_packs_epi32(x0, x1);  // negative lanes saturate to 0x8000
  return _mm256_packus_epi32(e4m3_code16_abs(div(_mm256_castsi256_ps(_mm256_and_si256(x0, abs)))),
                             e4m3_code16_abs(div(_mm256_castsi256_ps(_mm256_and_si256(x1, abs)))));
}

inline void quantize32(const float* p, const Div& div, uint8_t* q) {
  __m256i s0, s1;
  const __m256i c0 = codes_from16(quantize16_f32(p, div, s0)), c1 = codes_from16(quantize16_f32(p + 16, div, s1));
  const __m256i sign = _mm256_and_si256(_mm256_packs_epi16(s0, s1), _mm256_set1_epi8(char(0x80)));
  const __m256i bytes = _mm256_or_si256(_mm256_packus_epi16(c0, c1), sign);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permutevar8x32_epi32(bytes, order));
}
#endif  // SPAR_QUANT_ZMM

// 32 elements of |x| into a running max of their bits (the amax of the header comment)
inline void amax32(const bf16_t* p, __m256i& acc) {
  const __m256i mask = _mm256_set1_epi16(0x7fff);
  acc = _mm256_max_epu16(acc, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), mask));
  acc = _mm256_max_epu16(acc, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)), mask));
}
inline void amax32(const f16_t* p, __m256i& acc) { amax32(reinterpret_cast<const bf16_t*>(p), acc); }
inline void amax32(const float* p, __m256i& acc) {
  const __m256i mask = _mm256_set1_epi32(0x7fffffff);
  for (int i = 0; i < 32; i += 8)
    acc = _mm256_max_epi32(acc, _mm256_and_si256(_mm256_castps_si256(_mm256_loadu_ps(p + i)), mask));
}
// two running maxima as one
inline __m256i amax_merge(const bf16_t*, __m256i a, __m256i b) { return _mm256_max_epu16(a, b); }
inline __m256i amax_merge(const f16_t*, __m256i a, __m256i b) { return _mm256_max_epu16(a, b); }
inline __m256i amax_merge(const float*, __m256i a, __m256i b) { return _mm256_max_epi32(a, b); }
// the value of amax32's running max
template <typename T>
inline float amax_value(__m256i acc) {  // 16-bit lanes of fp16 / bf16 bits
  alignas(32) uint16_t lanes[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
  uint16_t m = 0;
  for (uint16_t v : lanes) m = v > m ? v : m;
  return to_float(T{m});
}
template <>
inline float amax_value<float>(__m256i acc) {
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
  int32_t m = 0;
  for (int32_t v : lanes) m = v > m ? v : m;
  return bits_to_float(uint32_t(m));
}

// max |x| over the first multiple of 32 elements of a row (c advances past them); two running
// maxima keep two loads in flight
template <typename T>
inline float amax_vec(const T* x, int64_t n, int64_t& c) {
  __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
  for (; c + 64 <= n; c += 64) {
    amax32(x + c, a0);
    amax32(x + c + 32, a1);
  }
  for (; c + 32 <= n; c += 32) amax32(x + c, a0);
  return amax_value<T>(amax_merge(x, a0, a1));
}
#if SPAR_QUANT_ZMM
// amax32 in one 512-bit register (bf16 / fp16: one load; fp32: two), and its value
using AmaxAcc = __m512i;
inline AmaxAcc amax_zero() { return _mm512_setzero_si512(); }
inline void amax32(const bf16_t* p, __m512i& acc) {
  acc = _mm512_max_epu16(acc, _mm512_and_si512(_mm512_loadu_si512(p), _mm512_set1_epi16(0x7fff)));
}
inline void amax32(const f16_t* p, __m512i& acc) { amax32(reinterpret_cast<const bf16_t*>(p), acc); }
inline void amax32(const float* p, __m512i& acc) {
  const __m512i mask = _mm512_set1_epi32(0x7fffffff);
  acc = _mm512_max_epi32(acc, _mm512_and_si512(_mm512_loadu_si512(p), mask));
  acc = _mm512_max_epi32(acc, _mm512_and_si512(_mm512_loadu_si512(p + 16), mask));
}
template <typename T>
inline float amax_value(__m512i acc) {
  const T* tag = nullptr;
  return amax_value<T>(amax_merge(tag, _mm512_castsi512_si256(acc), _mm512_extracti64x4_epi64(acc, 1)));
}

// ---- bf16 rows by table (AVX512-VBMI) ----
// For a finite scale s = 2^sigma * m_s (m_s in [1, 2)) and a bf16 x = 2^(e-127) (1 + f/128),
// RN(|x| / s) = 2^(e-127-sigma) RN((1 + f/128) / m_s) exactly whenever the quotient is a normal
// float, so its e4m3 code, where the quotient is at least 2^-6 (e4m3's normal range), is
//   code = 8 e + H[f] + C,  H[f] = code(RN((1 + f/128) / m_s)) + 104 (in 152..168),  C = -1120 - 8 sigma
// (the code of a normal value is 8 (exponent + 7) + its 3-bit mantissa rounded to nearest even,
// linear in the exponent, a carry included). A row builds the 128 entries of H with the exact
// division and encode above (Div, e4m3_code16_abs), then codes 32 elements with one byte permute
// (vpermi2b) and a few integer operations instead of two divisions and two encodes. Zeros get
// code 0. A formula code of 8 or more is exact: either the quotient is at least 2^-6, or it lies
// in [2^-6 - 2^-11, 2^-6), where the binade below rounds up to 2^-6 (the carry) and so does the
// subnormal grid (steps of 2^-9: 7.75 steps and more round to 8). A block holding a nonzero
// element whose formula code is below 8 (e4m3 subnormals, whose rounding step differs from the
// binade's, bf16 subnormals, tiny values) takes the exact quantize32 instead, so every code is
// bit-identical to it.
#define SPAR_QUANT_VBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma,f16c")))

struct Bf16Table {
  uint32_t scale_bits = 0;  // the scale the table is for (0: none; a usable scale has nonzero bits)
  __m512i lo, hi;           // H[f] as bytes, f = 0..63 and 64..127
  __m512i c;                // C in every 16-bit lane
};

// builds t for scale (kept when t already holds it); false when the table does not apply: scale not
// finite or not positive, or below 2^-120 (then a bf16 subnormal's formula code could pass the
// test; quantize_fp8's scales are at least 1e-12 / 448)
inline bool bf16_table(float scale, Bf16Table& t) {
  const uint32_t sb = float_to_bits(scale);
  const int es = int(sb >> 23);  // the sign bit is 0 for scale > 0
  if (!(scale > 0.f) || es < 7 || es >= 255) return false;
  if (t.scale_bits == sb) return true;
  const Div div(bits_to_float((sb & 0x7fffffu) | (127u << 23)));  // m_s
  // 1 + f/128 for f = 16 j + lane: the bits 127 << 23 | f << 16
  const __m512i y0 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i one = _mm512_set1_epi32(127 << 23);
  __m128i b[8];
  for (int j = 0; j < 8; ++j) {
    const __m512 y = _mm512_castsi512_ps(_mm512_or_si512(_mm512_slli_epi32(_mm512_add_epi32(y0, _mm512_set1_epi32(16 * j)), 16), one));
    // 16 (code + 1128) -> its low byte after >> 4: code + 104 (1128 = 4 * 256 + 104; codes 48..64)
    b[j] = _mm512_cvtepi32_epi8(_mm512_srli_epi32(e4m3_code16_abs(div(y)), 4));
  }
  const auto cat = [](__m128i a0, __m128i a1, __m128i a2, __m128i a3) {
    return _mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(a0), a1, 1), a2, 2), a3, 3);
  };
  t.lo = cat(b[0], b[1], b[2], b[3]);
  t.hi = cat(b[4], b[5], b[6], b[7]);
  t.c = _mm512_set1_epi16(int16_t(-1120 - 8 * (es - 127)));
  t.scale_bits = sb;
  return true;
}

// 32 bf16 elements -> 32 bytes by the table; false (nothing stored) when a nonzero element's code
// is below 8
SPAR_QUANT_VBMI inline bool quantize32_table(const bf16_t* p, const Bf16Table& t, uint8_t* q) {
  const __m512i b = _mm512_loadu_si512(p);
  // H[f] from each element's low byte (bits 0-6: f); the high bytes zeroed
  const __m512i g = _mm512_maskz_permutex2var_epi8(0x5555555555555555ull, t.lo, b, t.hi);
  const __m512i e8 = _mm512_and_si512(_mm512_srli_epi16(b, 4), _mm512_set1_epi16(0x7f8));  // 8 e
  const __mmask32 nz = _mm512_test_epi16_mask(b, _mm512_set1_epi16(0x7fff));
  const __m512i code = _mm512_maskz_add_epi16(nz, _mm512_add_epi16(e8, g), t.c);  // zeros: 0
  if (_mm512_mask_cmplt_epi16_mask(nz, code, _mm512_set1_epi16(8))) return false;
  // code | (sign >> 8): A | (B & C)
  const __m512i v = _mm512_ternarylogic_epi32(code, _mm512_srli_epi16(b, 8), _mm512_set1_epi16(0x80), 0xf8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm512_cvtepi16_epi8(v));
  return true;
}

// the 32-element steps of a bf16 row [0, n32) by table (blocks that fail it: quantize32), with
// quantize_row_amax_next's fused amax of `next` (when acc is not null) and prefetch of `ahead`
SPAR_QUANT_VBMI inline void quantize_row_table(const bf16_t* x, const Bf16Table& t, const Div& div, uint8_t* q,
                                               int64_t n32, const bf16_t* next, const bf16_t* ahead, AmaxAcc* acc) {
  AmaxAcc a = acc ? *acc : amax_zero();
  for (int64_t c = 0; c < n32; c += 32) {
    if (ahead) _mm_prefetch(reinterpret_cast<const char*>(ahead + c), _MM_HINT_T0);
    if (acc) amax32(next + c, a);
    if (!quantize32_table(x + c, t, q + c)) quantize32(x + c, div, q + c);
  }
  if (acc) *acc = a;
}

// the table of this thread's last scale: per tensor every row reuses it
inline Bf16Table& bf16_table_cache() {
  static thread_local Bf16Table t;
  return t;
}
#else
using AmaxAcc = __m256i;
inline AmaxAcc amax_zero() { return _mm256_setzero_si256(); }
#endif
#endif  // SPAR_ISA_AVX2

// max |x| over a contiguous row, NaN-propagating (quant::amax_combine)
template <typename T>
float row_amax(const T* x, int64_t n) {
  float m = 0.f;
  int64_t c = 0;
#if SPAR_ISA_AVX2
  m = amax_vec(x, n, c);
#endif
  for (; c < n; ++c) m = quant::amax_combine(m, quant::abs_value(x[c]));
  return m;
}

// q[c] = e4m3(x[c] / scale) over a contiguous row. `next` (may be null): the row whose amax comes
// next, fetched into L1 while this row computes (its n elements from next[0]), so its loads overlap
// this row's arithmetic instead of following it.
template <typename T>
void quantize_row(const T* x, float scale, uint8_t* q, int64_t n, const T* next) {
  int64_t c = 0;
#if SPAR_ISA_AVX2
  if (scale > 0.f && scale < INFINITY) {  // a NaN or infinite scale takes the scalar loop
    const Div div(scale);
#if SPAR_QUANT_ZMM
    if constexpr (std::is_same_v<T, bf16_t>) {
      Bf16Table& t = bf16_table_cache();
      if (cpu::has_avx512vbmi() && bf16_table(scale, t)) {
        const int64_t n32 = n & ~int64_t(31);
        quantize_row_table(x, t, div, q, n32, nullptr, next, nullptr);
        c = n32;
      }
    }
#endif
    if (next) {
      for (; c + 32 <= n; c += 32) {
        for (int64_t b = 0; b < int64_t(32 * sizeof(T)); b += 64)
          _mm_prefetch(reinterpret_cast<const char*>(next + c) + b, _MM_HINT_T0);
        quantize32(x + c, div, q + c);
      }
    }
    for (; c + 32 <= n; c += 32) quantize32(x + c, div, q + c);
  }
#endif
  (void)next;
  for (; c < n; ++c) q[c] = quant::quantize(x[c], scale);
}

// quantize_row of x, returning the amax of the row `next` (n elements) taken in the same pass: per
// token, the next row's amax loads and maxes run beside this row's divisions (which bound a
// 32-element step on Zen 3) instead of in a pass of their own. `ahead` (may be null): the row after
// `next`, fetched into L1 meanwhile (its first n elements), so the amax loads of the following
// pass hit L1 and the page walks and L3/DRAM misses of a cold x overlap this row's arithmetic.
template <typename T>
float quantize_row_amax_next(const T* x, float scale, uint8_t* q, int64_t n, const T* next,
                             const T* ahead) {
  int64_t c = 0;
#if SPAR_ISA_AVX2
  if (scale > 0.f && scale < INFINITY && n >= 32) {
    const Div div(scale);
    AmaxAcc acc = amax_zero();
#if SPAR_QUANT_ZMM
    if constexpr (std::is_same_v<T, bf16_t>) {
      Bf16Table t;  // per token: a new scale every row
      if (cpu::has_avx512vbmi() && bf16_table(scale, t)) {
        c = n & ~int64_t(31);
        quantize_row_table(x, t, div, q, c, next, ahead, &acc);
      }
    }
#endif
    if (ahead) {
      for (; c + 32 <= n; c += 32) {
        for (int64_t b = 0; b < int64_t(32 * sizeof(T)); b += 64)
          _mm_prefetch(reinterpret_cast<const char*>(ahead + c) + b, _MM_HINT_T0);
        amax32(next + c, acc);
        quantize32(x + c, div, q + c);
      }
    }
    for (; c + 32 <= n; c += 32) {
      amax32(next + c, acc);
      quantize32(x + c, div, q + c);
    }
    float m = amax_value<T>(acc);
    for (int64_t d = c; d < n; ++d) m = quant::amax_combine(m, quant::abs_value(next[d]));
    for (; c < n; ++c) q[c] = quant::quantize(x[c], scale);
    return m;
  }
#endif
  (void)ahead;
  quantize_row(x, scale, q, n, next);
  return row_amax(next, n);
}
#undef SPAR_QUANT_ZMM
