/* sparsedge native kernels: one whole decoder step (k new tokens) per call, with activation
 * sparsity turned into skipped work.
 *
 * Plain C ABI for ctypes (sparsedge/runtimes/native/_lib.py mirrors every struct here).
 * The Python loader validates every tensor (type, shape) and lays weights out before C sees them;
 * C trusts what it is given.
 *
 * Weights (se_mat), logical shape [rows = out, cols = in]:
 *   type  F32   q: float                         d: unused
 *         Q8_0  q: int8, one value per weight     d: float scale per block of 32 along the blocked axis
 *         Q4_0  q: 4-bit, two per byte, per 32 values: byte j low nibble = value j, high = value j+16;
 *               weight = d * (q - 8)
 *   layout ROW  row-major: row r at q + r*cols (nibbles: r*cols/2); blocks along cols; d [rows][cols/32]
 *          COL  input-channel-major ("neuron-major" for the down projection): column c at q + c*rows
 *               (nibbles: c*rows/2, blocked in groups of 32 rows); the scales keep their original
 *               blocks along cols: d [cols/32][rows]. Lossless re-layout of a ROW matrix; it lets a
 *               mat-vec skip every input channel whose activation is zero (input-thresholded sites,
 *               and the down projection behind a thresholded gate).
 * Activations for ROW quantized weights are quantized per block of 32 (int8 + float scale), and
 * dot products run in integers (AVX2: maddubs / madd), as llama.cpp's q8 dot products do.
 *
 * Kernels come in a scalar version and a SIMD version (AVX2+FMA on x86-64, NEON on aarch64),
 * picked at run time from the CPU's features (__builtin_cpu_supports), never from the build
 * machine; SPARSEDGE_NATIVE_SCALAR=1 (or se_set_level(0)) forces the scalar path.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SE_X86 1
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#define SE_NEON 1
#endif

#define QK 32
#define SE_API __attribute__((visibility("default")))

enum { SE_F32 = 0, SE_Q8_0 = 1, SE_Q4_0 = 2 };
enum { SE_ROW = 0, SE_COL = 1 };
/* sparsity sites, in sparsedge.runtimes.torch_model.SITES order */
enum { S_QKV = 0, S_Q = 1, S_O = 2, S_FFN = 3, S_GATE = 4, S_DOWN = 5, N_SITES = 6 };

typedef struct {
    int32_t type, layout, rows, cols;
    const void *q;
    const float *d;
} se_mat;

typedef struct {
    se_mat q, k, v, o, gate, up, down;
    const float *attn_norm, *ffn_norm, *q_norm, *k_norm, *post_attn_norm, *post_ffn_norm;
    const float *th[N_SITES]; /* NULL: site off */
    int32_t th_n[N_SITES];    /* 1: one threshold for all channels; else one per channel */
    float theta;
    int32_t window; /* 0: full attention */
} se_layer;

typedef struct {
    int32_t n_layers, hidden, ffn, n_heads, n_kv, head_dim, vocab;
    int32_t act;       /* 0 silu, 1 gelu_tanh */
    int32_t rope_neox; /* 0: pairs (2j, 2j+1) (llama.cpp's Llama layout); 1: pairs (j, j + hd/2) */
    int32_t qk_norm, sandwich;
    float eps, scale, embed_scale, rope_factor, softcap; /* softcap 0: off */
    se_mat embed, lm_head;
    const float *out_norm;
    const se_layer *layers;
} se_model;

typedef struct {
    float *kc, *vc;   /* [n_layers][n_kv][cap][head_dim] */
    int32_t *pos;     /* [cap] position of every entry */
    int32_t cap, n;   /* n: entries in use before this forward */
} se_cache;

/* per-call activity counters (how much work sparsity skipped), filled when non-NULL */
typedef struct {
    int64_t seen[N_SITES], zeroed[N_SITES];
} se_stats;

/* ------------------------------------------------------------------------------------------ */
/* kernel table                                                                                */

typedef struct {
    float (*dot_f32)(const float *w, const float *x, int n);
    float (*dot_q8)(const int8_t *w, const float *wd, const int8_t *x, const float *xd, int nb);
    /* xs[b] = xd[b] * sum(x in block b): the -8 offset of Q4_0 folded out of the integer loop */
    float (*dot_q4)(const uint8_t *w, const float *wd, const int8_t *x, const float *xd,
                    const float *xs, int nb);
    void (*quant_q8)(const float *x, int8_t *q, float *d, float *s, int nb);
    void (*axpy_f32)(float *y, const float *x, float a, int n);
    void (*axpy_i8)(float *y, const int8_t *x, float a, int n);
    void (*axpy_q4)(float *y, const uint8_t *x, float a, int ngroups); /* 32*ngroups values q-8 */
    void (*muladd)(float *y, const float *d, const float *acc, int n);  /* y += d * acc */
    void (*axpy2_q4)(float *y, const uint8_t *x0, const uint8_t *x1, float a0, float a1, int ngroups);
} se_kernels;

static se_kernels K;
static int K_level = -1; /* 0 scalar, 1 avx2+fma, 2 neon */

/* ---- scalar ---- */

static float dot_f32_scalar(const float *w, const float *x, int n) {
    float s = 0.f;
    for (int i = 0; i < n; i++) s += w[i] * x[i];
    return s;
}

static float dot_q8_scalar(const int8_t *w, const float *wd, const int8_t *x, const float *xd, int nb) {
    float s = 0.f;
    for (int b = 0; b < nb; b++) {
        int32_t acc = 0;
        for (int j = 0; j < QK; j++) acc += (int32_t)w[b * QK + j] * (int32_t)x[b * QK + j];
        s += wd[b] * xd[b] * (float)acc;
    }
    return s;
}

static float dot_q4_scalar(const uint8_t *w, const float *wd, const int8_t *x, const float *xd,
                           const float *xs, int nb) {
    float s = 0.f, corr = 0.f;
    for (int b = 0; b < nb; b++) {
        const uint8_t *wb = w + b * (QK / 2);
        const int8_t *xb = x + b * QK;
        int32_t acc = 0;
        for (int j = 0; j < QK / 2; j++) {
            acc += (int32_t)(wb[j] & 0x0F) * xb[j] + (int32_t)(wb[j] >> 4) * xb[j + QK / 2];
        }
        s += wd[b] * xd[b] * (float)acc;
        corr += wd[b] * xs[b];
    }
    return s - 8.f * corr;
}

static void quant_q8_scalar(const float *x, int8_t *q, float *d, float *s, int nb) {
    for (int b = 0; b < nb; b++) {
        const float *xb = x + b * QK;
        float amax = 0.f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        float db = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        int32_t sum = 0;
        for (int j = 0; j < QK; j++) {
            int v = (int)nearbyintf(xb[j] * id);
            q[b * QK + j] = (int8_t)v;
            sum += v;
        }
        d[b] = db;
        s[b] = db * (float)sum;
    }
}

static void axpy_f32_scalar(float *y, const float *x, float a, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

static void axpy_i8_scalar(float *y, const int8_t *x, float a, int n) {
    for (int i = 0; i < n; i++) y[i] += a * (float)x[i];
}

static void axpy_q4_scalar(float *y, const uint8_t *x, float a, int ngroups) {
    for (int g = 0; g < ngroups; g++) {
        const uint8_t *xb = x + g * (QK / 2);
        float *yb = y + g * QK;
        for (int j = 0; j < QK / 2; j++) {
            yb[j] += a * (float)((int)(xb[j] & 0x0F) - 8);
            yb[j + QK / 2] += a * (float)((int)(xb[j] >> 4) - 8);
        }
    }
}

static void muladd_scalar(float *y, const float *d, const float *acc, int n) {
    for (int i = 0; i < n; i++) y[i] += d[i] * acc[i];
}

static void axpy2_q4_scalar(float *y, const uint8_t *x0, const uint8_t *x1, float a0, float a1, int ngroups) {
    axpy_q4_scalar(y, x0, a0, ngroups);
    axpy_q4_scalar(y, x1, a1, ngroups);
}

/* ---- AVX2 + FMA ---- */
#ifdef SE_X86
#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2 static float dot_f32_avx2(const float *w, const float *x, int n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    float s = hsum256(_mm256_add_ps(a0, a1));
    for (; i < n; i++) s += w[i] * x[i];
    return s;
}

/* int8 x int8 over 32 values -> 8 int32 lanes (maddubs needs one unsigned operand: |w|, sign moved to x) */
AVX2 static inline __m256i dot32_i8(__m256i w, __m256i x) {
    __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

AVX2 static float dot_q8_avx2(const int8_t *w, const float *wd, const int8_t *x, const float *xd, int nb) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        __m256i p0 = dot32_i8(_mm256_loadu_si256((const __m256i *)(w + b * QK)),
                              _mm256_loadu_si256((const __m256i *)(x + b * QK)));
        __m256i p1 = dot32_i8(_mm256_loadu_si256((const __m256i *)(w + b * QK + QK)),
                              _mm256_loadu_si256((const __m256i *)(x + b * QK + QK)));
        a0 = _mm256_fmadd_ps(_mm256_set1_ps(wd[b] * xd[b]), _mm256_cvtepi32_ps(p0), a0);
        a1 = _mm256_fmadd_ps(_mm256_set1_ps(wd[b + 1] * xd[b + 1]), _mm256_cvtepi32_ps(p1), a1);
    }
    for (; b < nb; b++) {
        __m256i p0 = dot32_i8(_mm256_loadu_si256((const __m256i *)(w + b * QK)),
                              _mm256_loadu_si256((const __m256i *)(x + b * QK)));
        a0 = _mm256_fmadd_ps(_mm256_set1_ps(wd[b] * xd[b]), _mm256_cvtepi32_ps(p0), a0);
    }
    return hsum256(_mm256_add_ps(a0, a1));
}

AVX2 static inline __m256i unpack_q4(const uint8_t *p) {
    const __m128i m4 = _mm_set1_epi8(0x0F);
    __m128i raw = _mm_loadu_si128((const __m128i *)p);
    __m128i lo = _mm_and_si128(raw, m4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
    return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
}

AVX2 static float dot_q4_avx2(const uint8_t *w, const float *wd, const int8_t *x, const float *xd,
                              const float *xs, int nb) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    float corr = 0.f;
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        __m256i p0 = _mm256_madd_epi16(
            _mm256_maddubs_epi16(unpack_q4(w + b * 16), _mm256_loadu_si256((const __m256i *)(x + b * QK))), ones);
        __m256i p1 = _mm256_madd_epi16(
            _mm256_maddubs_epi16(unpack_q4(w + b * 16 + 16), _mm256_loadu_si256((const __m256i *)(x + b * QK + QK))),
            ones);
        a0 = _mm256_fmadd_ps(_mm256_set1_ps(wd[b] * xd[b]), _mm256_cvtepi32_ps(p0), a0);
        a1 = _mm256_fmadd_ps(_mm256_set1_ps(wd[b + 1] * xd[b + 1]), _mm256_cvtepi32_ps(p1), a1);
        corr += wd[b] * xs[b] + wd[b + 1] * xs[b + 1];
    }
    for (; b < nb; b++) {
        __m256i p0 = _mm256_madd_epi16(
            _mm256_maddubs_epi16(unpack_q4(w + b * 16), _mm256_loadu_si256((const __m256i *)(x + b * QK))), ones);
        a0 = _mm256_fmadd_ps(_mm256_set1_ps(wd[b] * xd[b]), _mm256_cvtepi32_ps(p0), a0);
        corr += wd[b] * xs[b];
    }
    return hsum256(_mm256_add_ps(a0, a1)) - 8.f * corr;
}

AVX2 static void quant_q8_avx2(const float *x, int8_t *q, float *d, float *s, int nb) {
    const __m256 signbit = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int b = 0; b < nb; b++) {
        const float *xb = x + b * QK;
        __m256 v0 = _mm256_loadu_ps(xb), v1 = _mm256_loadu_ps(xb + 8);
        __m256 v2 = _mm256_loadu_ps(xb + 16), v3 = _mm256_loadu_ps(xb + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(signbit, v0), _mm256_andnot_ps(signbit, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(signbit, v2), _mm256_andnot_ps(signbit, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4);
        float db = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        __m256 vid = _mm256_set1_ps(id);
        const int rm = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, vid), rm));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, vid), rm));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, vid), rm));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, vid), rm));
        __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i *)(q + b * QK), _mm256_permutevar8x32_epi32(p, perm));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        d[b] = db;
        s[b] = db * (float)_mm_cvtsi128_si32(s4);
    }
}

AVX2 static void axpy_f32_avx2(float *y, const float *x, float a, int n) {
    __m256 va = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

AVX2 static void axpy_i8_avx2(float *y, const int8_t *x, float a, int n) {
    __m256 va = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        __m128i raw = _mm_loadu_si128((const __m128i *)(x + i));
        __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
        __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw, 8)));
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, f0, _mm256_loadu_ps(y + i)));
        _mm256_storeu_ps(y + i + 8, _mm256_fmadd_ps(va, f1, _mm256_loadu_ps(y + i + 8)));
    }
    for (; i < n; i++) y[i] += a * (float)x[i];
}

AVX2 static void axpy_q4_avx2(float *y, const uint8_t *x, float a, int ngroups) {
    const __m128i m4 = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
    __m256 va = _mm256_set1_ps(a);
    for (int g = 0; g < ngroups; g++) {
        __m128i raw = _mm_loadu_si128((const __m128i *)(x + g * 16));
        __m128i lo = _mm_sub_epi8(_mm_and_si128(raw, m4), eight);
        __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), m4), eight);
        float *yb = y + g * QK;
        __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
        __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
        __m256 f2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
        __m256 f3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
        _mm256_storeu_ps(yb, _mm256_fmadd_ps(va, f0, _mm256_loadu_ps(yb)));
        _mm256_storeu_ps(yb + 8, _mm256_fmadd_ps(va, f1, _mm256_loadu_ps(yb + 8)));
        _mm256_storeu_ps(yb + 16, _mm256_fmadd_ps(va, f2, _mm256_loadu_ps(yb + 16)));
        _mm256_storeu_ps(yb + 24, _mm256_fmadd_ps(va, f3, _mm256_loadu_ps(yb + 24)));
    }
}

/* two channels per pass: the accumulator is loaded and stored once for both */
AVX2 static void axpy2_q4_avx2(float *y, const uint8_t *x0, const uint8_t *x1, float a0, float a1, int ngroups) {
    const __m128i m4 = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
    const __m256 va = _mm256_set1_ps(a0), vb = _mm256_set1_ps(a1);
    for (int g = 0; g < ngroups; g++) {
        __m128i r0 = _mm_loadu_si128((const __m128i *)(x0 + g * 16));
        __m128i r1 = _mm_loadu_si128((const __m128i *)(x1 + g * 16));
        __m128i l0 = _mm_sub_epi8(_mm_and_si128(r0, m4), eight), h0 = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(r0, 4), m4), eight);
        __m128i l1 = _mm_sub_epi8(_mm_and_si128(r1, m4), eight), h1 = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(r1, 4), m4), eight);
        float *yb = y + g * QK;
#define SE_Q4PAIR(off, s0, s1)                                                                          \
        _mm256_storeu_ps(yb + off, _mm256_fmadd_ps(vb, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s1)),   \
                         _mm256_fmadd_ps(va, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s0)), _mm256_loadu_ps(yb + off))));
        SE_Q4PAIR(0, l0, l1)
        SE_Q4PAIR(8, _mm_srli_si128(l0, 8), _mm_srli_si128(l1, 8))
        SE_Q4PAIR(16, h0, h1)
        SE_Q4PAIR(24, _mm_srli_si128(h0, 8), _mm_srli_si128(h1, 8))
#undef SE_Q4PAIR
    }
}

AVX2 static void muladd_avx2(float *y, const float *d, const float *acc, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(_mm256_loadu_ps(d + i), _mm256_loadu_ps(acc + i),
                                                _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += d[i] * acc[i];
}
#endif /* SE_X86 */

/* ---- NEON (aarch64; compiled there only) ---- */
#ifdef SE_NEON
static float dot_f32_neon(const float *w, const float *x, int n) {
    float32x4_t a0 = vdupq_n_f32(0.f), a1 = vdupq_n_f32(0.f);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        a0 = vfmaq_f32(a0, vld1q_f32(w + i), vld1q_f32(x + i));
        a1 = vfmaq_f32(a1, vld1q_f32(w + i + 4), vld1q_f32(x + i + 4));
    }
    float s = vaddvq_f32(vaddq_f32(a0, a1));
    for (; i < n; i++) s += w[i] * x[i];
    return s;
}

static inline int32_t dot32_i8_neon(int8x16_t w0, int8x16_t w1, int8x16_t x0, int8x16_t x1) {
    int16x8_t p0 = vmull_s8(vget_low_s8(w0), vget_low_s8(x0));
    p0 = vmlal_s8(p0, vget_high_s8(w0), vget_high_s8(x0)); /* |sum| <= 2*128*127: fits int16 */
    int16x8_t p1 = vmull_s8(vget_low_s8(w1), vget_low_s8(x1));
    p1 = vmlal_s8(p1, vget_high_s8(w1), vget_high_s8(x1));
    return vaddlvq_s16(p0) + vaddlvq_s16(p1);
}

static float dot_q8_neon(const int8_t *w, const float *wd, const int8_t *x, const float *xd, int nb) {
    float s = 0.f;
    for (int b = 0; b < nb; b++) {
        const int8_t *wb = w + b * QK, *xb = x + b * QK;
        int32_t acc = dot32_i8_neon(vld1q_s8(wb), vld1q_s8(wb + 16), vld1q_s8(xb), vld1q_s8(xb + 16));
        s += wd[b] * xd[b] * (float)acc;
    }
    return s;
}

static float dot_q4_neon(const uint8_t *w, const float *wd, const int8_t *x, const float *xd,
                         const float *xs, int nb) {
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    float s = 0.f, corr = 0.f;
    for (int b = 0; b < nb; b++) {
        uint8x16_t raw = vld1q_u8(w + b * 16);
        int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(raw, m4));
        int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(raw, 4));
        const int8_t *xb = x + b * QK;
        int32_t acc = dot32_i8_neon(lo, hi, vld1q_s8(xb), vld1q_s8(xb + 16));
        s += wd[b] * xd[b] * (float)acc;
        corr += wd[b] * xs[b];
    }
    return s - 8.f * corr;
}

static void axpy_f32_neon(float *y, const float *x, float a, int n) {
    int i = 0;
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), vld1q_f32(x + i), a));
    for (; i < n; i++) y[i] += a * x[i];
}

static void axpy_i8_neon(float *y, const int8_t *x, float a, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        int16x8_t v = vmovl_s8(vld1_s8(x + i));
        float32x4_t f0 = vcvtq_f32_s32(vmovl_s16(vget_low_s16(v)));
        float32x4_t f1 = vcvtq_f32_s32(vmovl_s16(vget_high_s16(v)));
        vst1q_f32(y + i, vfmaq_n_f32(vld1q_f32(y + i), f0, a));
        vst1q_f32(y + i + 4, vfmaq_n_f32(vld1q_f32(y + i + 4), f1, a));
    }
    for (; i < n; i++) y[i] += a * (float)x[i];
}
#endif /* SE_NEON */

SE_API int se_set_level(int level) {
    /* level -1: best the CPU supports (unless SPARSEDGE_NATIVE_SCALAR=1); 0: scalar */
    if (level < 0) {
        const char *e = getenv("SPARSEDGE_NATIVE_SCALAR");
        level = (e && *e && strcmp(e, "0") != 0) ? 0 : 99;
    }
    se_kernels k = {dot_f32_scalar, dot_q8_scalar, dot_q4_scalar, quant_q8_scalar,
                    axpy_f32_scalar, axpy_i8_scalar, axpy_q4_scalar, muladd_scalar, axpy2_q4_scalar};
    int got = 0;
#ifdef SE_X86
    if (level >= 1) {
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
            k.dot_f32 = dot_f32_avx2; k.dot_q8 = dot_q8_avx2; k.dot_q4 = dot_q4_avx2;
            k.quant_q8 = quant_q8_avx2; k.axpy_f32 = axpy_f32_avx2; k.axpy_i8 = axpy_i8_avx2;
            k.axpy_q4 = axpy_q4_avx2; k.muladd = muladd_avx2; k.axpy2_q4 = axpy2_q4_avx2;
            got = 1;
        }
    }
#endif
#ifdef SE_NEON
    if (level >= 1) { /* NEON is part of the aarch64 base ISA */
        k.dot_f32 = dot_f32_neon; k.dot_q8 = dot_q8_neon; k.dot_q4 = dot_q4_neon;
        k.axpy_f32 = axpy_f32_neon; k.axpy_i8 = axpy_i8_neon;
        got = 2;
    }
#endif
    K = k;
    K_level = got;
    return got;
}

static inline void ensure_kernels(void) {
    if (K_level < 0) se_set_level(-1);
}

SE_API int se_level(void) {
    ensure_kernels();
    return K_level;
}

SE_API int se_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static inline int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}
static inline int thread_count(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* ------------------------------------------------------------------------------------------ */
/* mat-mat over k tokens; called by every thread of the enclosing parallel region              */

/* activations quantized per block of 32 for ROW quantized weights */
typedef struct {
    int8_t *q;
    float *d, *s;
} se_qact;

static void quantize_rows(const float *X, int k, int cols, se_qact *qa) {
    int nb = cols / QK;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int t = 0; t < k; t++) K.quant_q8(X + (size_t)t * cols, qa->q + (size_t)t * cols, qa->d + (size_t)t * nb,
                                           qa->s + (size_t)t * nb, nb);
}

/* Y[t][r] = W[r,:] . X[t] for ROW layout; rowmask (k x rows, or NULL): skip rows, Y = 0 there.
 * Each row is read once for all k tokens (it stays in L1 across the token loop). */
static void mm_row(const se_mat *W, int k, const float *X, const se_qact *qa, float *Y,
                   const uint8_t *rowmask) {
    const int rows = W->rows, cols = W->cols, nb = cols / QK;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int r = 0; r < rows; r++) {
        for (int t = 0; t < k; t++) {
            float *y = Y + (size_t)t * rows + r;
            if (rowmask && !rowmask[(size_t)t * rows + r]) { *y = 0.f; continue; }
            switch (W->type) {
            case SE_F32:
                *y = K.dot_f32((const float *)W->q + (size_t)r * cols, X + (size_t)t * cols, cols);
                break;
            case SE_Q8_0:
                *y = K.dot_q8((const int8_t *)W->q + (size_t)r * cols, W->d + (size_t)r * nb,
                              qa->q + (size_t)t * cols, qa->d + (size_t)t * nb, nb);
                break;
            default:
                *y = K.dot_q4((const uint8_t *)W->q + (size_t)r * cols / 2, W->d + (size_t)r * nb,
                              qa->q + (size_t)t * cols, qa->d + (size_t)t * nb, qa->s + (size_t)t * nb, nb);
            }
        }
    }
}

/* Y[t] = W X[t] for COL layout, skipping every input channel c with X[t][c] == 0: each thread owns a
 * range of output rows (groups of 32) and walks the input channels block by block; the block's
 * columns stay in cache while every token's active channels of that block are added.
 * acc: per-thread scratch of at least rows floats. */
static void mm_col(const se_mat *W, int k, const float *X, float *Y, float *acc) {
    const int rows = W->rows, cols = W->cols;
    const int nth = thread_count(), tid = thread_id();
    const int ng = (rows + QK - 1) / QK;
    const int r0 = (int)((int64_t)ng * tid / nth) * QK;
    int r1 = (int)((int64_t)ng * (tid + 1) / nth) * QK;
    if (r1 > rows) r1 = rows;
    const int n = r1 - r0;
    if (n > 0) {
        for (int t = 0; t < k; t++) memset(Y + (size_t)t * rows + r0, 0, sizeof(float) * n);
        for (int cb = 0; cb < cols; cb += QK) {
            const int ce = cb + QK < cols ? cb + QK : cols;
            for (int t = 0; t < k; t++) {
                const float *x = X + (size_t)t * cols;
                float *y = Y + (size_t)t * rows + r0;
                if (W->type == SE_F32) {
                    for (int c = cb; c < ce; c++)
                        if (x[c] != 0.f) K.axpy_f32(y, (const float *)W->q + (size_t)c * rows + r0, x[c], n);
                    continue;
                }
                int act[QK], na = 0;
                for (int c = cb; c < ce; c++)
                    if (x[c] != 0.f) act[na++] = c;
                /* the next block's active columns are scattered: ask for them while this block computes */
                if (cb + QK < cols) {
                    const int ne = cb + 2 * QK < cols ? cb + 2 * QK : cols;
                    const size_t esz = W->type == SE_Q8_0 ? 2 : 1; /* bytes per 2 values */
                    for (int c = cb + QK; c < ne; c++)
                        if (x[c] != 0.f) {
                            const char *p = (const char *)W->q + ((size_t)c * rows + r0) * esz / 2;
                            for (size_t o = 0; o < (size_t)n * esz / 2; o += 64) __builtin_prefetch(p + o, 0, 0);
                        }
                }
                if (!na) continue;
                memset(acc, 0, sizeof(float) * n);
                if (W->type == SE_Q8_0) {
                    for (int j = 0; j < na; j++)
                        K.axpy_i8(acc, (const int8_t *)W->q + (size_t)act[j] * rows + r0, x[act[j]], n);
                } else {
                    const uint8_t *base = (const uint8_t *)W->q;
                    int j = 0;
                    for (; j + 2 <= na; j += 2)
                        K.axpy2_q4(acc, base + ((size_t)act[j] * rows + r0) / 2, base + ((size_t)act[j + 1] * rows + r0) / 2,
                                   x[act[j]], x[act[j + 1]], n / QK);
                    if (j < na) K.axpy_q4(acc, base + ((size_t)act[j] * rows + r0) / 2, x[act[j]], n / QK);
                }
                K.muladd(y, W->d + (size_t)(cb / QK) * rows + r0, acc, n);
            }
        }
    }
#ifdef _OPENMP
#pragma omp barrier
#endif
}

/* ------------------------------------------------------------------------------------------ */
/* small ops                                                                                   */

static void rmsnorm_row(float *y, const float *x, const float *w, int n, float eps) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = 1.f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) y[i] = x[i] * r * w[i];
}

static void rope_row(float *x, int n_heads, int hd, int pos, float theta, float factor, int neox) {
    const int half = hd / 2;
    for (int j = 0; j < half; j++) {
        float inv = 1.f / powf(theta, (float)(2 * j) / (float)hd);
        float ang = ((float)pos / factor) * inv;
        float c = cosf(ang), s = sinf(ang);
        for (int h = 0; h < n_heads; h++) {
            float *v = x + h * hd;
            int i0 = neox ? j : 2 * j, i1 = neox ? j + half : 2 * j + 1;
            float a = v[i0], b = v[i1];
            v[i0] = a * c - b * s;
            v[i1] = b * c + a * s;
        }
    }
}

static inline float act_fn(float x, int act) {
    if (act == 0) return x / (1.f + expf(-x));
    const float k0 = 0.7978845608028654f; /* sqrt(2/pi) */
    return 0.5f * x * (1.f + tanhf(k0 * (x + 0.044715f * x * x * x)));
}

/* x -> x * (|x| >= t); returns the number of zeroed entries */
static int64_t threshold_row(float *x, int n, const float *t, int tn) {
    int64_t z = 0;
    if (tn == 1) {
        const float t0 = t[0];
        for (int i = 0; i < n; i++) if (!(fabsf(x[i]) >= t0)) { x[i] = 0.f; z++; }
    } else {
        for (int i = 0; i < n; i++) if (!(fabsf(x[i]) >= t[i])) { x[i] = 0.f; z++; }
    }
    return z;
}

static void dequant_row(const se_mat *W, int r, float *y) {
    const int cols = W->cols, nb = cols / QK;
    if (W->type == SE_F32) {
        memcpy(y, (const float *)W->q + (size_t)r * cols, sizeof(float) * cols);
    } else if (W->type == SE_Q8_0) {
        const int8_t *q = (const int8_t *)W->q + (size_t)r * cols;
        for (int i = 0; i < cols; i++) y[i] = W->d[(size_t)r * nb + i / QK] * (float)q[i];
    } else {
        const uint8_t *q = (const uint8_t *)W->q + (size_t)r * cols / 2;
        for (int b = 0; b < nb; b++) {
            float d = W->d[(size_t)r * nb + b];
            for (int j = 0; j < QK / 2; j++) {
                y[b * QK + j] = d * (float)((int)(q[b * 16 + j] & 0x0F) - 8);
                y[b * QK + j + 16] = d * (float)((int)(q[b * 16 + j] >> 4) - 8);
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* the decoder step                                                                            */

#define OMP_FOR _Pragma("omp for schedule(static)")
#ifndef _OPENMP
#undef OMP_FOR
#define OMP_FOR
#endif

static inline void count_site(se_stats *st, int site, int64_t seen, int64_t zeroed) {
    if (!st) return;
#ifdef _OPENMP
#pragma omp atomic
#endif
    st->seen[site] += seen;
#ifdef _OPENMP
#pragma omp atomic
#endif
    st->zeroed[site] += zeroed;
}

/* one token's activation row at a thresholded site (no-op when the site is off) */
static inline void site_row(const se_layer *L, int site, float *x, int width, se_stats *st) {
    if (!L->th[site]) return;
    int64_t z = threshold_row(x, width, L->th[site], L->th_n[site]);
    count_site(st, site, width, z);
}

static inline int needs_q8(const se_mat *W) { return W->layout == SE_ROW && W->type != SE_F32; }

static inline void quant_token(const float *X, int t, int cols, se_qact *qa) {
    const int nb = cols / QK;
    K.quant_q8(X + (size_t)t * cols, qa->q + (size_t)t * cols, qa->d + (size_t)t * nb, qa->s + (size_t)t * nb, nb);
}

static inline float row_dot(const se_mat *W, int r, const float *x, const se_qact *qa, int t) {
    const int cols = W->cols, nb = cols / QK;
    switch (W->type) {
    case SE_F32:
        return K.dot_f32((const float *)W->q + (size_t)r * cols, x + (size_t)t * cols, cols);
    case SE_Q8_0:
        return K.dot_q8((const int8_t *)W->q + (size_t)r * cols, W->d + (size_t)r * nb, qa->q + (size_t)t * cols,
                        qa->d + (size_t)t * nb, nb);
    default:
        return K.dot_q4((const uint8_t *)W->q + (size_t)r * cols / 2, W->d + (size_t)r * nb,
                        qa->q + (size_t)t * cols, qa->d + (size_t)t * nb, qa->s + (size_t)t * nb, nb);
    }
}

/* several ROW matrices in one work-shared loop (one barrier): Y_i[t] = W_i X_i[t] */
static void mm_rows_multi(int n, const se_mat *const *W, const float *const *X, se_qact *const *qa,
                          float *const *Y, int k) {
    int total = 0;
    for (int i = 0; i < n; i++) total += W[i]->rows;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int rr = 0; rr < total; rr++) {
        int i = 0, r = rr;
        while (r >= W[i]->rows) r -= W[i++]->rows;
        for (int t = 0; t < k; t++) Y[i][(size_t)t * W[i]->rows + r] = row_dot(W[i], r, X[i], qa[i], t);
    }
}

/* The FFN's gate/up stage for ROW gate and up, fused per neuron: g = act(gate . x), gate_act
 * threshold, up only where g survives (each token its own active set), m = g * u, down_in
 * threshold. M: [k][F] input of the down projection. */
static void ffn_gate_up_fused(const se_model *m, const se_layer *L, int k, const float *X, const se_qact *qa,
                              float *M, se_stats *st) {
    const int F = m->ffn;
    const float *tg = L->th[S_GATE], *td = L->th[S_DOWN];
    const int tgn = L->th_n[S_GATE], tdn = L->th_n[S_DOWN];
    int64_t zg = 0, zd = 0;
#ifdef _OPENMP
#pragma omp for schedule(static) nowait
#endif
    for (int r = 0; r < F; r++) {
        for (int t = 0; t < k; t++) {
            float g = act_fn(row_dot(&L->gate, r, X, qa, t), m->act);
            if (tg && !(fabsf(g) >= tg[tgn == 1 ? 0 : r])) { M[(size_t)t * F + r] = 0.f; zg++; if (td) zd++; continue; }
            float v = g * row_dot(&L->up, r, X, qa, t);
            if (td && !(fabsf(v) >= td[tdn == 1 ? 0 : r])) { v = 0.f; zd++; }
            M[(size_t)t * F + r] = v;
        }
    }
    if (tg) count_site(st, S_GATE, 0, zg);
    if (td) count_site(st, S_DOWN, 0, zd);
#ifdef _OPENMP
#pragma omp barrier
#pragma omp single
#endif
    {
        if (tg) count_site(st, S_GATE, (int64_t)k * F, 0);
        if (td) count_site(st, S_DOWN, (int64_t)k * F, 0);
    }
}

/* Returns 0 on success, nonzero on failure (1: out of memory, 2: cache too small).
 * logits: [k][vocab]. mask: uint8 [k][k], row t = the new tokens token t sees. */
SE_API int se_forward(const se_model *m, se_cache *c, int k, const int32_t *tokens, const int32_t *pos,
                      const uint8_t *mask, float *logits, int nthreads, se_stats *stats) {
    ensure_kernels();
    const int H = m->hidden, F = m->ffn, nh = m->n_heads, nkv = m->n_kv, hd = m->head_dim;
    const int QD = nh * hd, KD = nkv * hd, V = m->vocab;
    const int n0 = c->n, total = c->n + k;
    if (total > c->cap) return 2;
    int widest = H > F ? H : F;
    if (QD > widest) widest = QD;
    if (V > widest) widest = V;
    const int nthr = nthreads > 0 ? nthreads : 1;
    size_t need = (size_t)k * H * 4 + (size_t)k * QD * 2 + (size_t)k * KD * 2 + (size_t)k * F * 3 +
                  (size_t)k * nh * total + (size_t)nthr * widest;
    size_t qn = (size_t)k * widest;
    float *buf = (float *)malloc(sizeof(float) * need);
    int8_t *qbuf = (int8_t *)malloc(qn * 2 + 64);
    float *qsc = (float *)malloc(sizeof(float) * (qn / QK + 8) * 4);
    if (!buf || !qbuf || !qsc) {
        free(buf); free(qbuf); free(qsc);
        return 1;
    }
    float *x = buf, *h = x + (size_t)k * H, *hq = h + (size_t)k * H, *f = hq + (size_t)k * H;
    float *q = f + (size_t)k * H, *att = q + (size_t)k * QD;
    float *kk = att + (size_t)k * QD, *vv = kk + (size_t)k * KD;
    float *g = vv + (size_t)k * KD, *u = g + (size_t)k * F, *mm = u + (size_t)k * F;
    float *scores = mm + (size_t)k * F, *accs = scores + (size_t)k * nh * total;
    /* two quantized-activation buffers: qa (h, att, mm, final norm) and qb (q_in's copy of h) */
    se_qact qa = {qbuf, qsc, qsc + (qn / QK + 8)};
    se_qact qb = {qbuf + qn, qsc + 2 * (qn / QK + 8), qsc + 3 * (qn / QK + 8)};
    const int group = nh / nkv;

#ifdef _OPENMP
#pragma omp parallel num_threads(nthr)
#endif
    {
        float *acc = accs + (size_t)thread_id() * widest;
        OMP_FOR
        for (int t = 0; t < k; t++) {
            dequant_row(&m->embed, tokens[t], x + (size_t)t * H);
            if (m->embed_scale != 1.f)
                for (int i = 0; i < H; i++) x[(size_t)t * H + i] *= m->embed_scale;
        }
        for (int l = 0; l < m->n_layers; l++) {
            const se_layer *L = &m->layers[l];
            const int q_sep = L->th[S_Q] != NULL;
            /* A: (residual of the previous FFN), attention norm, qkv_in / q_in thresholds, quantize */
            OMP_FOR
            for (int t = 0; t < k; t++) {
                float *xt = x + (size_t)t * H, *ht = h + (size_t)t * H;
                if (l > 0) {
                    const float *ft = f + (size_t)t * H;
                    for (int i = 0; i < H; i++) xt[i] += ft[i];
                }
                rmsnorm_row(ht, xt, L->attn_norm, H, m->eps);
                site_row(L, S_QKV, ht, H, stats);
                if (needs_q8(&L->k) || needs_q8(&L->v) || (!q_sep && needs_q8(&L->q))) quant_token(h, t, H, &qa);
                if (q_sep) {
                    memcpy(hq + (size_t)t * H, ht, sizeof(float) * H);
                    site_row(L, S_Q, hq + (size_t)t * H, H, stats);
                    if (needs_q8(&L->q)) quant_token(hq, t, H, &qb);
                }
            }
            /* B: q, k, v (ROW ones in one loop) */
            {
                const se_mat *W[3];
                const float *X[3];
                se_qact *QA[3];
                float *Y[3];
                int n = 0;
                const se_mat *all[3] = {&L->q, &L->k, &L->v};
                float *outs[3] = {q, kk, vv};
                for (int i = 0; i < 3; i++) {
                    const float *xin = (i == 0 && q_sep) ? hq : h;
                    if (all[i]->layout == SE_COL) {
                        mm_col(all[i], k, xin, outs[i], acc);
                    } else {
                        W[n] = all[i]; X[n] = xin; QA[n] = (i == 0 && q_sep) ? &qb : &qa; Y[n] = outs[i]; n++;
                    }
                }
                if (n) mm_rows_multi(n, W, X, QA, Y, k);
            }
            /* C: q/k norms, RoPE, append to the cache */
            OMP_FOR
            for (int t = 0; t < k; t++) {
                float *qt = q + (size_t)t * QD, *kt = kk + (size_t)t * KD, *vt = vv + (size_t)t * KD;
                if (m->qk_norm) {
                    for (int i = 0; i < nh; i++) rmsnorm_row(qt + i * hd, qt + i * hd, L->q_norm, hd, m->eps);
                    for (int i = 0; i < nkv; i++) rmsnorm_row(kt + i * hd, kt + i * hd, L->k_norm, hd, m->eps);
                }
                rope_row(qt, nh, hd, pos[t], L->theta, m->rope_factor, m->rope_neox);
                rope_row(kt, nkv, hd, pos[t], L->theta, m->rope_factor, m->rope_neox);
                for (int i = 0; i < nkv; i++) {
                    size_t off = (((size_t)l * nkv + i) * c->cap + n0 + t) * hd;
                    memcpy(c->kc + off, kt + i * hd, sizeof(float) * hd);
                    memcpy(c->vc + off, vt + i * hd, sizeof(float) * hd);
                }
                if (l == 0) c->pos[n0 + t] = pos[t];
            }
            /* D: attention, each (token, head) over every earlier entry plus its visible new ones */
#ifdef _OPENMP
#pragma omp for collapse(2) schedule(static)
#endif
            for (int t = 0; t < k; t++) {
                for (int i = 0; i < nh; i++) {
                    const int kvh = i / group;
                    const float *qv = q + (size_t)t * QD + i * hd;
                    const float *Kc = c->kc + ((size_t)l * nkv + kvh) * c->cap * hd;
                    const float *Vc = c->vc + ((size_t)l * nkv + kvh) * c->cap * hd;
                    float *sc = scores + ((size_t)t * nh + i) * total;
                    float mx = -INFINITY;
                    for (int j = 0; j < total; j++) {
                        int vis = j < n0 ? 1 : mask[(size_t)t * k + (j - n0)];
                        if (vis && L->window > 0 && !(pos[t] - c->pos[j] < L->window)) vis = 0;
                        if (!vis) { sc[j] = -INFINITY; continue; }
                        sc[j] = K.dot_f32(qv, Kc + (size_t)j * hd, hd) * m->scale;
                        if (sc[j] > mx) mx = sc[j];
                    }
                    float *o = att + (size_t)t * QD + i * hd;
                    memset(o, 0, sizeof(float) * hd);
                    float sum = 0.f;
                    for (int j = 0; j < total; j++) {
                        if (sc[j] == -INFINITY) continue;
                        float p = expf(sc[j] - mx);
                        sum += p;
                        K.axpy_f32(o, Vc + (size_t)j * hd, p, hd);
                    }
                    float inv = sum > 0.f ? 1.f / sum : 0.f;
                    for (int d = 0; d < hd; d++) o[d] *= inv;
                }
            }
            /* E: o_in threshold, quantize; F: o projection */
            OMP_FOR
            for (int t = 0; t < k; t++) {
                site_row(L, S_O, att + (size_t)t * QD, QD, stats);
                if (needs_q8(&L->o)) quant_token(att, t, QD, &qa);
            }
            if (L->o.layout == SE_COL) mm_col(&L->o, k, att, f, acc);
            else { const se_mat *W[1] = {&L->o}; const float *X[1] = {att}; se_qact *QA[1] = {&qa}; float *Y[1] = {f};
                   mm_rows_multi(1, W, X, QA, Y, k); }
            /* G: residual, FFN norm, ffn_in threshold, quantize */
            OMP_FOR
            for (int t = 0; t < k; t++) {
                float *ft = f + (size_t)t * H, *xt = x + (size_t)t * H, *ht = h + (size_t)t * H;
                if (m->sandwich) rmsnorm_row(ft, ft, L->post_attn_norm, H, m->eps);
                for (int i = 0; i < H; i++) xt[i] += ft[i];
                rmsnorm_row(ht, xt, L->ffn_norm, H, m->eps);
                site_row(L, S_FFN, ht, H, stats);
                if (needs_q8(&L->gate) || needs_q8(&L->up)) quant_token(h, t, H, &qa);
            }
            /* H: gate, act, up, product, thresholds */
            if (L->gate.layout == SE_ROW && L->up.layout == SE_ROW) {
                ffn_gate_up_fused(m, L, k, h, &qa, mm, stats);
            } else {
                const se_mat *W[2]; const float *X[2] = {h, h}; se_qact *QA[2] = {&qa, &qa}; float *Y[2]; int n = 0;
                if (L->gate.layout == SE_COL) mm_col(&L->gate, k, h, g, acc); else { W[n] = &L->gate; Y[n++] = g; }
                if (L->up.layout == SE_COL) mm_col(&L->up, k, h, u, acc); else { W[n] = &L->up; Y[n++] = u; }
                if (n) mm_rows_multi(n, W, X, QA, Y, k);
                OMP_FOR
                for (int t = 0; t < k; t++) {
                    float *gt = g + (size_t)t * F, *ut = u + (size_t)t * F, *mt = mm + (size_t)t * F;
                    for (int i = 0; i < F; i++) gt[i] = act_fn(gt[i], m->act);
                    site_row(L, S_GATE, gt, F, stats);
                    for (int i = 0; i < F; i++) mt[i] = gt[i] * ut[i];
                    site_row(L, S_DOWN, mt, F, stats);
                }
            }
            /* I, J: down projection (COL: only each token's nonzero neurons) */
            if (L->down.layout == SE_COL) {
                mm_col(&L->down, k, mm, f, acc);
            } else {
                if (needs_q8(&L->down)) {
                    OMP_FOR
                    for (int t = 0; t < k; t++) quant_token(mm, t, F, &qa);
                }
                const se_mat *W[1] = {&L->down}; const float *X[1] = {mm}; se_qact *QA[1] = {&qa}; float *Y[1] = {f};
                mm_rows_multi(1, W, X, QA, Y, k);
            }
            /* K: post-FFN norm here; the residual add happens in the next step A */
            if (m->sandwich) {
                OMP_FOR
                for (int t = 0; t < k; t++) rmsnorm_row(f + (size_t)t * H, f + (size_t)t * H, L->post_ffn_norm, H, m->eps);
            }
        }
        OMP_FOR
        for (int t = 0; t < k; t++) {
            float *xt = x + (size_t)t * H;
            if (m->n_layers > 0)
                for (int i = 0; i < H; i++) xt[i] += f[(size_t)t * H + i];
            rmsnorm_row(h + (size_t)t * H, xt, m->out_norm, H, m->eps);
            if (needs_q8(&m->lm_head)) quant_token(h, t, H, &qa);
        }
        if (m->lm_head.layout == SE_COL) mm_col(&m->lm_head, k, h, logits, acc);
        else { const se_mat *W[1] = {&m->lm_head}; const float *X[1] = {h}; se_qact *QA[1] = {&qa}; float *Y[1] = {logits};
               mm_rows_multi(1, W, X, QA, Y, k); }
        if (m->softcap > 0.f) {
            OMP_FOR
            for (int t = 0; t < k; t++)
                for (int i = 0; i < V; i++)
                    logits[(size_t)t * V + i] = tanhf(logits[(size_t)t * V + i] / m->softcap) * m->softcap;
        }
    }
    free(buf); free(qbuf); free(qsc);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* single kernels, for tests against numpy                                                     */

SE_API void se_quant_q8(const float *x, int n, int8_t *q, float *d, float *s) {
    ensure_kernels();
    K.quant_q8(x, q, d, s, n / QK);
}

/* Y[k][rows] = W X[k][cols]; rowmask as in mm_row (ROW layout only) */
SE_API int se_matmul(const se_mat *W, int k, const float *X, float *Y, const uint8_t *rowmask, int nthreads) {
    ensure_kernels();
    int nthr = nthreads > 0 ? nthreads : 1;
    int wide = W->rows > W->cols ? W->rows : W->cols;
    int8_t *qb = (int8_t *)malloc((size_t)k * W->cols + 64);
    float *qd = (float *)malloc(sizeof(float) * ((size_t)k * W->cols / QK + 8) * 2);
    float *accs = (float *)malloc(sizeof(float) * (size_t)nthr * wide);
    if (!qb || !qd || !accs) { free(qb); free(qd); free(accs); return 1; }
    se_qact qa = {qb, qd, qd + ((size_t)k * W->cols / QK + 8)};
#ifdef _OPENMP
#pragma omp parallel num_threads(nthr)
#endif
    {
        float *acc = accs + (size_t)thread_id() * wide;
        if (W->layout == SE_COL) mm_col(W, k, X, Y, acc);
        else {
            if (W->type != SE_F32) quantize_rows(X, k, W->cols, &qa);
            if (rowmask) mm_row(W, k, X, &qa, Y, rowmask);
            else {  /* the forward's path */
                const se_mat *Ws[1] = {W}; const float *Xs[1] = {X}; se_qact *QA[1] = {&qa}; float *Ys[1] = {Y};
                mm_rows_multi(1, Ws, Xs, QA, Ys, k);
            }
        }
    }
    free(qb); free(qd); free(accs);
    return 0;
}

SE_API void se_rmsnorm(float *y, const float *x, const float *w, int k, int n, float eps) {
    for (int t = 0; t < k; t++) rmsnorm_row(y + (size_t)t * n, x + (size_t)t * n, w, n, eps);
}

SE_API void se_rope(float *x, int k, int n_heads, int hd, const int32_t *pos, float theta, float factor, int neox) {
    for (int t = 0; t < k; t++) rope_row(x + (size_t)t * n_heads * hd, n_heads, hd, pos[t], theta, factor, neox);
}

SE_API void se_act(float *x, int n, int act) {
    for (int i = 0; i < n; i++) x[i] = act_fn(x[i], act);
}

SE_API void se_dequant_row(const se_mat *W, int r, float *y) { dequant_row(W, r, y); }
