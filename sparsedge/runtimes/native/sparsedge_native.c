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
 *          R8   (Q8_0, Q4_0; rows a multiple of 8) eight rows interleaved, for k-token products: group
 *               g = rows 8g..8g+7; per group and block b of 32 columns, a tile of 8 rows x 32 values
 *               in 32-byte vectors, vector v holding 4 consecutive columns of each of the 8 rows
 *               (byte 4*i + c = row 8g+i): Q8_0 8 vectors, columns 4v..4v+3 (256 bytes); Q4_0 4
 *               vectors of nibbles, low nibble columns 4v..4v+3, high nibble 16+4v..16+4v+3 (128
 *               bytes, the same low/high split as a Q4_0 block). q: [rows/8][cols/32][tile],
 *               d: [rows/8][cols/32][8]. Lossless re-layout of a ROW matrix. One SIMD lane then
 *               belongs to one row: a token's 4 activations broadcast to all lanes meet 8 rows at
 *               once, per-row sums come out lane by lane (no horizontal sums), and the unpacked
 *               tile is reused by every token of a k-token step while it sits in registers.
 * Activations for quantized weights are quantized per block of 32 (int8 + float scale), and
 * products run in integers (AVX2: maddubs / madd), as llama.cpp's q8 dot products do: ROW and R8
 * as dot products, COL over each block's active channels (col_q4 / col_q8: the same integer sum per
 * (row, block) and the same float step as the R8 kernels, so skipping channels changes nothing but
 * the work). F32 COL weights meet float activations (axpy per active channel).
 * Skipping saves compute but hardly memory traffic here: a token's active channels are scattered,
 * each a slice of a few hundred bytes, and this class of CPU serves such reads at a third of the
 * rate of one sequential stream (benchmarks/skip_bandwidth.py), so out of cache a COL product at
 * 50% sparsity is slower than the dense R8 one.
 *
 * Kernels come in a scalar version and a SIMD version (AVX2+FMA on x86-64, NEON on aarch64),
 * picked at run time from the CPU's features (__builtin_cpu_supports), never from the build
 * machine; SPARSEDGE_NATIVE_SCALAR=1 (or se_set_level(0)) forces the scalar path.
 *
 * Exactness across k. Speculative decoding must reproduce greedy decoding bit for bit, so each
 * token row of a k-token forward (a chain, or a draft tree under its mask) must get the logits
 * that forwarding its root-to-node path one token at a time gives, on the same kernel path and
 * thread count. Hence every per-row result is one fixed sequence of float operations, whatever k
 * and however tokens are grouped into SIMD passes:
 *   - products: integer block sums are exact (int16 / int32 lanes cannot overflow, see the R8
 *     tiles), and a row's float accumulation over blocks runs in block order with the same
 *     fma / mul per block in the 1..4-token passes; dotk_f32's 4-token pass repeats dot_f32's
 *     order per token. Work is split between threads by output rows / R8 groups, never by tokens,
 *     so a row's reduction does not depend on k (it may on the thread count);
 *   - activations are quantized per token (blocks of 32 of that token's row);
 *   - attention runs over the list of a row's visible entries only (cache order), never over
 *     masked entries set to -inf: scores, exp (exp256 for every entry, the tail too), the sum's
 *     lane assignment and o = sum p V then depend only on what the row sees.
 * Norms, RoPE and activations are per token already.
 */
#define _POSIX_C_SOURCE 200809L
#define _GNU_SOURCE 1 /* syscall(2) for the futex of se_barrier, RUSAGE_THREAD */
#include <limits.h>
#include <math.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>
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
#if defined(__linux__)
#include <linux/futex.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define QK 32
/* cache row of the j-th visible entry of an attention row (idx NULL: the visible entries are the
 * first n rows) */
#define SE_ENTRY(idx, j) ((size_t)((idx) ? (idx)[j] : (j)))
#define SE_API __attribute__((visibility("default")))

enum { SE_F32 = 0, SE_Q8_0 = 1, SE_Q4_0 = 2 };
enum { SE_ROW = 0, SE_COL = 1, SE_R8 = 2 };
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
    /* additive biases of the q, k, v projections (Qwen2), NULL when absent: q_bias [n_heads *
     * head_dim], k_bias / v_bias [n_kv * head_dim], added to each token's product row before the
     * q/k norms and RoPE (they rotate with q and k) */
    const float *q_bias, *k_bias, *v_bias;
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
    /* s[b] = d[b] * sum(q in block b); isum8[b] = 8 * sum(q in block b) (exact; Q4_0's offset of 8
     * folded out of the integer sums, ready to subtract) */
    void (*quant_q8)(const float *x, int8_t *q, float *d, float *s, int32_t *isum, int nb);
    void (*axpy_f32)(float *y, const float *x, float a, int n);
    /* COL Q4_0, one input block of one token, integer: y[r] += (d[r] * xd) * (sum_j (q_j[r] - 8) xa[j])
     * for r < 32 * ngroups, the sum over the block's na active channels j (na a multiple of 4, at
     * most 32; padding entries have xa = 0), cp[j] channel j's nibbles at the first row, xsum8 =
     * 8 * sum_j xa[j]. The same integer sum and the same float operation per block as r8_q4 on the
     * block's full 32 channels, so the result is bit-identical to the dense kernel's on the same
     * (thresholded) input. */
    void (*col_q4)(const uint8_t *const *cp, const int8_t *xa, int na, int ngroups, const float *d, float xd,
                   int32_t xsum8, float *y);
    /* COL Q8_0 (int8 per row), the same for n rows (any n; SIMD passes of 32): y[r] += (d[r] * xd) *
     * (sum_j q_j[r] xa[j]); bit-identical to r8_q8 on the block */
    void (*col_q8)(const uint8_t *const *cp, const int8_t *xa, int na, int n, const float *d, float xd, float *y);
    /* k-token products, one R8 group (8 rows) against k quantized tokens (token t at xq + t*cols,
     * scales xd + t*nb, Q4_0: xsum + t*nb = 8 * each block's int8 sum): y[t*ystride + i] = row
     * 8g+i . x[t], i < 8 */
    void (*r8_q4)(const uint8_t *wq, const float *wd, int nb, const int8_t *xq, const float *xd,
                  const int32_t *xsum, int k, float *y, size_t ystride);
    void (*r8_q8)(const int8_t *wq, const float *wd, int nb, const int8_t *xq, const float *xd, int k,
                  float *y, size_t ystride);
    /* one F32 row against k tokens: y[t*ystride] = w . X[t*n], each y bit-identical to
     * dot_f32(w, X + t*n, n) (a token's result must not depend on k: see "Exactness" at the top) */
    void (*dotk_f32)(const float *w, const float *X, int n, int k, float *y, size_t ystride);
    /* attention over the n visible cache entries of width hd, entry j being cache row
     * e(j) = idx ? idx[j] : j (idx ascending): out[j] = scale * q . K[e(j)], each out[j]
     * independent of n and of j's place in a SIMD pass; s[j] = exp(s[j] - mx) (-inf -> 0)
     * returning the sum; o = sum_j p[j] V[e(j)], j ascending */
    void (*scores)(const float *q, const float *Kc, const int32_t *idx, int n, int hd, float scale, float *out);
    float (*softmax_exp)(float *s, int n, float mx);
    void (*wsum)(float *o, const float *Vc, const int32_t *idx, const float *p, int n, int hd);
    void (*act_vec)(float *x, int n, int act); /* x = act(x): 0 silu, 1 gelu_tanh */
    void (*mul8)(float *y, const float *a, const float *b); /* y[i] = a[i] * b[i], i < 8 */
} se_kernels;

static se_kernels K;
static int K_level = -1; /* 0 scalar, 1 avx2+fma, 2 neon, 3 avx2+fma with AVX512-VNNI products */

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

static void quant_q8_scalar(const float *x, int8_t *q, float *d, float *s, int32_t *isum, int nb) {
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
        isum[b] = 8 * sum;
    }
}

static void axpy_f32_scalar(float *y, const float *x, float a, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

static void col_q4_scalar(const uint8_t *const *cp, const int8_t *xa, int na, int ngroups, const float *d, float xd,
                          int32_t xsum8, float *y) {
    for (int g = 0; g < ngroups; g++)
        for (int j = 0; j < QK / 2; j++) {
            int32_t lo = 0, hi = 0; /* rows 32g + j and 32g + 16 + j */
            for (int a = 0; a < na; a++) {
                const uint8_t byte = cp[a][g * (QK / 2) + j];
                lo += (int32_t)(byte & 0x0F) * xa[a];
                hi += (int32_t)(byte >> 4) * xa[a];
            }
            const int r = g * QK + j;
            y[r] += d[r] * xd * (float)(lo - xsum8);
            y[r + QK / 2] += d[r + QK / 2] * xd * (float)(hi - xsum8);
        }
}

static void col_q8_scalar(const uint8_t *const *cp, const int8_t *xa, int na, int n, const float *d, float xd,
                          float *y) {
    for (int r = 0; r < n; r++) {
        int32_t sum = 0;
        for (int a = 0; a < na; a++) sum += (int32_t)((const int8_t *)cp[a])[r] * xa[a];
        y[r] += d[r] * xd * (float)sum;
    }
}

static inline int32_t ld_i32(const void *p) { int32_t v; memcpy(&v, p, 4); return v; }

/* R8 tiles (see the layout note at the top); the same integer sums per (row, block) as the SIMD
 * versions, then y += (wd * xd) * sum in float */
static void r8_q4_scalar(const uint8_t *wq, const float *wd, int nb, const int8_t *xq, const float *xd,
                         const int32_t *xsum, int k, float *y, size_t ystride) {
    const int cols = nb * QK;
    for (int t = 0; t < k; t++) {
        float acc[8] = {0};
        const int8_t *x = xq + (size_t)t * cols;
        for (int b = 0; b < nb; b++) {
            const uint8_t *tile = wq + (size_t)b * 128;
            for (int i = 0; i < 8; i++) {
                int32_t sum = 0;
                for (int v = 0; v < 4; v++)
                    for (int c = 0; c < 4; c++) {
                        uint8_t byte = tile[v * 32 + 4 * i + c];
                        sum += (int32_t)(byte & 0x0F) * x[b * QK + 4 * v + c] + (int32_t)(byte >> 4) * x[b * QK + 16 + 4 * v + c];
                    }
                sum -= xsum[(size_t)t * nb + b];
                acc[i] += wd[b * 8 + i] * xd[(size_t)t * nb + b] * (float)sum;
            }
        }
        for (int i = 0; i < 8; i++) y[(size_t)t * ystride + i] = acc[i];
    }
}

static void r8_q8_scalar(const int8_t *wq, const float *wd, int nb, const int8_t *xq, const float *xd, int k,
                         float *y, size_t ystride) {
    const int cols = nb * QK;
    for (int t = 0; t < k; t++) {
        float acc[8] = {0};
        const int8_t *x = xq + (size_t)t * cols;
        for (int b = 0; b < nb; b++) {
            const int8_t *tile = wq + (size_t)b * 256;
            for (int i = 0; i < 8; i++) {
                int32_t sum = 0;
                for (int v = 0; v < 8; v++)
                    for (int c = 0; c < 4; c++) sum += (int32_t)tile[v * 32 + 4 * i + c] * x[b * QK + 4 * v + c];
                acc[i] += wd[b * 8 + i] * xd[(size_t)t * nb + b] * (float)sum;
            }
        }
        for (int i = 0; i < 8; i++) y[(size_t)t * ystride + i] = acc[i];
    }
}

static void act_vec_scalar(float *x, int n, int act);

static void mul8_scalar(float *y, const float *a, const float *b) {
    for (int i = 0; i < 8; i++) y[i] = a[i] * b[i];
}

/* these three go through the kernel table (K, defined below), so that NEON's dot / axpy serve them */
static void dotk_f32_generic(const float *w, const float *X, int n, int k, float *y, size_t ystride);
static void scores_generic(const float *q, const float *Kc, const int32_t *idx, int n, int hd, float scale, float *out);
static void wsum_generic(float *o, const float *Vc, const int32_t *idx, const float *p, int n, int hd);

static float softmax_exp_scalar(float *s, int n, float mx) {
    float sum = 0.f;
    for (int j = 0; j < n; j++) {
        s[j] = s[j] == -INFINITY ? 0.f : expf(s[j] - mx);
        sum += s[j];
    }
    return sum;
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

AVX2 static void quant_q8_avx2(const float *x, int8_t *q, float *d, float *s, int32_t *isum, int nb) {
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
        isum[b] = 8 * _mm_cvtsi128_si32(s4);
    }
}

AVX2 static void axpy_f32_avx2(float *y, const float *x, float a, int n) {
    __m256 va = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

/* COL Q4_0, integer (see se_kernels.col_q4). Four active channels c0..c3 per pass over 32 rows:
 * their 16-byte groups (low nibbles rows 0-15, high rows 16-31) are paired as [c0 | c1] and
 * [c2 | c3] in the two 128-bit lanes, split into nibbles, and byte-interleaved, so that each
 * 32-byte vector holds 8 rows x the channel pair (c0, c2) in lane 0 and (c1, c3) in lane 1; one
 * maddubs against the pairs' activations then gives per row and lane w0 x0 + w2 x2 (int16). A
 * lane sums at most 8 passes of 2 * 15 * 127: 30480, no overflow; the lanes are added in int32.
 * 22 instructions per 128 multiply-adds (the dense R8 kernel: about 48 per 256). */
AVX2 static void col_q4_avx2(const uint8_t *const *cp, const int8_t *xa, int na, int ngroups, const float *d,
                             float xd, int32_t xsum8, float *y) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const int nq = na / 4;
    __m256i xv[8];
    for (int j = 0; j < nq; j++) {
        const int8_t *a = xa + 4 * j;
        const short p02 = (short)((uint8_t)a[0] | ((uint8_t)a[2] << 8)), p13 = (short)((uint8_t)a[1] | ((uint8_t)a[3] << 8));
        xv[j] = _mm256_setr_m128i(_mm_set1_epi16(p02), _mm_set1_epi16(p13));
    }
    const __m256 vxd = _mm256_set1_ps(xd);
    const __m256i vsum = _mm256_set1_epi32(xsum8);
    for (int g = 0; g < ngroups; g++) {
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        const size_t off = (size_t)g * 16;
        for (int j = 0; j < nq; j++) {
            const uint8_t *const *p = cp + 4 * j;
            __m256i v01 = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(p[0] + off))),
                                                  _mm_loadu_si128((const __m128i *)(p[1] + off)), 1);
            __m256i v23 = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(p[2] + off))),
                                                  _mm_loadu_si128((const __m128i *)(p[3] + off)), 1);
            __m256i l01 = _mm256_and_si256(v01, m4), h01 = _mm256_and_si256(_mm256_srli_epi16(v01, 4), m4);
            __m256i l23 = _mm256_and_si256(v23, m4), h23 = _mm256_and_si256(_mm256_srli_epi16(v23, 4), m4);
            a0 = _mm256_add_epi16(a0, _mm256_maddubs_epi16(_mm256_unpacklo_epi8(l01, l23), xv[j])); /* rows 0-7 */
            a1 = _mm256_add_epi16(a1, _mm256_maddubs_epi16(_mm256_unpackhi_epi8(l01, l23), xv[j])); /* 8-15 */
            a2 = _mm256_add_epi16(a2, _mm256_maddubs_epi16(_mm256_unpacklo_epi8(h01, h23), xv[j])); /* 16-23 */
            a3 = _mm256_add_epi16(a3, _mm256_maddubs_epi16(_mm256_unpackhi_epi8(h01, h23), xv[j])); /* 24-31 */
        }
        const __m256i acc[4] = {a0, a1, a2, a3};
        float *yg = y + (size_t)g * QK;
        const float *dg = d + (size_t)g * QK;
        for (int i = 0; i < 4; i++) {
            __m256i s32 = _mm256_add_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc[i])),
                                           _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc[i], 1)));
            s32 = _mm256_sub_epi32(s32, vsum);
            _mm256_storeu_ps(yg + 8 * i, _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(dg + 8 * i), vxd),
                                                         _mm256_cvtepi32_ps(s32), _mm256_loadu_ps(yg + 8 * i)));
        }
    }
}

/* COL Q8_0, integer (see se_kernels.col_q8). Four active channels per pass over 32 rows, their
 * 32-byte columns interleaved into per-row quads (c0 c1 c2 c3), as the R8 tiles hold them: lane
 * i of quad vector v is row {4v..4v+3, 16+4v..16+4v+3}[i] (unpack works within 128-bit lanes), and
 * the scales and outputs are read in that order. maddubs(|w|, sign(x, w)) + madd to int32 per row,
 * as r8_q8 does; a pass sums 4 products of at most 127 * 127. Rows past the last 32 one by one. */
AVX2 static void col_q8_avx2(const uint8_t *const *cp, const int8_t *xa, int na, int n, const float *d, float xd,
                             float *y) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int nq = na / 4, n32 = n / 32 * 32;
    const __m256 vxd = _mm256_set1_ps(xd);
    for (int r = 0; r < n32; r += 32) {
        __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int j = 0; j < nq; j++) {
            const uint8_t *const *p = cp + 4 * j;
            const __m256i xv = _mm256_set1_epi32(ld_i32(xa + 4 * j));
            __m256i v0 = _mm256_loadu_si256((const __m256i *)(p[0] + r)), v1 = _mm256_loadu_si256((const __m256i *)(p[1] + r));
            __m256i v2 = _mm256_loadu_si256((const __m256i *)(p[2] + r)), v3 = _mm256_loadu_si256((const __m256i *)(p[3] + r));
            __m256i lo01 = _mm256_unpacklo_epi8(v0, v1), hi01 = _mm256_unpackhi_epi8(v0, v1);
            __m256i lo23 = _mm256_unpacklo_epi8(v2, v3), hi23 = _mm256_unpackhi_epi8(v2, v3);
            __m256i w[4] = {_mm256_unpacklo_epi16(lo01, lo23), _mm256_unpackhi_epi16(lo01, lo23),
                            _mm256_unpacklo_epi16(hi01, hi23), _mm256_unpackhi_epi16(hi01, hi23)};
            for (int v = 0; v < 4; v++)
                acc[v] = _mm256_add_epi32(acc[v], _mm256_madd_epi16(
                    _mm256_maddubs_epi16(_mm256_sign_epi8(w[v], w[v]), _mm256_sign_epi8(xv, w[v])), ones));
        }
        for (int v = 0; v < 4; v++) {
            float *y0 = y + r + 4 * v, *y1 = y0 + 16;
            const float *d0 = d + r + 4 * v, *d1 = d0 + 16;
            __m256 dv = _mm256_set_m128(_mm_loadu_ps(d1), _mm_loadu_ps(d0));
            __m256 yv = _mm256_set_m128(_mm_loadu_ps(y1), _mm_loadu_ps(y0));
            yv = _mm256_fmadd_ps(_mm256_mul_ps(dv, vxd), _mm256_cvtepi32_ps(acc[v]), yv);
            _mm_storeu_ps(y0, _mm256_castps256_ps128(yv));
            _mm_storeu_ps(y1, _mm256_extractf128_ps(yv, 1));
        }
    }
    for (int r = n32; r < n; r++) { /* the same fma per row as the SIMD rows (and r8_q8) */
        int32_t sum = 0;
        for (int j = 0; j < na; j++) sum += (int32_t)((const int8_t *)cp[j])[r] * xa[j];
        y[r] = _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(d[r] * xd), _mm_set_ss((float)sum), _mm_set_ss(y[r])));
    }
}

/* k tokens in passes of 4, then one pass of the 1..3 left: T is a constant in each call, so the
 * always-inline tile compiles to one loop per T. The arguments after the tile name are the tile's
 * leading ones for the pass starting at token t. */
#define R8_PASSES(tile, ...)                                                                 \
    do {                                                                                     \
        int t = 0;                                                                           \
        for (; t + 4 <= k; t += 4) tile(__VA_ARGS__, 4, y + t * ystride, ystride);           \
        switch (k - t) {                                                                     \
        case 3: tile(__VA_ARGS__, 3, y + t * ystride, ystride); break;                       \
        case 2: tile(__VA_ARGS__, 2, y + t * ystride, ystride); break;                       \
        case 1: tile(__VA_ARGS__, 1, y + t * ystride, ystride); break;                       \
        }                                                                                    \
    } while (0)

/* k-token R8 products. T (1..4) tokens per pass, a compile-time constant after inlining: the
 * unpacked tile (2 registers) meets T tokens, each with an int16 and a float accumulator (8 rows
 * in the 8 lanes), 4 + 2T + 2 <= 14 ymm registers live. */
#define AVX2_INLINE __attribute__((target("avx2,fma"), always_inline)) static inline
/* pins an accumulator in a register at this point: without it GCC reassociates the integer adds
 * into a tree over all 32 maddubs of a block and spills them to the stack (2x slower) */
#define SE_PIN(v) __asm__("" : "+x"(v))

AVX2_INLINE void r8_q4_tile_avx2(const uint8_t *wq, const float *wd, int nb, const int8_t *xq, const float *xd,
                                 const int32_t *xsum, const int T, float *y, size_t ystride) {
    const int cols = nb * QK;
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[4];
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *tile = wq + (size_t)b * 128;
        __m256i a16[4];
        for (int t = 0; t < T; t++) a16[t] = _mm256_setzero_si256();
        for (int v = 0; v < 4; v++) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(tile + 32 * v));
            __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            /* int16 lanes: 8 maddubs of (nibble 0..15) x (int8, |x| <= 127) pairs, at most
             * 8 * 2 * 15 * 127 = 30480 in magnitude: no overflow before the madd to int32 */
            for (int t = 0; t < T; t++) {
                const int8_t *xb = xq + (size_t)t * cols + b * QK + 4 * v;
                a16[t] = _mm256_add_epi16(a16[t], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(ld_i32(xb))));
                a16[t] = _mm256_add_epi16(a16[t], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(ld_i32(xb + 16))));
                SE_PIN(a16[t]);
            }
        }
        const __m256 dv = _mm256_loadu_ps(wd + (size_t)b * 8);
        for (int t = 0; t < T; t++) {
            /* sum (q - 8) x = sum q x - 8 sum x, exact in int32 */
            __m256i s32 = _mm256_sub_epi32(_mm256_madd_epi16(a16[t], ones), _mm256_set1_epi32(xsum[(size_t)t * nb + b]));
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(dv, _mm256_set1_ps(xd[(size_t)t * nb + b])),
                                     _mm256_cvtepi32_ps(s32), acc[t]);
        }
    }
    for (int t = 0; t < T; t++) _mm256_storeu_ps(y + (size_t)t * ystride, acc[t]);
}

AVX2 static void r8_q4_avx2(const uint8_t *wq, const float *wd, int nb, const int8_t *xq, const float *xd,
                            const int32_t *xsum, int k, float *y, size_t ystride) {
    const size_t cols = (size_t)nb * QK;
    R8_PASSES(r8_q4_tile_avx2, wq, wd, nb, xq + t * cols, xd + (size_t)t * nb, xsum + (size_t)t * nb);
}

AVX2_INLINE void r8_q8_tile_avx2(const int8_t *wq, const float *wd, int nb, const int8_t *xq, const float *xd,
                                 const int T, float *y, size_t ystride) {
    const int cols = nb * QK;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4];
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const int8_t *tile = wq + (size_t)b * 256;
        __m256i a32[4];
        for (int t = 0; t < T; t++) a32[t] = _mm256_setzero_si256();
        for (int v = 0; v < 8; v++) {
            /* maddubs needs one unsigned operand: |w|, with w's sign moved onto x; a pair sums to at
             * most 2 * 127 * 127, so each maddubs goes to int32 at once */
            __m256i w = _mm256_loadu_si256((const __m256i *)(tile + 32 * v));
            __m256i aw = _mm256_sign_epi8(w, w);
            for (int t = 0; t < T; t++) {
                __m256i xv = _mm256_set1_epi32(ld_i32(xq + (size_t)t * cols + b * QK + 4 * v));
                a32[t] = _mm256_add_epi32(a32[t], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, w)), ones));
                SE_PIN(a32[t]);
            }
        }
        const __m256 dv = _mm256_loadu_ps(wd + (size_t)b * 8);
        for (int t = 0; t < T; t++)
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(dv, _mm256_set1_ps(xd[(size_t)t * nb + b])),
                                     _mm256_cvtepi32_ps(a32[t]), acc[t]);
    }
    for (int t = 0; t < T; t++) _mm256_storeu_ps(y + (size_t)t * ystride, acc[t]);
}

AVX2 static void r8_q8_avx2(const int8_t *wq, const float *wd, int nb, const int8_t *xq, const float *xd, int k,
                            float *y, size_t ystride) {
    const size_t cols = (size_t)nb * QK;
    R8_PASSES(r8_q8_tile_avx2, wq, wd, nb, xq + t * cols, xd + (size_t)t * nb);
}

/* AVX512-VNNI (on 256-bit vectors, AVX512VL): vpdpbusd sums four u8 x s8 products into each int32
 * lane in one instruction, where AVX2 needs maddubs (to int16), madd (to int32) and an add. The
 * integer sums are the same exact integers, and the per-block float operations are those of the
 * AVX2 tiles, so every result is bit-identical to r8_q4_avx2 / r8_q8_avx2 (tested): only the
 * k-token products (verification) get faster, where the products are compute-bound. Two int32
 * accumulators per token (nibble halves / even-odd 4-column groups) keep 2T dependency chains in
 * flight; EVEX gives 32 ymm registers for them. */
#define VNNI_INLINE __attribute__((target("avx2,fma,avx512f,avx512vl,avx512vnni"), always_inline)) static inline
#define VNNI __attribute__((target("avx2,fma,avx512f,avx512vl,avx512vnni")))

VNNI_INLINE void r8_q4_tile_vnni(const uint8_t *wq, const float *wd, int nb, const int8_t *xq, const float *xd,
                                 const int32_t *xsum, const int T, float *y, size_t ystride) {
    const int cols = nb * QK;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc[4];
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *tile = wq + (size_t)b * 128;
        __m256i al[4], ah[4];
        for (int t = 0; t < T; t++) al[t] = ah[t] = _mm256_setzero_si256();
        for (int v = 0; v < 4; v++) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(tile + 32 * v));
            __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            for (int t = 0; t < T; t++) {
                const int8_t *xb = xq + (size_t)t * cols + b * QK + 4 * v;
                al[t] = _mm256_dpbusd_epi32(al[t], lo, _mm256_set1_epi32(ld_i32(xb)));
                ah[t] = _mm256_dpbusd_epi32(ah[t], hi, _mm256_set1_epi32(ld_i32(xb + 16)));
            }
        }
        const __m256 dv = _mm256_loadu_ps(wd + (size_t)b * 8);
        for (int t = 0; t < T; t++) {
            __m256i s32 = _mm256_sub_epi32(_mm256_add_epi32(al[t], ah[t]), _mm256_set1_epi32(xsum[(size_t)t * nb + b]));
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(dv, _mm256_set1_ps(xd[(size_t)t * nb + b])),
                                     _mm256_cvtepi32_ps(s32), acc[t]);
        }
    }
    for (int t = 0; t < T; t++) _mm256_storeu_ps(y + (size_t)t * ystride, acc[t]);
}

VNNI static void r8_q4_vnni(const uint8_t *wq, const float *wd, int nb, const int8_t *xq, const float *xd,
                            const int32_t *xsum, int k, float *y, size_t ystride) {
    const size_t cols = (size_t)nb * QK;
    R8_PASSES(r8_q4_tile_vnni, wq, wd, nb, xq + t * cols, xd + (size_t)t * nb, xsum + (size_t)t * nb);
}

VNNI_INLINE void r8_q8_tile_vnni(const int8_t *wq, const float *wd, int nb, const int8_t *xq, const float *xd,
                                 const int T, float *y, size_t ystride) {
    const int cols = nb * QK;
    __m256 acc[4];
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const int8_t *tile = wq + (size_t)b * 256;
        __m256i a0[4], a1[4];
        for (int t = 0; t < T; t++) a0[t] = a1[t] = _mm256_setzero_si256();
        for (int v = 0; v < 8; v += 2) {
            /* |w| unsigned, w's sign moved onto x, as in the AVX2 tile */
            __m256i w0 = _mm256_loadu_si256((const __m256i *)(tile + 32 * v));
            __m256i w1 = _mm256_loadu_si256((const __m256i *)(tile + 32 * v + 32));
            __m256i aw0 = _mm256_sign_epi8(w0, w0), aw1 = _mm256_sign_epi8(w1, w1);
            for (int t = 0; t < T; t++) {
                const int8_t *xb = xq + (size_t)t * cols + b * QK + 4 * v;
                a0[t] = _mm256_dpbusd_epi32(a0[t], aw0, _mm256_sign_epi8(_mm256_set1_epi32(ld_i32(xb)), w0));
                a1[t] = _mm256_dpbusd_epi32(a1[t], aw1, _mm256_sign_epi8(_mm256_set1_epi32(ld_i32(xb + 4)), w1));
            }
        }
        const __m256 dv = _mm256_loadu_ps(wd + (size_t)b * 8);
        for (int t = 0; t < T; t++)
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(dv, _mm256_set1_ps(xd[(size_t)t * nb + b])),
                                     _mm256_cvtepi32_ps(_mm256_add_epi32(a0[t], a1[t])), acc[t]);
    }
    for (int t = 0; t < T; t++) _mm256_storeu_ps(y + (size_t)t * ystride, acc[t]);
}

VNNI static void r8_q8_vnni(const int8_t *wq, const float *wd, int nb, const int8_t *xq, const float *xd, int k,
                            float *y, size_t ystride) {
    const size_t cols = (size_t)nb * QK;
    R8_PASSES(r8_q8_tile_vnni, wq, wd, nb, xq + t * cols, xd + (size_t)t * nb);
}

/* one F32 row against 4 tokens per pass: each weight vector loaded once for the 4. Per token the
 * very operations of dot_f32_avx2 (two accumulators over 16 values, one 8-value step into the
 * first, hsum256(a0 + a1), scalar tail in order), so a token's result does not depend on k or on
 * which pass it falls in. 2 weight + 8 accumulator registers. */
AVX2 static void dotk_f32_avx2(const float *w, const float *X, int n, int k, float *y, size_t ystride) {
    int t = 0;
    for (; t + 4 <= k; t += 4) {
        const float *x0 = X + (size_t)t * n, *x1 = x0 + n, *x2 = x1 + n, *x3 = x2 + n;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(), b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
        int i = 0;
        for (; i + 16 <= n; i += 16) {
            __m256 wv = _mm256_loadu_ps(w + i), wu = _mm256_loadu_ps(w + i + 8);
            a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x0 + i), a0);
            b0 = _mm256_fmadd_ps(wu, _mm256_loadu_ps(x0 + i + 8), b0);
            a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x1 + i), a1);
            b1 = _mm256_fmadd_ps(wu, _mm256_loadu_ps(x1 + i + 8), b1);
            a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x2 + i), a2);
            b2 = _mm256_fmadd_ps(wu, _mm256_loadu_ps(x2 + i + 8), b2);
            a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x3 + i), a3);
            b3 = _mm256_fmadd_ps(wu, _mm256_loadu_ps(x3 + i + 8), b3);
        }
        for (; i + 8 <= n; i += 8) {
            __m256 wv = _mm256_loadu_ps(w + i);
            a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x0 + i), a0);
            a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x1 + i), a1);
            a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x2 + i), a2);
            a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x3 + i), a3);
        }
        float s0 = hsum256(_mm256_add_ps(a0, b0)), s1 = hsum256(_mm256_add_ps(a1, b1));
        float s2 = hsum256(_mm256_add_ps(a2, b2)), s3 = hsum256(_mm256_add_ps(a3, b3));
        for (; i < n; i++) { s0 += w[i] * x0[i]; s1 += w[i] * x1[i]; s2 += w[i] * x2[i]; s3 += w[i] * x3[i]; }
        y[(size_t)t * ystride] = s0; y[(size_t)(t + 1) * ystride] = s1;
        y[(size_t)(t + 2) * ystride] = s2; y[(size_t)(t + 3) * ystride] = s3;
    }
    for (; t < k; t++) y[(size_t)t * ystride] = dot_f32_avx2(w, X + (size_t)t * n, n);
}

/* one attention score, hd % 8 == 0: one accumulator over 8-value steps, lanes reduced as
 * ((l0+l1)+(l2+l3)) + ((l4+l5)+(l6+l7)): exactly what the 4-entry pass below does for each of its
 * entries, so an entry's score does not depend on whether it falls in a pass of 4 or the tail */
AVX2 static inline float score1_avx2(const float *q, const float *k0, int hd) {
    __m256 a = _mm256_setzero_ps();
    for (int d = 0; d < hd; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k0 + d), a);
    __m256 h = _mm256_hadd_ps(a, a);
    h = _mm256_hadd_ps(h, h);
    return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

/* 4 visible entries per pass: 4 dot products reduced together with hadd (one store of 4 scores) */
AVX2 static void scores_avx2(const float *q, const float *Kc, const int32_t *idx, int n, int hd, float scale,
                             float *out) {
    if (hd % 8) {
        for (int j = 0; j < n; j++) out[j] = dot_f32_avx2(q, Kc + SE_ENTRY(idx, j) * hd, hd) * scale;
        return;
    }
    const __m128 vs = _mm_set1_ps(scale);
    int j = 0;
    for (; j + 4 <= n; j += 4) {
        const float *k0 = Kc + SE_ENTRY(idx, j) * hd, *k1 = Kc + SE_ENTRY(idx, j + 1) * hd;
        const float *k2 = Kc + SE_ENTRY(idx, j + 2) * hd, *k3 = Kc + SE_ENTRY(idx, j + 3) * hd;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (int d = 0; d < hd; d += 8) {
            __m256 qv = _mm256_loadu_ps(q + d);
            a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + d), a0);
            a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + d), a1);
            a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + d), a2);
            a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + d), a3);
        }
        /* hadd(hadd(a0,a1), hadd(a2,a3)): low half [a0..a3 lanes 0-3], high half lanes 4-7 */
        __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        _mm_storeu_ps(out + j, _mm_mul_ps(r, vs));
    }
    for (; j < n; j++) out[j] = score1_avx2(q, Kc + SE_ENTRY(idx, j) * hd, hd) * scale;
}

/* exp for 8 floats (Cephes expf: x = n ln2 + r, degree-6 polynomial of r, 2^n in the exponent
 * bits); relative error ~1e-7 over the softmax range x <= 0 */
AVX2 static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3365478515625f));
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 z = _mm256_mul_ps(x, x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

AVX2 static float softmax_exp_avx2(float *s, int n, float mx) {
    const __m256 vmx = _mm256_set1_ps(mx), ninf = _mm256_set1_ps(-INFINITY);
    __m256 acc = _mm256_setzero_ps();
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 v = _mm256_loadu_ps(s + j);
        __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(v, ninf, _CMP_EQ_OQ), exp256(_mm256_sub_ps(v, vmx)));
        _mm256_storeu_ps(s + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    if (j < n) { /* the tail through the same exp256 (not expf), padded with -inf -> 0 */
        float tmp[8];
        for (int i = 0; i < 8; i++) tmp[i] = j + i < n ? s[j + i] : -INFINITY;
        __m256 v = _mm256_loadu_ps(tmp);
        __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(v, ninf, _CMP_EQ_OQ), exp256(_mm256_sub_ps(v, vmx)));
        _mm256_storeu_ps(tmp, e);
        for (int i = 0; j + i < n; i++) s[j + i] = tmp[i];
        acc = _mm256_add_ps(acc, e);
    }
    return hsum256(acc);
}

AVX2 static void mul8_avx2(float *y, const float *a, const float *b) {
    _mm256_storeu_ps(y, _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b)));
}

/* SiLU x / (1 + e^-x); GELU (tanh form) with tanh z = 1 - 2 / (1 + e^2z); exp256 clamps its
 * argument, so both saturate correctly for large |x| */
AVX2 static void act_vec_avx2(float *x, int n, int act) {
    const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i), r;
        if (act == 0) {
            r = _mm256_div_ps(v, _mm256_add_ps(one, exp256(_mm256_sub_ps(zero, v))));
        } else {
            __m256 z = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                     _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), v), _mm256_mul_ps(v, v), v));
            __m256 th = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.f), _mm256_add_ps(one, exp256(_mm256_add_ps(z, z)))));
            r = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v), _mm256_add_ps(one, th));
        }
        _mm256_storeu_ps(x + i, r);
    }
    for (; i < n; i++) {
        if (act == 0) x[i] = x[i] / (1.f + expf(-x[i]));
        else x[i] = 0.5f * x[i] * (1.f + tanhf(0.7978845608028654f * (x[i] + 0.044715f * x[i] * x[i] * x[i])));
    }
}

/* o = sum_j p[j] V[j], 32 output values held in 4 registers across all entries */
AVX2 static void wsum_avx2(float *o, const float *Vc, const int32_t *idx, const float *p, int n, int hd) {
    if (hd % 32) {
        memset(o, 0, sizeof(float) * hd);
        for (int j = 0; j < n; j++)
            if (p[j] != 0.f) axpy_f32_avx2(o, Vc + SE_ENTRY(idx, j) * hd, p[j], hd);
        return;
    }
    for (int d = 0; d < hd; d += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (int j = 0; j < n; j++) {
            if (p[j] == 0.f) continue; /* masked entries: nothing to add */
            const __m256 pj = _mm256_set1_ps(p[j]);
            const float *v = Vc + SE_ENTRY(idx, j) * hd + d;
            a0 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v), a0);
            a1 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 8), a1);
            a2 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 16), a2);
            a3 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 24), a3);
        }
        _mm256_storeu_ps(o + d, a0); _mm256_storeu_ps(o + d + 8, a1);
        _mm256_storeu_ps(o + d + 16, a2); _mm256_storeu_ps(o + d + 24, a3);
    }
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

#endif /* SE_NEON */

SE_API int se_set_level(int level) {
    /* level -1: best the CPU supports (unless SPARSEDGE_NATIVE_SCALAR=1); 0: scalar */
    if (level < 0) {
        const char *e = getenv("SPARSEDGE_NATIVE_SCALAR");
        level = (e && *e && strcmp(e, "0") != 0) ? 0 : 99;
    }
    se_kernels k = {dot_f32_scalar, dot_q8_scalar, dot_q4_scalar, quant_q8_scalar,
                    axpy_f32_scalar,
                    col_q4_scalar, col_q8_scalar, r8_q4_scalar, r8_q8_scalar, dotk_f32_generic, scores_generic, softmax_exp_scalar,
                    wsum_generic, act_vec_scalar, mul8_scalar};
    int got = 0;
#ifdef SE_X86
    if (level >= 1) {
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
            k.dot_f32 = dot_f32_avx2; k.dot_q8 = dot_q8_avx2; k.dot_q4 = dot_q4_avx2;
            k.quant_q8 = quant_q8_avx2; k.axpy_f32 = axpy_f32_avx2;
            k.col_q4 = col_q4_avx2; k.col_q8 = col_q8_avx2;
            k.r8_q4 = r8_q4_avx2; k.r8_q8 = r8_q8_avx2; k.dotk_f32 = dotk_f32_avx2;
            k.scores = scores_avx2; k.softmax_exp = softmax_exp_avx2; k.wsum = wsum_avx2;
            k.act_vec = act_vec_avx2; k.mul8 = mul8_avx2;
            got = 1;
            /* level 1 asks for AVX2 alone (the reference the VNNI kernels are tested against) */
            if (level >= 3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                __builtin_cpu_supports("avx512vnni")) {
                k.r8_q4 = r8_q4_vnni; k.r8_q8 = r8_q8_vnni;
                got = 3;
            }
        }
    }
#endif
#ifdef SE_NEON
    if (level >= 1) { /* NEON is part of the aarch64 base ISA */
        k.dot_f32 = dot_f32_neon; k.dot_q8 = dot_q8_neon; k.dot_q4 = dot_q4_neon;
        k.axpy_f32 = axpy_f32_neon;
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

static void dotk_f32_generic(const float *w, const float *X, int n, int k, float *y, size_t ystride) {
    for (int t = 0; t < k; t++) y[(size_t)t * ystride] = K.dot_f32(w, X + (size_t)t * n, n);
}

static void scores_generic(const float *q, const float *Kc, const int32_t *idx, int n, int hd, float scale,
                           float *out) {
    for (int j = 0; j < n; j++) out[j] = K.dot_f32(q, Kc + SE_ENTRY(idx, j) * hd, hd) * scale;
}

static void wsum_generic(float *o, const float *Vc, const int32_t *idx, const float *p, int n, int hd) {
    memset(o, 0, sizeof(float) * hd);
    for (int j = 0; j < n; j++)
        if (p[j] != 0.f) K.axpy_f32(o, Vc + SE_ENTRY(idx, j) * hd, p[j], hd);
}

/* whether this CPU has SIMD R8 kernels (the loader lays weights out R8 only then; NEON keeps ROW,
 * whose per-row dots it has). A forced scalar path runs R8 weights with the scalar R8 kernels. */
SE_API int se_prefers_r8(void) {
#ifdef SE_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
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
/* the team barrier of a forward                                                               */

/* A forward crosses ~6 barriers per layer (180 on SmolLM2). libgomp's barrier spins for
 * GOMP_SPINCOUNT iterations, then sleeps on a futex, and no fixed count suits every load: on an
 * idle 2-vCPU VM a short spin (300) sends many waits to sleep, and waking a sleeping vCPU costs
 * tens of microseconds (decode 233-255 tok/s, a tenth of the runs under 210; spin 1000: 293),
 * while a long spin collapses when another process shares a core (1000: 92 tok/s, 30000: 16;
 * 300: 125; PASSIVE: 147): the spinning thread burns the time slice its sibling needs. So each
 * thread adapts its own wait: spin up to a window, then sleep; a sleep that ended soon after the
 * window (< 4x) doubles it (spinning on would have caught the sibling), a long one halves it (the
 * sibling was descheduled, spinning is wasted). And a thread whose core is contended does not
 * spin at all: there every spin burns the share of the core its own work needs next. Contended =
 * a moving average of its involuntary context switches per forward above 1 (measured on SmolLM2:
 * ~0.2 on an idle 2-vCPU VM, 30-45 with another process pegging a core).
 * OMP_WAIT_POLICY=PASSIVE (sleep at once) and ACTIVE (spin) are honoured. Sense-reversing: the
 * last thread to arrive resets the count and bumps the generation the others wait on. */
typedef struct {
    atomic_int count;
    atomic_uint gen;
    atomic_int sleepers;
} se_bar;

#define SE_SPIN_MIN 2e-6
#define SE_SPIN_MAX 200e-6
static _Thread_local se_bar *tl_bar; /* the barrier of the forward this thread works on, or NULL */
static _Thread_local int tl_team = 1;
static _Thread_local double tl_spin = 20e-6; /* seconds; kept across forwards (pool threads persist) */
static _Thread_local double tl_cap = SE_SPIN_MAX; /* this forward's ceiling on tl_spin */
static _Thread_local long tl_nivcsw = -1;
static _Thread_local double tl_preempt = 0.0; /* moving average of involuntary switches per forward */
static int wait_policy = -1; /* -1 unread, 0 adaptive, 1 PASSIVE, 2 ACTIVE */
static int use_omp_barrier = 0; /* se_wait_mode(1): OpenMP's barrier instead (for comparisons) */

/* 0: the adaptive barrier below; 1: OpenMP's (libgomp: GOMP_SPINCOUNT, OMP_WAIT_POLICY). Returns
 * the previous mode. */
SE_API int se_wait_mode(int mode) {
    int old = use_omp_barrier;
    if (mode >= 0) use_omp_barrier = mode == 1;
    return old;
}

static inline double mono_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(SE_X86)
    _mm_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void futex_wait(atomic_uint *a, unsigned v) {
#if defined(__linux__)
    syscall(SYS_futex, (void *)a, FUTEX_WAIT_PRIVATE, v, NULL, NULL, 0);
#else
    (void)a; (void)v;
    sched_yield();
#endif
}

static void futex_wake_all(atomic_uint *a) {
#if defined(__linux__)
    syscall(SYS_futex, (void *)a, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#else
    (void)a;
#endif
}

/* every thread of a team calls this at the start of its parallel region, with the same bar (or
 * NULL: se_barrier is then OpenMP's own) */
static inline void bar_attach(se_bar *b) {
    tl_bar = use_omp_barrier ? NULL : b;
    b = tl_bar;
#ifdef _OPENMP
    tl_team = omp_get_num_threads();
#else
    tl_team = 1;
#endif
    if (!b) return;
    if (wait_policy < 0) { /* a benign race: every thread computes the same value */
        const char *e = getenv("OMP_WAIT_POLICY");
        wait_policy = !e ? 0 : (!strcasecmp(e, "passive") ? 1 : (!strcasecmp(e, "active") ? 2 : 0));
    }
    tl_cap = wait_policy == 1 ? 0.0 : (wait_policy == 2 ? 1.0 : SE_SPIN_MAX);
#if defined(RUSAGE_THREAD)
    if (wait_policy == 0) {
        struct rusage ru;
        if (getrusage(RUSAGE_THREAD, &ru) == 0) {
            if (tl_nivcsw >= 0) tl_preempt = 0.8 * tl_preempt + 0.2 * (double)(ru.ru_nivcsw - tl_nivcsw);
            tl_nivcsw = ru.ru_nivcsw;
            if (tl_preempt > 1.0) tl_cap = 0.0;
        }
    }
#endif
}

static void se_barrier(void) {
    se_bar *b = tl_bar;
    if (!b) {
#ifdef _OPENMP
#pragma omp barrier
#endif
        return;
    }
    if (tl_team <= 1) return;
    const unsigned g = atomic_load_explicit(&b->gen, memory_order_acquire);
    if (atomic_fetch_add_explicit(&b->count, 1, memory_order_acq_rel) == tl_team - 1) {
        atomic_store_explicit(&b->count, 0, memory_order_relaxed);
        atomic_fetch_add(&b->gen, 1); /* seq_cst: ordered before the sleepers load */
        if (atomic_load(&b->sleepers) > 0) futex_wake_all(&b->gen);
        return;
    }
    for (int i = 0; i < 64; i++) { /* most waits end here, before any clock read */
        if (atomic_load_explicit(&b->gen, memory_order_acquire) != g) return;
        cpu_relax();
    }
    const double t0 = mono_s(), lim = wait_policy == 2 ? 1.0 : fmin(tl_spin, tl_cap);
    do {
        for (int i = 0; i < 64; i++) {
            if (atomic_load_explicit(&b->gen, memory_order_acquire) != g) return;
            cpu_relax();
        }
    } while (mono_s() - t0 < lim);
    atomic_fetch_add(&b->sleepers, 1); /* seq_cst: ordered before the gen load (pairs with the waker) */
    while (atomic_load(&b->gen) == g) futex_wait(&b->gen, g);
    atomic_fetch_sub(&b->sleepers, 1);
    const double w = mono_s() - t0;
    if (tl_cap > 0.0) /* not in a forward that does not spin: its waits say nothing of the window */
        tl_spin = w < 4 * lim ? fmin(2 * lim, SE_SPIN_MAX) : fmax(0.5 * lim, SE_SPIN_MIN);
}

/* ------------------------------------------------------------------------------------------ */
/* mat-mat over k tokens; called by every thread of the enclosing parallel region              */

/* activations quantized per block of 32 for ROW quantized weights */
typedef struct {
    int8_t *q;
    float *d, *s;
    int32_t *sum; /* 8 * the int8 sum per block (quant_q8's isum) */
} se_qact;

static void quantize_rows(const float *X, int k, int cols, se_qact *qa) {
    int nb = cols / QK;
#ifdef _OPENMP
#pragma omp for schedule(static) nowait
#endif
    for (int t = 0; t < k; t++) K.quant_q8(X + (size_t)t * cols, qa->q + (size_t)t * cols, qa->d + (size_t)t * nb,
                                           qa->s + (size_t)t * nb, qa->sum + (size_t)t * nb, nb);
    se_barrier();
}

/* Y[t][r] = W[r,:] . X[t] for ROW layout; rowmask (k x rows, or NULL): skip rows, Y = 0 there.
 * Each row is read once for all k tokens (it stays in L1 across the token loop). */
static void mm_row(const se_mat *W, int k, const float *X, const se_qact *qa, float *Y,
                   const uint8_t *rowmask) {
    const int rows = W->rows, cols = W->cols, nb = cols / QK;
#ifdef _OPENMP
#pragma omp for schedule(static) nowait
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
    se_barrier();
}

/* the next block's active columns are scattered: ask for them while this block computes */
static inline void prefetch_next_cols(const se_mat *W, const float *x, int cb, int cols, int rows, int r0, int n) {
    if (cb + QK >= cols) return;
    const int ne = cb + 2 * QK < cols ? cb + 2 * QK : cols;
    const size_t esz = W->type == SE_F32 ? 8 : W->type == SE_Q8_0 ? 2 : 1; /* bytes per 2 values */
    for (int c = cb + QK; c < ne; c++)
        if (x[c] != 0.f) {
            const char *p = (const char *)W->q + ((size_t)c * rows + r0) * esz / 2;
            for (size_t o = 0; o < (size_t)n * esz / 2; o += 64) __builtin_prefetch(p + o, 0, 0);
        }
}

/* Y[t] = W X[t] for COL layout, skipping every input channel c with X[t][c] == 0: each thread owns a
 * range of output rows (groups of 32) and walks the input channels block by block; the block's
 * columns stay in cache while every token's active channels of that block are added.
 * Q4_0 / Q8_0: X quantized in qa (as for ROW / R8; a channel is active when its int8 value is
 * nonzero), integer sums per block (col_q4 / col_q8), the same function as the dense kernels on the
 * same input. F32: float axpy over the active channels. */
static void mm_col(const se_mat *W, int k, const float *X, const se_qact *qa, float *Y) {
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
                /* quantized: the block's active channels (nonzero int8 activations) and their
                 * slices of this thread's rows, padded to passes of 4 with zero activations */
                const size_t b = (size_t)t * (cols / QK) + cb / QK;
                const int8_t *xq = qa->q + (size_t)t * cols + cb;
                const uint8_t *cp[QK]; /* byte pointers for both types (col_q8 reads int8) */
                int8_t xa[QK];
                int na = 0;
                for (int c = 0; c < QK; c++)
                    if (xq[c]) {
                        const size_t e = (size_t)(cb + c) * rows + r0; /* first value of the slice */
                        cp[na] = (const uint8_t *)W->q + (W->type == SE_Q4_0 ? e / 2 : e);
                        xa[na++] = xq[c];
                    }
                prefetch_next_cols(W, x, cb, cols, rows, r0, n);
                if (!na) continue;
                for (; na % 4; na++) { cp[na] = cp[0]; xa[na] = 0; }
                const float *d = W->d + (size_t)(cb / QK) * rows + r0;
                if (W->type == SE_Q4_0) /* rows % 32 == 0: to_col keeps other shapes as Q8_0 */
                    K.col_q4(cp, xa, na, n / QK, d, qa->d[b], qa->sum[b], y);
                else
                    K.col_q8(cp, xa, na, n, d, qa->d[b], y);
            }
        }
    }
    se_barrier();
}

/* ------------------------------------------------------------------------------------------ */
/* small ops                                                                                   */

static void rmsnorm_row(float *y, const float *x, const float *w, int n, float eps) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = 1.f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) y[i] = x[i] * r * w[i];
}

static inline float act_fn(float x, int act) {
    if (act == 0) return x / (1.f + expf(-x));
    const float k0 = 0.7978845608028654f; /* sqrt(2/pi) */
    return 0.5f * x * (1.f + tanhf(k0 * (x + 0.044715f * x * x * x)));
}

static void act_vec_scalar(float *x, int n, int act) {
    for (int i = 0; i < n; i++) x[i] = act_fn(x[i], act);
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
    if (W->layout == SE_R8) {
        const int g = r / 8, i = r % 8;
        for (int b = 0; b < nb; b++) {
            const float d = W->d[((size_t)g * nb + b) * 8 + i];
            if (W->type == SE_Q8_0) {
                const int8_t *tile = (const int8_t *)W->q + ((size_t)g * nb + b) * 256;
                for (int v = 0; v < 8; v++)
                    for (int c = 0; c < 4; c++) y[b * QK + 4 * v + c] = d * (float)tile[v * 32 + 4 * i + c];
            } else {
                const uint8_t *tile = (const uint8_t *)W->q + ((size_t)g * nb + b) * 128;
                for (int v = 0; v < 4; v++)
                    for (int c = 0; c < 4; c++) {
                        uint8_t byte = tile[v * 32 + 4 * i + c];
                        y[b * QK + 4 * v + c] = d * (float)((int)(byte & 0x0F) - 8);
                        y[b * QK + 16 + 4 * v + c] = d * (float)((int)(byte >> 4) - 8);
                    }
            }
        }
        return;
    }
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

/* work-shared loops end without OpenMP's implicit barrier: se_barrier() follows each */
#define OMP_FOR _Pragma("omp for schedule(static) nowait")
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

/* activations quantized per block of 32: every quantized weight, whatever its layout */
static inline int needs_q8(const se_mat *W) { return W->type != SE_F32; }

static inline void quant_token(const float *X, int t, int cols, se_qact *qa) {
    const int nb = cols / QK;
    K.quant_q8(X + (size_t)t * cols, qa->q + (size_t)t * cols, qa->d + (size_t)t * nb, qa->s + (size_t)t * nb,
               qa->sum + (size_t)t * nb, nb);
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

/* one unit of mm_rows_multi: an R8 group of 8 rows, or one ROW row, against all k tokens; the
 * unit's weights are read from memory once and reused from registers / L1 by every token */
/* R8 group u against k tokens: y[t*ystride + i] = row 8u+i . x[t] */
static inline void r8_unit(const se_mat *W, int u, const se_qact *qa, float *y, size_t ystride, int k) {
    const int nb = W->cols / QK;
    if (W->type == SE_Q4_0)
        K.r8_q4((const uint8_t *)W->q + (size_t)u * nb * 128, W->d + (size_t)u * nb * 8, nb, qa->q, qa->d,
                qa->sum, k, y, ystride);
    else
        K.r8_q8((const int8_t *)W->q + (size_t)u * nb * 256, W->d + (size_t)u * nb * 8, nb, qa->q, qa->d, k,
                y, ystride);
}

static inline void rows_unit(const se_mat *W, int u, const float *X, const se_qact *qa, float *Y, int k) {
    const int rows = W->rows, cols = W->cols;
    if (W->layout == SE_R8) {
        r8_unit(W, u, qa, Y + (size_t)u * 8, rows, k);
    } else if (W->type == SE_F32) {
        K.dotk_f32((const float *)W->q + (size_t)u * cols, X, cols, k, Y + u, rows);
    } else {
        for (int t = 0; t < k; t++) Y[(size_t)t * rows + u] = row_dot(W, u, X, qa, t);
    }
}

static inline int n_units(const se_mat *W) { return W->layout == SE_R8 ? W->rows / 8 : W->rows; }

/* several ROW / R8 matrices in one work-shared loop (one barrier): Y_i[t] = W_i X_i[t] */
static void mm_rows_multi(int n, const se_mat *const *W, const float *const *X, se_qact *const *qa,
                          float *const *Y, int k) {
    int total = 0;
    for (int i = 0; i < n; i++) total += n_units(W[i]);
#ifdef _OPENMP
#pragma omp for schedule(static) nowait
#endif
    for (int uu = 0; uu < total; uu++) {
        int i = 0, u = uu;
        while (u >= n_units(W[i])) u -= n_units(W[i++]);
        rows_unit(W[i], u, X[i], qa[i], Y[i], k);
    }
    se_barrier();
}


/* A neuron's activation is inactive below its threshold (t[0] for a per-layer threshold, t[r] per
 * channel); NaN counts as inactive. */
static inline int below(float x, const float *t, int tn, int r) { return t && !(fabsf(x) >= t[tn == 1 ? 0 : r]); }

/* The down projection's input for one neuron: v, or 0 (counted in *zd) under a down_in threshold. */
static inline float down_in(float v, const float *td, int tdn, int r, int64_t *zd) {
    if (below(v, td, tdn, r)) { (*zd)++; return 0.f; }
    return v;
}
/* The FFN's gate/up stage for an R8 gate, fused per group of 8 neurons (no barrier between the
 * matmuls and the elementwise work): gate tile -> act -> gate_act threshold -> up (an R8 tile, or,
 * for a gate-thresholded recipe, a ROW up computed only on the rows each token kept) -> product ->
 * down_in threshold. X/qa: this thread's copy of the normed input; gt, ut: per-thread scratch
 * [k][8]; M: [k][F] shared, the down projection's input. */
static void ffn_r8_fused(const se_model *m, const se_layer *L, int k, const float *X, const se_qact *qa,
                         float *gt, float *ut, float *M, se_stats *st) {
    const int F = m->ffn;
    const float *tg = L->th[S_GATE], *td = L->th[S_DOWN];
    const int tgn = L->th_n[S_GATE], tdn = L->th_n[S_DOWN];
    const int up_r8 = L->up.layout == SE_R8;
    int64_t zg = 0, zd = 0;
#ifdef _OPENMP
#pragma omp for schedule(static) nowait
#endif
    for (int u = 0; u < F / 8; u++) {
        r8_unit(&L->gate, u, qa, gt, 8, k);
        K.act_vec(gt, 8 * k, m->act);
        if (up_r8) r8_unit(&L->up, u, qa, ut, 8, k);
        if (up_r8 && !tg && !td) { /* dense: m = act(g) * u, 8 neurons at a time */
            for (int t = 0; t < k; t++) K.mul8(M + (size_t)t * F + 8 * u, gt + t * 8, ut + t * 8);
            continue;
        }
        for (int t = 0; t < k; t++) {
            for (int i = 0; i < 8; i++) {
                const int r = 8 * u + i;
                float g = gt[t * 8 + i];
                if (below(g, tg, tgn, r)) { M[(size_t)t * F + r] = 0.f; zg++; if (td) zd++; continue; }
                M[(size_t)t * F + r] = down_in(g * (up_r8 ? ut[t * 8 + i] : row_dot(&L->up, r, X, qa, t)), td, tdn, r, &zd);
            }
        }
    }
    if (tg) count_site(st, S_GATE, thread_id() == 0 ? (int64_t)k * F : 0, zg);
    if (td) count_site(st, S_DOWN, thread_id() == 0 ? (int64_t)k * F : 0, zd);
    se_barrier();
}

/* The same for a ROW gate and up with a gate threshold (CPUs without R8 kernels): per neuron,
 * g = act(gate . x), then up only where g survives. */
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
            if (below(g, tg, tgn, r)) { M[(size_t)t * F + r] = 0.f; zg++; if (td) zd++; continue; }
            M[(size_t)t * F + r] = down_in(g * row_dot(&L->up, r, X, qa, t), td, tdn, r, &zd);
        }
    }
    if (tg) count_site(st, S_GATE, thread_id() == 0 ? (int64_t)k * F : 0, zg);
    if (td) count_site(st, S_DOWN, thread_id() == 0 ? (int64_t)k * F : 0, zd);
    se_barrier();
}

/* RoPE angles of one token: cs[2j] = cos, cs[2j+1] = sin of pos/factor * theta^(-2j/hd), j < hd/2 */
static void rope_table(float *cs, int hd, int pos, float theta, float factor) {
    for (int j = 0; j < hd / 2; j++) {
        float inv = 1.f / powf(theta, (float)(2 * j) / (float)hd);
        float ang = ((float)pos / factor) * inv;
        cs[2 * j] = cosf(ang);
        cs[2 * j + 1] = sinf(ang);
    }
}

static void rope_apply(float *x, int n_heads, int hd, const float *cs, int neox) {
    const int half = hd / 2;
    for (int h = 0; h < n_heads; h++) {
        float *v = x + h * hd;
        for (int j = 0; j < half; j++) {
            const float c = cs[2 * j], s = cs[2 * j + 1];
            int i0 = neox ? j : 2 * j, i1 = neox ? j + half : 2 * j + 1;
            float a = v[i0], b = v[i1];
            v[i0] = a * c - b * s;
            v[i1] = b * c + a * s;
        }
    }
}

/* optional phase timers (se_profile): thread 0's CPU time per phase of se_forward, summed over
 * calls (a barrier's passive wait costs none, so a phase counts thread 0's own share of it) */
enum { P_EMBED, P_NORM, P_QKV, P_ROPE, P_ATTN, P_O, P_GATEUP, P_DOWN, P_HEAD, N_PROF };
static int prof_on = 0;
static double prof_acc[N_PROF];

SE_API void se_profile(int on, double *out) {
    if (out) memcpy(out, prof_acc, sizeof(prof_acc));
    if (on >= 0) {
        prof_on = on;
        memset(prof_acc, 0, sizeof(prof_acc));
    }
}

/* thread 0's CPU time, not wall time: on a CPU shared with other jobs, wall time mostly measures
 * the scheduler, and a thread asleep at a barrier spends no CPU */
static inline double wtime(void) {
#if defined(CLOCK_THREAD_CPUTIME_ID)
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
#else
    return 0.0;
#endif
}
#define PROF(phase)                                                                            \
    do {                                                                                       \
        if (prof_on && tid == 0) {                                                             \
            double now_ = wtime();                                                             \
            prof_acc[phase] += now_ - prof_last;                                               \
            prof_last = now_;                                                                  \
        }                                                                                      \
    } while (0)

/* the residual stream and every per-token step that is cheap (norms, thresholds, activation
 * quantization) live in per-thread copies: each thread computes them for all k tokens itself, so
 * that only the work-shared products need a barrier (6 per layer). With threads that sleep at
 * barriers (OMP_WAIT_POLICY=PASSIVE on a shared CPU) every barrier can cost a wake-up. */
typedef struct {
    float *x, *h, *hq, *ao, *tmp, *gt, *ut;
    se_qact qa, qb;
} se_tbuf;

/* x += f for every token (f through the previous layer's post-FFN norm in sandwich models) */
static void add_residual(const se_model *m, const float *postnorm, int k, float *x, const float *f, float *tmp) {
    const int H = m->hidden;
    for (int t = 0; t < k; t++) {
        const float *ft = f + (size_t)t * H;
        float *xt = x + (size_t)t * H;
        if (postnorm) {
            rmsnorm_row(tmp, ft, postnorm, H, m->eps);
            ft = tmp;
        }
        for (int i = 0; i < H; i++) xt[i] += ft[i];
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
    int wq = H > F ? H : F; /* widest quantized activation row */
    if (QD > wq) wq = QD;
    const int nthr = nthreads > 0 ? nthreads : 1;
    /* shared: q, att [k][QD]; kk, vv [k][KD]; g, u, mm [k][F]; f [k][H]; scores; RoPE table */
    const size_t shared_n = (size_t)k * (2 * QD + 2 * KD + 3 * F + H) + (size_t)k * nh * total + (size_t)k * hd;
    /* per thread: x, h, hq, tmp [k][H]; ao [k][QD]; gt, ut [k][8] */
    const size_t thr_n = (size_t)k * (4 * H + QD) + (size_t)k * 16 + 16;
    const size_t thr_q = (size_t)k * (wq + H) + 64, thr_nb = thr_q / QK + 8;
    float *buf = (float *)malloc(sizeof(float) * (shared_n + thr_n * nthr));
    int8_t *qbuf = (int8_t *)malloc(thr_q * nthr);
    float *qsc = (float *)malloc(sizeof(float) * thr_nb * 2 * nthr);
    int32_t *qsum = (int32_t *)malloc(sizeof(int32_t) * thr_nb * nthr);
    int32_t *vidx = (int32_t *)malloc(sizeof(int32_t) * (size_t)total * nthr); /* per thread: visible entries */
    if (!buf || !qbuf || !qsc || !qsum || !vidx) {
        free(buf); free(qbuf); free(qsc); free(qsum); free(vidx);
        return 1;
    }
    float *q = buf, *att = q + (size_t)k * QD, *kk = att + (size_t)k * QD, *vv = kk + (size_t)k * KD;
    float *g = vv + (size_t)k * KD, *u = g + (size_t)k * F, *mm = u + (size_t)k * F, *f = mm + (size_t)k * F;
    float *scores = f + (size_t)k * H, *ropecs = scores + (size_t)k * nh * total;
    const int group = nh / nkv;
    se_bar bar;
    atomic_init(&bar.count, 0);
    atomic_init(&bar.gen, 0u);
    atomic_init(&bar.sleepers, 0);

#ifdef _OPENMP
#pragma omp parallel num_threads(nthr)
#endif
    {
        bar_attach(&bar);
        const int tid = thread_id();
        double prof_last = prof_on ? wtime() : 0.0;
        se_stats *st0 = tid == 0 ? stats : NULL; /* thread-local steps are counted once */
        se_tbuf T;
        {
            float *p = buf + shared_n + thr_n * tid;
            T.x = p; T.h = p + (size_t)k * H; T.hq = T.h + (size_t)k * H; T.tmp = T.hq + (size_t)k * H;
            T.ao = T.tmp + (size_t)k * H; T.gt = T.ao + (size_t)k * QD; T.ut = T.gt + (size_t)k * 8;
            int8_t *qp = qbuf + thr_q * tid;
            float *sp = qsc + thr_nb * 2 * tid;
            int32_t *ip = qsum + thr_nb * tid;
            const size_t nba = (size_t)k * wq / QK;
            T.qa = (se_qact){qp, sp, sp + thr_nb, ip};
            T.qb = (se_qact){qp + (size_t)k * wq, sp + nba, sp + thr_nb + nba, ip + nba};
        }
        float *x = T.x, *h = T.h, *hq = T.hq;
        se_qact *qa = &T.qa, *qb = &T.qb;
        for (int t = 0; t < k; t++) {
            dequant_row(&m->embed, tokens[t], x + (size_t)t * H);
            if (m->embed_scale != 1.f)
                for (int i = 0; i < H; i++) x[(size_t)t * H + i] *= m->embed_scale;
        }
        PROF(P_EMBED);
        for (int l = 0; l < m->n_layers; l++) {
            const se_layer *L = &m->layers[l];
            const int q_sep = L->th[S_Q] != NULL;
            /* the RoPE table is recomputed only where the base changes (Gemma 3: local / global) */
            const int new_rope = l == 0 || L->theta != m->layers[l - 1].theta;
            /* A (thread-local): residual of the previous FFN, attention norm, qkv_in / q_in
             * thresholds, quantize */
            if (l > 0) add_residual(m, m->sandwich ? m->layers[l - 1].post_ffn_norm : NULL, k, x, f, T.tmp);
            for (int t = 0; t < k; t++) {
                float *xt = x + (size_t)t * H, *ht = h + (size_t)t * H;
                rmsnorm_row(ht, xt, L->attn_norm, H, m->eps);
                site_row(L, S_QKV, ht, H, st0);
                if (needs_q8(&L->k) || needs_q8(&L->v) || (!q_sep && needs_q8(&L->q))) quant_token(h, t, H, qa);
                if (q_sep) {
                    memcpy(hq + (size_t)t * H, ht, sizeof(float) * H);
                    site_row(L, S_Q, hq + (size_t)t * H, H, st0);
                    if (needs_q8(&L->q)) quant_token(hq, t, H, qb);
                }
            }
            PROF(P_NORM);
            /* B: q, k, v (ROW / R8 ones in one loop) */
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
                        mm_col(all[i], k, xin, (i == 0 && q_sep) ? qb : qa, outs[i]);
                    } else {
                        W[n] = all[i]; X[n] = xin; QA[n] = (i == 0 && q_sep) ? qb : qa; Y[n] = outs[i]; n++;
                    }
                }
                if (n) mm_rows_multi(n, W, X, QA, Y, k);
            }
            PROF(P_QKV);
            /* C: q/k/v biases, q/k norms, RoPE, append to the cache. The biases are added here, on
             * the finished product rows, so they are the same one float add per value whatever
             * the weight's layout (ROW / R8 / COL), k or the thread count. */
            OMP_FOR
            for (int t = 0; t < k; t++) {
                float *qt = q + (size_t)t * QD, *kt = kk + (size_t)t * KD, *vt = vv + (size_t)t * KD;
                float *cs = ropecs + (size_t)t * hd;
                if (L->q_bias) for (int i = 0; i < QD; i++) qt[i] += L->q_bias[i];
                if (L->k_bias) for (int i = 0; i < KD; i++) kt[i] += L->k_bias[i];
                if (L->v_bias) for (int i = 0; i < KD; i++) vt[i] += L->v_bias[i];
                if (m->qk_norm) {
                    for (int i = 0; i < nh; i++) rmsnorm_row(qt + i * hd, qt + i * hd, L->q_norm, hd, m->eps);
                    for (int i = 0; i < nkv; i++) rmsnorm_row(kt + i * hd, kt + i * hd, L->k_norm, hd, m->eps);
                }
                if (new_rope) rope_table(cs, hd, pos[t], L->theta, m->rope_factor);
                rope_apply(qt, nh, hd, cs, m->rope_neox);
                rope_apply(kt, nkv, hd, cs, m->rope_neox);
                for (int i = 0; i < nkv; i++) {
                    size_t off = (((size_t)l * nkv + i) * c->cap + n0 + t) * hd;
                    memcpy(c->kc + off, kt + i * hd, sizeof(float) * hd);
                    memcpy(c->vc + off, vt + i * hd, sizeof(float) * hd);
                }
                if (l == 0) c->pos[n0 + t] = pos[t];
            }
            se_barrier();
            PROF(P_ROPE);
            /* D: attention, each (token, head) over exactly its visible entries (the earlier ones
             * inside the window, plus the new ones its mask row shows), gathered in cache order
             * into a list: scores (4 per SIMD pass), max, exp, sum and o = sum p V (output row in
             * registers) all run over that list. Masked entries are skipped, not added as
             * exp(-inf) = 0, so a row's operations depend only on the keys / values it sees, in
             * order: the same as when its path is forwarded one token at a time, whatever k, the
             * row's index in the batch or the tree layout. The list is implicit (idx NULL) when
             * the visible entries are the first nv cache rows (decoding, chains). */
            {
                int32_t *myidx = vidx + (size_t)thread_id() * total;
#ifdef _OPENMP
#pragma omp for collapse(2) schedule(static) nowait
#endif
                for (int t = 0; t < k; t++) {
                    for (int i = 0; i < nh; i++) {
                        const uint8_t *mrow = mask + (size_t)t * k;
                        int nv = -1;
                        const int32_t *ix = NULL;
                        if (L->window <= 0) { /* a prefix of the cache: mask row 1..1 0..0 */
                            int mv = 0;
                            while (mv < k && mrow[mv]) mv++;
                            int j = mv;
                            while (j < k && !mrow[j]) j++;
                            if (j == k) nv = n0 + mv;
                        }
                        if (nv < 0) {
                            nv = 0;
                            for (int j = 0; j < total; j++) {
                                if (j >= n0 && !mrow[j - n0]) continue;
                                if (L->window > 0 && !(pos[t] - c->pos[j] < L->window)) continue;
                                myidx[nv++] = j;
                            }
                            ix = myidx;
                        }
                        const int kvh = i / group;
                        const float *qv = q + (size_t)t * QD + i * hd;
                        const float *Kc = c->kc + ((size_t)l * nkv + kvh) * c->cap * hd;
                        const float *Vc = c->vc + ((size_t)l * nkv + kvh) * c->cap * hd;
                        float *sc = scores + ((size_t)t * nh + i) * total;
                        K.scores(qv, Kc, ix, nv, hd, m->scale, sc);
                        float mx = -INFINITY;
                        for (int j = 0; j < nv; j++) mx = sc[j] > mx ? sc[j] : mx;
                        float sum = K.softmax_exp(sc, nv, mx);
                        float *o = att + (size_t)t * QD + i * hd;
                        K.wsum(o, Vc, ix, sc, nv, hd);
                        float inv = sum > 0.f ? 1.f / sum : 0.f;
                        for (int d = 0; d < hd; d++) o[d] *= inv;
                    }
                }
                se_barrier();
            }
            PROF(P_ATTN);
            /* E (thread-local): o_in threshold on a copy of att, quantize; F: o projection */
            {
                const float *ain = att;
                if (L->th[S_O]) {
                    memcpy(T.ao, att, sizeof(float) * (size_t)k * QD);
                    for (int t = 0; t < k; t++) site_row(L, S_O, T.ao + (size_t)t * QD, QD, st0);
                    ain = T.ao;
                }
                if (needs_q8(&L->o))
                    for (int t = 0; t < k; t++) quant_token(ain, t, QD, qa);
                if (L->o.layout == SE_COL) mm_col(&L->o, k, ain, qa, f);
                else { const se_mat *W[1] = {&L->o}; const float *X[1] = {ain}; se_qact *QA[1] = {qa}; float *Y[1] = {f};
                       mm_rows_multi(1, W, X, QA, Y, k); }
            }
            PROF(P_O);
            /* G (thread-local): residual, FFN norm, ffn_in threshold, quantize */
            add_residual(m, m->sandwich ? L->post_attn_norm : NULL, k, x, f, T.tmp);
            for (int t = 0; t < k; t++) {
                float *ht = h + (size_t)t * H;
                rmsnorm_row(ht, x + (size_t)t * H, L->ffn_norm, H, m->eps);
                site_row(L, S_FFN, ht, H, st0);
                if (needs_q8(&L->gate) || needs_q8(&L->up)) quant_token(h, t, H, qa);
            }
            PROF(P_NORM);
            /* H: gate, act, up, product, thresholds -> mm */
            if (L->gate.layout == SE_R8 && L->up.layout != SE_COL) {
                ffn_r8_fused(m, L, k, h, qa, T.gt, T.ut, mm, stats);
            } else if (L->gate.layout == SE_ROW && L->up.layout == SE_ROW && L->th[S_GATE]) {
                ffn_gate_up_fused(m, L, k, h, qa, mm, stats);
            } else {
                const se_mat *W[2]; const float *X[2] = {h, h}; se_qact *QA[2] = {qa, qa}; float *Y[2]; int n = 0;
                if (L->gate.layout == SE_COL) mm_col(&L->gate, k, h, qa, g); else { W[n] = &L->gate; Y[n++] = g; }
                if (L->up.layout == SE_COL) mm_col(&L->up, k, h, qa, u); else { W[n] = &L->up; Y[n++] = u; }
                if (n) mm_rows_multi(n, W, X, QA, Y, k);
                OMP_FOR
                for (int t = 0; t < k; t++) {
                    float *gt = g + (size_t)t * F, *ut = u + (size_t)t * F, *mt = mm + (size_t)t * F;
                    K.act_vec(gt, F, m->act);
                    site_row(L, S_GATE, gt, F, stats);
                    for (int i = 0; i < F; i++) mt[i] = gt[i] * ut[i];
                    site_row(L, S_DOWN, mt, F, stats);
                }
                se_barrier();
            }
            PROF(P_GATEUP);
            /* I, J: down projection (COL: only each token's nonzero neurons); its post-norm and
             * residual are applied by the next step A (or the final norm) */
            if (needs_q8(&L->down))
                for (int t = 0; t < k; t++) quant_token(mm, t, F, qa);
            if (L->down.layout == SE_COL) {
                mm_col(&L->down, k, mm, qa, f);
            } else {
                const se_mat *W[1] = {&L->down}; const float *X[1] = {mm}; se_qact *QA[1] = {qa}; float *Y[1] = {f};
                mm_rows_multi(1, W, X, QA, Y, k);
            }
            PROF(P_DOWN);
        }
        if (m->n_layers > 0)
            add_residual(m, m->sandwich ? m->layers[m->n_layers - 1].post_ffn_norm : NULL, k, x, f, T.tmp);
        for (int t = 0; t < k; t++) {
            rmsnorm_row(h + (size_t)t * H, x + (size_t)t * H, m->out_norm, H, m->eps);
            if (needs_q8(&m->lm_head)) quant_token(h, t, H, qa);
        }
        if (m->lm_head.layout == SE_COL) mm_col(&m->lm_head, k, h, qa, logits);
        else { const se_mat *W[1] = {&m->lm_head}; const float *X[1] = {h}; se_qact *QA[1] = {qa}; float *Y[1] = {logits};
               mm_rows_multi(1, W, X, QA, Y, k); }
        if (m->softcap > 0.f) {
            OMP_FOR
            for (int t = 0; t < k; t++)
                for (int i = 0; i < V; i++)
                    logits[(size_t)t * V + i] = tanhf(logits[(size_t)t * V + i] / m->softcap) * m->softcap;
            se_barrier();
        }
        PROF(P_HEAD);
        bar_attach(NULL); /* the pool thread outlives this call's bar */
    }
    free(buf); free(qbuf); free(qsc); free(qsum); free(vidx);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* single kernels, for tests against numpy                                                     */

SE_API void se_quant_q8(const float *x, int n, int8_t *q, float *d, float *s, int32_t *isum) {
    ensure_kernels();
    K.quant_q8(x, q, d, s, isum, n / QK);
}

/* Y[k][rows] = W X[k][cols]; rowmask as in mm_row (ROW layout only) */
SE_API int se_matmul(const se_mat *W, int k, const float *X, float *Y, const uint8_t *rowmask, int nthreads) {
    ensure_kernels();
    int nthr = nthreads > 0 ? nthreads : 1;
    if (rowmask && W->layout != SE_ROW) return 3;
    int8_t *qb = (int8_t *)malloc((size_t)k * W->cols + 64);
    const size_t nbk = (size_t)k * W->cols / QK + 8;
    float *qd = (float *)malloc(sizeof(float) * nbk * 2);
    int32_t *qs = (int32_t *)malloc(sizeof(int32_t) * nbk);
    if (!qb || !qd || !qs) { free(qb); free(qd); free(qs); return 1; }
    se_qact qa = {qb, qd, qd + nbk, qs};
#ifdef _OPENMP
#pragma omp parallel num_threads(nthr)
#endif
    {
        bar_attach(NULL);
        if (needs_q8(W)) quantize_rows(X, k, W->cols, &qa);
        if (W->layout == SE_COL) mm_col(W, k, X, &qa, Y);
        else {
            if (rowmask) mm_row(W, k, X, &qa, Y, rowmask);
            else {  /* the forward's path */
                const se_mat *Ws[1] = {W}; const float *Xs[1] = {X}; se_qact *QA[1] = {&qa}; float *Ys[1] = {Y};
                mm_rows_multi(1, Ws, Xs, QA, Ys, k);
            }
        }
    }
    free(qb); free(qd); free(qs);
    return 0;
}

SE_API void se_rmsnorm(float *y, const float *x, const float *w, int k, int n, float eps) {
    for (int t = 0; t < k; t++) rmsnorm_row(y + (size_t)t * n, x + (size_t)t * n, w, n, eps);
}

SE_API void se_rope(float *x, int k, int n_heads, int hd, const int32_t *pos, float theta, float factor, int neox) {
    float *cs = (float *)malloc(sizeof(float) * (size_t)hd);
    if (!cs) return;
    for (int t = 0; t < k; t++) { /* the forward's own path: a table per token, then the rotation */
        rope_table(cs, hd, pos[t], theta, factor);
        rope_apply(x + (size_t)t * n_heads * hd, n_heads, hd, cs, neox);
    }
    free(cs);
}

SE_API void se_act(float *x, int n, int act) {
    ensure_kernels();
    K.act_vec(x, n, act);
}

SE_API void se_dequant_row(const se_mat *W, int r, float *y) { dequant_row(W, r, y); }

/* Memory probe (benchmarks/skip_bandwidth.py): read n chunks of `chunk` bytes (a multiple of 8) at
 * buf + off[i], i ascending, one front-to-back pass per chunk, and return a sum of what was read
 * (so no read is optimised away). Reading every chunk of a buffer in order is one sequential
 * stream: the dense kernels' access pattern; a random subset, the channel-skipping kernels'. */
SE_API uint64_t se_read_chunks(const uint8_t *buf, const int64_t *off, int64_t n, int64_t chunk) {
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *p = buf + off[i];
        int64_t o = 0;
        for (; o + 32 <= chunk; o += 32) {
            uint64_t a, b, c, d;
            memcpy(&a, p + o, 8); memcpy(&b, p + o + 8, 8); memcpy(&c, p + o + 16, 8); memcpy(&d, p + o + 24, 8);
            s0 += a; s1 += b; s2 += c; s3 += d;
        }
        for (; o + 8 <= chunk; o += 8) { uint64_t a; memcpy(&a, p + o, 8); s0 += a; }
    }
    return s0 + s1 + s2 + s3;
}

/* one query's attention over n entries (the forward's kernels): p = softmax(scale q.K[j]) over
 * the entries with vis[j] != 0 (gathered into a list, as the forward does), out = sum_j p[j] V[j].
 * scratch: n floats. Returns 0, or 1 when out of memory. */
SE_API int se_attend(const float *q, const float *Kc, const float *Vc, const uint8_t *vis, int n, int hd,
                     float scale, float *scratch, float *out) {
    ensure_kernels();
    int32_t *idx = (int32_t *)malloc(sizeof(int32_t) * (size_t)(n > 0 ? n : 1));
    if (!idx) return 1;
    int nv = 0;
    for (int j = 0; j < n; j++)
        if (vis[j]) idx[nv++] = j;
    K.scores(q, Kc, idx, nv, hd, scale, scratch);
    float mx = -INFINITY;
    for (int j = 0; j < nv; j++) mx = scratch[j] > mx ? scratch[j] : mx;
    float sum = K.softmax_exp(scratch, nv, mx);
    K.wsum(out, Vc, idx, scratch, nv, hd);
    float inv = sum > 0.f ? 1.f / sum : 0.f;
    for (int d = 0; d < hd; d++) out[d] *= inv;
    free(idx);
    return 0;
}
