/* genq's CPU kernels. Paged attention: rows of q (a decode step's new token of a sequence, or a
 * token of a short prefill chunk over its causal prefix) attending to the context straight from the
 * block-table KV cache (no gather, no copy); the linear layers; and the layer's elementwise ops
 * fused into one pass each.
 *
 * Built at first use by kernels/cpu_kernels.py (cc -O3 -march=native -fopenmp) and called through
 * ctypes, which releases the GIL. Attention's work items are whole rows (or, with few items, one KV
 * head of a row), longest context first, a prefill chunk's rows kept together (with AVX-512 or AVX2 and
 * head_dim 64, up to 16 of them one item), shared by `num_threads` OpenMP threads. Each item reads
 * its K rows once (scores for all its query heads), takes an exact softmax in float32, then reads
 * its V rows once.
 *
 * Layouts (contiguous but for q's token rows, q_stride elements apart):
 *   q, out:        [num_tokens, num_heads, head_dim]        element type T
 *   k/v cache:     [num_blocks, block_size, num_kv_heads, head_dim]   element type T
 *   block_tables:  [num_seqs, table_stride] int32
 *   seq_lens:      [num_seqs] int32 (tokens in the cache, the new one included)
 *   rows:          [num_seqs] int64: the token row of each sequence's query; < 0 = not a decode row
 * T is float32 (dtype 0) or bfloat16 (dtype 1).
 */
#include <math.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* A decode row over several KV heads copies each 16-token chunk of its cache, every head of a token
 * together, before reading it head by head (run_row_avx512); 0 builds the direct reads (run_item_avx512)
 * for comparison (benchmarks/cpu_decode_attention.py --variant=-DGENQ_ROW_SWEEP=0). On by default where
 * it was measured to pay, Intel's AMX Xeons; elsewhere -DGENQ_ROW_SWEEP=1 builds it (docs/kernels.md). */
#ifndef GENQ_ROW_SWEEP
#if defined(__AMX_TILE__)
#define GENQ_ROW_SWEEP 1
#else
#define GENQ_ROW_SWEEP 0
#endif
#endif

typedef struct {
    const void *q, *k_cache, *v_cache;
    int64_t q_stride;          /* elements between two tokens' rows of q (heads contiguous within a row) */
    void *out;
    const int32_t *block_tables, *seq_lens;
    const int64_t *rows;
    int64_t table_stride;
    int num_heads, num_kv_heads, head_dim, block_size, dtype;
    float scale;
} job_t;

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);   /* NaN stays NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);                                              /* round to nearest even */
    return (uint16_t)(bits >> 16);
}

/* a . b over n floats. Explicit vectors: compilers leave a float reduction scalar unless allowed
 * to reassociate it, which would make the result depend on compiler flags. */
static inline float dot(const float *a, const float *b, int n) {
    int i = 0;
    float sum = 0.0f;
#if defined(__AVX512F__)
    if (n >= 16) {
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (; i + 32 <= n; i += 32) {
            acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
        }
        for (; i + 16 <= n; i += 16) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
        sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    }
#elif defined(__AVX2__) && defined(__FMA__)
    if (n >= 8) {
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (; i + 16 <= n; i += 16) {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
        }
        for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        __m256 acc = _mm256_add_ps(acc0, acc1);
        __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        half = _mm_add_ps(half, _mm_movehl_ps(half, half));
        half = _mm_add_ss(half, _mm_shuffle_ps(half, half, 1));
        sum = _mm_cvtss_f32(half);
    }
#endif
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* acc += w * v over n floats */
static inline void axpy(float *acc, float w, const float *v, int n) {
    int i = 0;
#if defined(__AVX512F__)
    const __m512 wv = _mm512_set1_ps(w);
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(wv, _mm512_loadu_ps(v + i), _mm512_loadu_ps(acc + i)));
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 wv = _mm256_set1_ps(w);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(acc + i)));
#endif
    for (; i < n; i++) acc[i] += w * v[i];
}

static inline void load_row(const void *base, int64_t index, int n, int dtype, float *dst) {
    if (dtype == 0) {
        memcpy(dst, (const float *)base + index, (size_t)n * sizeof(float));
    } else {
        const uint16_t *src = (const uint16_t *)base + index;
        int i = 0;
#if defined(__AVX512F__)
        for (; i + 16 <= n; i += 16) {   /* bfloat16 -> float32 is a 16-bit shift: 16 at a time */
            const __m256i h = _mm256_loadu_si256((const __m256i *)(src + i));
            _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
        }
#elif defined(__AVX2__)
        for (; i + 8 <= n; i += 8) {
            const __m128i h = _mm_loadu_si128((const __m128i *)(src + i));
            _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
        }
#endif
        for (; i < n; i++) dst[i] = bf16_to_f32(src[i]);
    }
}

#if defined(__AVX512F__)
/* lanes of a 16-wide step with `remaining` elements left: all 16, or the first `remaining` */
static inline __mmask16 tail_mask(int64_t remaining) {
    return remaining >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << remaining) - 1u);
}

/* four vectors -> one whose 128-bit lane L holds [a b c d] partial sums of lane L's 4 elements
 * (interleave-and-add twice); adding the four lanes then gives the four full sums */
static inline __m512 lane_sums4(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    return _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
}

/* e^x for 16 floats: x = n ln2 + r, |r| <= ln2/2, a degree-7 polynomial for e^r (Cephes' expf
 * coefficients, about 1 ulp), scaled by 2^n. x is clamped to [-87.3, 88.7] (e^x stays finite). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 load16(const void *base, int64_t i, int dtype, __mmask16 mask) {
    if (dtype == 0) return _mm512_maskz_loadu_ps(mask, (const float *)base + i);
    const __m256i h = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)base + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* float32 -> bfloat16 bits, round to nearest even, NaN kept NaN (as f32_to_bf16). With AVX512-BF16 one
 * vcvtneps2bf16 does it, which also reads a float32 subnormal (below 1.2e-38) as zero, where the
 * integer steps below keep it as a bfloat16 subnormal; otherwise the same bits. On a 2-core AMX Xeon a
 * bfloat16 silu_and_mul of 2,048 x 1,536 took 0.73 against 1.08 ms (-DGENQ_SOFT_BF16_ROUND: the
 * integer steps everywhere). */
static inline __m256i to_bf16_16(__m512 v) {
#if defined(__AVX512BF16__) && !defined(GENQ_SOFT_BF16_ROUND)
    return (__m256i)_mm512_cvtneps_pbh(v);
#else
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    rounded = _mm512_mask_or_epi32(rounded, nan, _mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(rounded);
#endif
}

static inline __m512 round16(__m512 v, int dtype) {
    if (dtype == 0) return v;
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_16(v)), 16));
}

static inline void store16(void *base, int64_t i, __m512 v, int dtype, __mmask16 mask) {
    if (dtype == 0) _mm512_mask_storeu_ps((float *)base + i, mask, v);
    else _mm256_mask_storeu_epi16((uint16_t *)base + i, mask, to_bf16_16(v));
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
/* The 8-lane (AVX2 + FMA) counterparts of the helpers above, for CPUs without AVX-512: the same
 * arithmetic on 8 floats at a time. */
#define GENQ_AVX2 1

/* Keeps a loaded vector in a register (PIN_REGISTER's 8-lane twin): where a loop's accumulators take
 * most of the 16 registers, GCC 12 keeps them and folds the load of a reused operand into each
 * multiply-add that uses it instead (a linear block: 15-16 loads per 12 FMAs where 7 suffice), or
 * spills the accumulators (the V pass of an attention tile: 12 stores a token), and a Zen 3 core,
 * two 256-bit loads and one store a cycle, waits on memory operations instead of its FMAs. Pinned,
 * on a 2-core AVX2 EPYC: SmolLM2's 120 matmuls at 24 rows 69 against 79 ms (16 rows 65 against 69,
 * 1 row level); the same sums in the same order (bit for bit the same results). */
#define PIN8(v) __asm__("" : "+x"(v))

/* lanes [0, n) of an 8-wide step: an all-ones word each (maskload/maskstore's mask) */
static inline __m256i mask8(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n >= 8 ? 8 : (int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

static inline float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps(s, s, 1)));
}

/* e^x for 8 floats: exp16's reduction and polynomial; 2^n built in the exponent bits, so x is
 * clamped to [-87.3, 88.3] (n <= 127: e^88.3 = 2.1e38 stays finite, as exp16's e^88.7 does) */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* 8 elements from base + i (all 8 present) as float32 */
static inline __m256 load8(const void *base, int64_t i, int dtype) {
    if (dtype == 0) return _mm256_loadu_ps((const float *)base + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* float32 -> bfloat16 bits in the low 8 16-bit words, round to nearest even, NaN kept NaN */
static inline __m128i to_bf16_8(__m256 v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    rounded = _mm256_blendv_epi8(rounded, _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40)), nan);
    const __m256i packed = _mm256_packus_epi32(rounded, rounded);   /* words 0-3 | 4-7, per 128-bit lane */
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

static inline __m256 round8(__m256 v, int dtype) {
    if (dtype == 0) return v;
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(to_bf16_8(v)), 16));
}

static inline void store8(void *base, int64_t i, __m256 v, int dtype) {
    if (dtype == 0) _mm256_storeu_ps((float *)base + i, v);
    else _mm_storeu_si128((__m128i *)((uint16_t *)base + i), to_bf16_8(v));
}

/* row[0 .. n) <- exp(row - max); returns 1 / their sum (softmax_in_place, 8 lanes) */
static inline float softmax_in_place8(float *row, int n) {
    __m256 mv = _mm256_set1_ps(-INFINITY);
    int t = 0;
    for (; t + 8 <= n; t += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(row + t));
    float m = hmax8(mv);
    for (int u = t; u < n; u++) m = row[u] > m ? row[u] : m;
    const __m256 mb = _mm256_set1_ps(m);
    __m256 sv = _mm256_setzero_ps();
    for (t = 0; t + 8 <= n; t += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + t), mb));
        _mm256_storeu_ps(row + t, e);
        sv = _mm256_add_ps(sv, e);
    }
    if (t < n) {
        const __m256i mask = mask8(n - t);
        const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_maskload_ps(row + t, mask), mb)),
                                       _mm256_castsi256_ps(mask));
        _mm256_maskstore_ps(row + t, mask, e);
        sv = _mm256_add_ps(sv, e);
    }
    return 1.0f / hsum8(sv);
}

/* r[i] <- column i of the 8 x 8 matrix whose rows are r[0..7] */
static inline void transpose8(__m256 r[8]) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    /* u_c, lane 0: column c of rows 0-3, lane 1: column c + 4 (u4..u7: rows 4-7) */
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
#endif

/* One sequence, KV heads [h0, h1): reads each of the sequence's tokens' K rows for those heads (one
 * contiguous run when they are all the heads), then the V rows likewise. Scratch: scores
 * [(h1-h0)*G][ctx], qbuf and acc [(h1-h0)*G][D], row [KVH*D]. */
static void run_item(const job_t *job, int seq, int h0, int h1, float *scores, float *qbuf, float *acc, float *row) {
    const int H = job->num_heads, KVH = job->num_kv_heads, D = job->head_dim, BS = job->block_size;
    const int G = H / KVH, NH = (h1 - h0) * G;    /* query heads handled here: h0*G .. h1*G */
    const int ctx = job->seq_lens[seq];
    const int64_t token = job->rows[seq];
    const int32_t *table = job->block_tables + (int64_t)seq * job->table_stride;
    const int width = (h1 - h0) * D;              /* the K (or V) values of heads h0..h1 of one token */

    load_row(job->q, token * job->q_stride + (int64_t)h0 * G * D, NH * D, job->dtype, qbuf);
    for (int i = 0; i < NH * D; i++) qbuf[i] *= job->scale;
    /* scores[j * ctx + t] = q_j . k_t, query head j (local) against its KV head */
    for (int blk = 0, t0 = 0; t0 < ctx; blk++, t0 += BS) {
        const int64_t base = (int64_t)table[blk] * BS;
        const int n = ctx - t0 < BS ? ctx - t0 : BS;
        for (int o = 0; o < n; o++) {
            const int64_t at = ((base + o) * KVH + h0) * D;
            const float *k;
            if (job->dtype == 0) {
                k = (const float *)job->k_cache + at;
            } else {
                load_row(job->k_cache, at, width, 1, row);
                k = row;
            }
            for (int j = 0; j < NH; j++) scores[(int64_t)j * ctx + t0 + o] = dot(qbuf + j * D, k + (j / G) * D, D);
        }
    }
    float inv_sum[4096];   /* NH <= 4096, checked by the caller */
    for (int j = 0; j < NH; j++) {
        float *s = scores + (int64_t)j * ctx;
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int t = 0; t < ctx; t++) m = s[t] > m ? s[t] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int t = 0; t < ctx; t++) {
            s[t] = expf(s[t] - m);
            sum += s[t];
        }
        inv_sum[j] = 1.0f / sum;
    }
    memset(acc, 0, sizeof(float) * (size_t)NH * D);
    for (int blk = 0, t0 = 0; t0 < ctx; blk++, t0 += BS) {
        const int64_t base = (int64_t)table[blk] * BS;
        const int n = ctx - t0 < BS ? ctx - t0 : BS;
        for (int o = 0; o < n; o++) {
            const int64_t at = ((base + o) * KVH + h0) * D;
            const float *v;
            if (job->dtype == 0) {
                v = (const float *)job->v_cache + at;
            } else {
                load_row(job->v_cache, at, width, 1, row);
                v = row;
            }
            for (int j = 0; j < NH; j++) axpy(acc + j * D, scores[(int64_t)j * ctx + t0 + o], v + (j / G) * D, D);
        }
    }
    const int64_t out_at = (token * H + (int64_t)h0 * G) * D;
    if (job->dtype == 0) {
        float *o = (float *)job->out + out_at;
        for (int j = 0; j < NH; j++)
            for (int d = 0; d < D; d++) o[j * D + d] = acc[j * D + d] * inv_sum[j];
    } else {
        uint16_t *o = (uint16_t *)job->out + out_at;
        for (int j = 0; j < NH; j++)
            for (int d = 0; d < D; d++) o[j * D + d] = f32_to_bf16(acc[j * D + d] * inv_sum[j]);
    }
}

#if defined(__AVX512F__)
/* 16 vectors -> one: lane i holds the sum of v[i]'s 16 lanes (an add tree: 45 instructions where 16
 * separate horizontal sums take about 130) */
static inline __m512 sum16x16(const __m512 *v) {
    __m512 u[4];
    for (int i = 0; i < 4; i++)   /* per 128-bit lane: partial sums of v[4i .. 4i+3] */
        u[i] = lane_sums4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44), _mm512_shuffle_f32x4(u[0], u[1], 0xEE));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44), _mm512_shuffle_f32x4(u[2], u[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

/* row[0 .. n) <- exp(row - max), the exact softmax's numerators in float32; returns 1 / their sum */
static inline float softmax_in_place(float *row, int n) {
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (int t = 0; t < n; t += 16) {
        const __mmask16 mask = tail_mask(n - t);
        mv = _mm512_mask_max_ps(mv, mask, mv, _mm512_maskz_loadu_ps(mask, row + t));
    }
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
    __m512 sv = _mm512_setzero_ps();
    for (int t = 0; t < n; t += 16) {
        const __mmask16 mask = tail_mask(n - t);
        const __m512 e = _mm512_maskz_mov_ps(mask, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, row + t), m)));
        _mm512_mask_storeu_ps(row + t, mask, e);
        sv = _mm512_add_ps(sv, e);
    }
    return 1.0f / _mm512_reduce_add_ps(sv);
}

/* scores[t0 .. t0+16) of one query head (q: NC vectors, scaled) against KV head h's K rows:
 * 16 dot products summed together by one add tree */
static inline __attribute__((always_inline)) void score_tokens(const job_t *job, const int32_t *table, int h,
                                                                 const __m512 *qv, const int NC, int t0, int n,
                                                                 float *out, const int DT) {
    const int KVH = job->num_kv_heads, D = job->head_dim, BS = job->block_size;
    __m512 v[16];
    int blk = t0 / BS, off = t0 % BS;
    for (int o = 0; o < 16; o++) {
        if (o < n) {
            const int64_t at = (((int64_t)table[blk] * BS + off) * KVH + h) * D;
            __m512 a = _mm512_mul_ps(qv[0], load16(job->k_cache, at, DT, 0xffff));
            for (int c = 1; c < NC; c++) a = _mm512_fmadd_ps(qv[c], load16(job->k_cache, at + c * 16, DT, 0xffff), a);
            v[o] = a;
            if (++off == BS) { off = 0; blk++; }
        } else {
            v[o] = _mm512_setzero_ps();
        }
    }
    _mm512_mask_storeu_ps(out + t0, tail_mask(n), sum16x16(v));
}

#ifndef GENQ_ATTN_DPBF16
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define GENQ_ATTN_DPBF16 1
#else
#define GENQ_ATTN_DPBF16 0
#endif
#endif
#if GENQ_ATTN_DPBF16
/* score_tokens of a bfloat16 cache on a CPU with AVX512-BF16: the query's bfloat16 pairs (qb: NC / 2
 * vectors, unscaled) against each K row's by vdpbf16ps, K read as it lies (no widening); lane i sums
 * dimensions 2i and 2i + 1 of each 32 in turn, float32 throughout (products of bfloat16 are exact in
 * float32; subnormal inputs read as zero). The sums times `scale`, as float32. */
static inline __attribute__((always_inline)) void score_tokens_dpbf16(const job_t *job, const int32_t *table, int h,
                                                                        const __m512i *qb, const int NC, int t0,
                                                                        int n, float *out, __m512 scale) {
    const int KVH = job->num_kv_heads, D = job->head_dim, BS = job->block_size;
    const uint16_t *k = (const uint16_t *)job->k_cache;
    __m512 v[16];
    int blk = t0 / BS, off = t0 % BS;
    for (int o = 0; o < 16; o++) {
        if (o < n) {
            const uint16_t *row = k + (((int64_t)table[blk] * BS + off) * KVH + h) * D;
            __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)qb[0], (__m512bh)_mm512_loadu_si512(row));
            for (int c = 1; c < NC / 2; c++)
                a = _mm512_dpbf16_ps(a, (__m512bh)qb[c], (__m512bh)_mm512_loadu_si512(row + 32 * c));
            v[o] = a;
            if (++off == BS) { off = 0; blk++; }
        } else {
            v[o] = _mm512_setzero_ps();
        }
    }
    _mm512_mask_storeu_ps(out + t0, tail_mask(n), _mm512_mul_ps(sum16x16(v), scale));
}
#endif

/* scores[t0 .. t0+n) of the query at job->q + q_at (head_dim NC * 16) against KV head h's K rows: on a
 * bfloat16 cache with AVX512-BF16 by vdpbf16ps on the query as stored (score_tokens_dpbf16), else the
 * widened dot products of the query scaled first (score_tokens) */
static inline __attribute__((always_inline)) void score_query(const job_t *job, const int32_t *table, int h,
                                                                int64_t q_at, const int NC, int t0, int n, float *out,
                                                                __m512 scale, const int DT) {
#if GENQ_ATTN_DPBF16
    if (DT) {
        __m512i qb[4];
        for (int c = 0; c < NC / 2; c++) qb[c] = _mm512_loadu_si512((const uint16_t *)job->q + q_at + 32 * c);
        score_tokens_dpbf16(job, table, h, qb, NC, t0, n, out, scale);
        return;
    }
#endif
    __m512 qv[8];
    for (int c = 0; c < NC; c++) qv[c] = _mm512_mul_ps(load16(job->q, q_at + c * 16, DT, 0xffff), scale);
    score_tokens(job, table, h, qv, NC, t0, n, out, DT);
}

/* acc[g] += probs[(gs + g) * ctx + t] * (V row of KV head h, dims d0 .. d0 + 64) for tokens t < n, in
 * order (the shared loop of weigh_values and weigh_values_part) */
static inline __attribute__((always_inline)) void accumulate_values(const job_t *job, const int32_t *table, int h,
                                                                      const float *probs, int64_t ctx, int64_t n,
                                                                      int gs, const int NG, int d0, __m512 acc[6][4],
                                                                      const int DT) {
    const int KVH = job->num_kv_heads, D = job->head_dim, BS = job->block_size;
    for (int64_t t = 0, blk = 0, off = 0; t < n; t++) {
        const int64_t at = (((int64_t)table[blk] * BS + off) * KVH + h) * D + d0;
        __m512 vv[4];
        for (int c = 0; c < 4; c++) vv[c] = load16(job->v_cache, at + c * 16, DT, 0xffff);
        for (int g = 0; g < NG; g++) {
            const __m512 p = _mm512_set1_ps(probs[(int64_t)(gs + g) * ctx + t]);
            for (int c = 0; c < 4; c++) acc[g][c] = _mm512_fmadd_ps(p, vv[c], acc[g][c]);
        }
        if (++off == BS) { off = 0; blk++; }
    }
}

/* out rows of NG query heads (gs .. gs+NG of KV head h), 64 dims from d0: the probability-weighted
 * sum of V rows, the accumulators held in registers over the whole context */
static inline __attribute__((always_inline)) void weigh_values(const job_t *job, const int32_t *table, int h,
                                                                 const float *probs, int64_t ctx, const float *inv_sum,
                                                                 int gs, const int NG, int d0, int64_t out_at, const int DT) {
    const int D = job->head_dim, G = job->num_heads / job->num_kv_heads;
    __m512 acc[6][4];
    for (int g = 0; g < NG; g++)
        for (int c = 0; c < 4; c++) acc[g][c] = _mm512_setzero_ps();
    accumulate_values(job, table, h, probs, ctx, ctx, gs, NG, d0, acc, DT);
    for (int g = 0; g < NG; g++) {
        const __m512 inv = _mm512_set1_ps(inv_sum[gs + g]);
        const int64_t at = out_at + (int64_t)(h * G + gs + g) * D + d0;
        for (int c = 0; c < 4; c++) store16(job->out, at + c * 16, _mm512_mul_ps(acc[g][c], inv), DT, 0xffff);
    }
}

#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__) && defined(__AVX512BF16__) \
    && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__) && !defined(GENQ_NO_TILE_AMX)
#define GENQ_TILE_AMX 1   /* a tile's bfloat16 scores on the tile unit (tile_scores_amx, with linear_amx below) */
static int amx_ready(void);
static void tile_scores_amx(const job_t *job, int s0, int NQ, int h, int len, const int32_t *table, float *scores);
#define TILE_AMX_MAX_QUERIES 64   /* a tile's queries of one KV head whose bfloat16 rows fit on the stack */
#if GENQ_ROW_SWEEP && !defined(GENQ_NO_ROW_AMX)
#define GENQ_ROW_AMX 1   /* a decode row's bfloat16 scores on the tile unit (row_scores_amx; copying rows only) */
#define ROW_AMX_MAX_WORDS 4096   /* a row's query pairs (queries x head_dim / 2) that fit on the stack */
static void row_scores_amx(const job_t *job, int seq, int h0, int NHK, float *scores, void *buf);
#endif
#endif

#if GENQ_ROW_SWEEP
/* weigh_values over tokens [0, n) only (probs: row stride ctx), its NG x 4 accumulators in acc_mem
 * (float32, kept between calls: with consecutive token ranges, the same sums in the same order as one
 * weigh_values over them all) */
static inline __attribute__((always_inline)) void weigh_values_part(const job_t *job, const int32_t *table, int h,
                                                                      const float *probs, int64_t ctx, int n, int gs,
                                                                      const int NG, int d0, float *acc_mem, const int DT) {
    __m512 acc[6][4];
    for (int g = 0; g < NG; g++)
        for (int c = 0; c < 4; c++) acc[g][c] = _mm512_loadu_ps(acc_mem + (g * 4 + c) * 16);
    accumulate_values(job, table, h, probs, ctx, n, gs, NG, d0, acc, DT);
    for (int g = 0; g < NG; g++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(acc_mem + (g * 4 + c) * 16, acc[g][c]);
}
#endif

/* run_item for head_dim 64 or 128 (a multiple of 64, at most 8 vectors of q in registers): the same
 * arithmetic, vectorized across tokens. Scratch: scores [(h1-h0)*G][ctx]. The cache's dtype DT is a
 * constant of each copy (run_item_avx512 below), so no load tests it: with the test in every load
 * of K and V, 24 decode rows x ~225 tokens x 30 layers took (2-core Zen 4, alternating in one
 * process) 18.4 ms in float32 and 13.0 in bfloat16 against 18.1 and 11.9 without; with the cache
 * hot, 6.2 and 5.3 against 5.1 and 5.0. (Cold, the time is mostly the memory's: only reading that
 * K and V in the same order takes ~12.6 ms in float32.) */
static inline __attribute__((always_inline)) void run_item_avx512_dt(const job_t *job, int seq, int h0, int h1,
                                                                       float *scores, const int DT) {
    const int H = job->num_heads, KVH = job->num_kv_heads, D = job->head_dim, G = H / KVH, NC = D / 16;
    const int ctx = job->seq_lens[seq];
    const int64_t token = job->rows[seq];
    const int32_t *table = job->block_tables + (int64_t)seq * job->table_stride;
    const __m512 scale = _mm512_set1_ps(job->scale);
    float inv_sum[4096];   /* (h1-h0)*G <= 4096, checked by the caller */
    for (int h = h0; h < h1; h++) {
        float *hs = scores + (int64_t)(h - h0) * G * ctx;   /* this KV head's G rows of scores */
        for (int g = 0; g < G; g++) {
            const int64_t q_at = token * job->q_stride + (int64_t)(h * G + g) * D;
            float *row = hs + (int64_t)g * ctx;
            for (int t0 = 0; t0 < ctx; t0 += 16) {
                const int n = ctx - t0 < 16 ? ctx - t0 : 16;
                if (NC == 4) score_query(job, table, h, q_at, 4, t0, n, row, scale, DT);
                else score_query(job, table, h, q_at, 8, t0, n, row, scale, DT);
            }
            inv_sum[(h - h0) * G + g] = softmax_in_place(row, ctx);
        }
        const int64_t out_at = token * H * D;
        for (int d0 = 0; d0 < D; d0 += 64)
            for (int gs = 0; gs < G; gs += 6) {
                const float *inv = inv_sum + (h - h0) * G;
                switch (G - gs < 6 ? G - gs : 6) {
                case 6: weigh_values(job, table, h, hs, ctx, inv, gs, 6, d0, out_at, DT); break;
                case 5: weigh_values(job, table, h, hs, ctx, inv, gs, 5, d0, out_at, DT); break;
                case 4: weigh_values(job, table, h, hs, ctx, inv, gs, 4, d0, out_at, DT); break;
                case 3: weigh_values(job, table, h, hs, ctx, inv, gs, 3, d0, out_at, DT); break;
                case 2: weigh_values(job, table, h, hs, ctx, inv, gs, 2, d0, out_at, DT); break;
                default: weigh_values(job, table, h, hs, ctx, inv, gs, 1, d0, out_at, DT); break;
                }
            }
    }
}

static void run_item_avx512(const job_t *job, int seq, int h0, int h1, float *scores) {
    if (job->dtype == 0) run_item_avx512_dt(job, seq, h0, h1, scores, 0);
    else run_item_avx512_dt(job, seq, h0, h1, scores, 1);
}

#if GENQ_ROW_SWEEP
/* buf[o] <- the rows of KV heads [h0, h0 + nh) of token t0 + o, o < n (one contiguous run a token; a
 * block's tokens are one run), in the order they lie in memory */
static inline void sweep_chunk(const job_t *job, const void *cache, const int32_t *table, int t0, int n, int h0,
                               int nh, void *buf) {
    const int KVH = job->num_kv_heads, D = job->head_dim, BS = job->block_size;
    const size_t es = job->dtype ? 2 : 4, run = (size_t)nh * D * es;
    for (int o = 0, blk = t0 / BS, off = t0 % BS; o < n;) {
        const int take = BS - off < n - o ? BS - off : n - o;   /* tokens left in this block */
        const char *from = (const char *)cache + (((int64_t)table[blk] * BS + off) * KVH + h0) * D * es;
        if (nh == KVH) memcpy((char *)buf + o * run, from, run * take);
        else for (int i = 0; i < take; i++) memcpy((char *)buf + (o + i) * run, from + (size_t)i * KVH * D * es, run);
        o += take;
        off = 0;
        blk++;
    }
}

/* A decode row over KV heads [h0, h1): run_item_avx512's arithmetic in the same order (the same bits),
 * but each 16-token chunk of K, then of V, first copied in the order it lies in memory (every head
 * of a token together) into an L1 buffer that the per-head passes then read. run_item_avx512 reads
 * the cache itself head by head, a strided third of each token's row at a time (SmolLM2's 3 KV
 * heads), and from memory that order reads at about half the rate of a straight sweep (2-core AMX
 * Xeon, docs/kernels.md). Scratch: scores [(h1-h0)*G][ctx], acc [(h1-h0)*G][D], buf [16][h1-h0][D]. */
static inline __attribute__((always_inline)) void run_row_avx512_dt(const job_t *job, int seq, int h0, int h1,
                                                                      float *scores, float *acc, void *buf,
                                                                      const int DT) {
    const int H = job->num_heads, KVH = job->num_kv_heads, D = job->head_dim, G = H / KVH, NC = D / 16;
    const int NHK = h1 - h0, NQ = NHK * G;   /* query j: head h0 + j / G's (j % G)-th */
    const int ctx = job->seq_lens[seq];
    const int64_t token = job->rows[seq];
    const int32_t *table = job->block_tables + (int64_t)seq * job->table_stride;
    const __m512 scale = _mm512_set1_ps(job->scale);
    static const int32_t one_block[1] = {0};
    job_t chunk = *job;   /* the buffer as a cache of one 16-token block of NHK heads */
    chunk.k_cache = chunk.v_cache = buf;
    chunk.num_kv_heads = NHK;
    chunk.block_size = 16;
    float inv_sum[4096];   /* NQ <= 4096, checked by the caller */
    const int64_t q_at = token * job->q_stride + (int64_t)h0 * G * D;
#if GENQ_ROW_AMX
    if (G <= 16 && D % 32 == 0 && NQ * D / 2 <= ROW_AMX_MAX_WORDS && amx_ready())
        row_scores_amx(job, seq, h0, NHK, scores, buf);
    else
#endif
    for (int t0 = 0; t0 < ctx; t0 += 16) {
        const int n = ctx - t0 < 16 ? ctx - t0 : 16;
        sweep_chunk(job, job->k_cache, table, t0, n, h0, NHK, buf);
        for (int j = 0; j < NQ; j++) {
            float *out = scores + (int64_t)j * ctx + t0;
            if (NC == 4) score_query(&chunk, one_block, j / G, q_at + (int64_t)j * D, 4, 0, n, out, scale, DT);
            else score_query(&chunk, one_block, j / G, q_at + (int64_t)j * D, 8, 0, n, out, scale, DT);
        }
    }
    for (int j = 0; j < NQ; j++) inv_sum[j] = softmax_in_place(scores + (int64_t)j * ctx, ctx);
    memset(acc, 0, sizeof(float) * (size_t)NQ * D);
    for (int t0 = 0; t0 < ctx; t0 += 16) {
        const int n = ctx - t0 < 16 ? ctx - t0 : 16;
        sweep_chunk(job, job->v_cache, table, t0, n, h0, NHK, buf);
        for (int hh = 0; hh < NHK; hh++) {
            const float *probs = scores + (int64_t)hh * G * ctx + t0;   /* row stride ctx */
            for (int d0 = 0; d0 < D; d0 += 64)
                for (int gs = 0; gs < G; gs += 6) {
                    float *am = acc + ((int64_t)(hh * (D / 64) + d0 / 64) * G + gs) * 64;
                    switch (G - gs < 6 ? G - gs : 6) {
                    case 6: weigh_values_part(&chunk, one_block, hh, probs, ctx, n, gs, 6, d0, am, DT); break;
                    case 5: weigh_values_part(&chunk, one_block, hh, probs, ctx, n, gs, 5, d0, am, DT); break;
                    case 4: weigh_values_part(&chunk, one_block, hh, probs, ctx, n, gs, 4, d0, am, DT); break;
                    case 3: weigh_values_part(&chunk, one_block, hh, probs, ctx, n, gs, 3, d0, am, DT); break;
                    case 2: weigh_values_part(&chunk, one_block, hh, probs, ctx, n, gs, 2, d0, am, DT); break;
                    default: weigh_values_part(&chunk, one_block, hh, probs, ctx, n, gs, 1, d0, am, DT); break;
                    }
                }
        }
    }
    const int64_t out_at = token * H * D;
    for (int hh = 0; hh < NHK; hh++)
        for (int d0 = 0; d0 < D; d0 += 64)
            for (int gs = 0; gs < G; gs += 6) {
                const float *am = acc + ((int64_t)(hh * (D / 64) + d0 / 64) * G + gs) * 64;
                for (int g = 0; g < (G - gs < 6 ? G - gs : 6); g++) {
                    const __m512 inv = _mm512_set1_ps(inv_sum[hh * G + gs + g]);
                    const int64_t at = out_at + (int64_t)((h0 + hh) * G + gs + g) * D + d0;
                    for (int c = 0; c < 4; c++)
                        store16(job->out, at + c * 16, _mm512_mul_ps(_mm512_loadu_ps(am + (g * 4 + c) * 16), inv), DT, 0xffff);
                }
            }
}

/* bfloat16 caches only: with float32 ones (twice the bytes) the copy cost more than the order saved
 * (24 rows x ~270 tokens: 17.6 against 16.9 ms; bfloat16 11.2 against 12.3) */
static void run_row_avx512(const job_t *job, int seq, int h0, int h1, float *scores, float *acc, void *buf) {
    run_row_avx512_dt(job, seq, h0, h1, scores, acc, buf, 1);
}
#endif
#endif

#define TILE_ROWS 16        /* prefill rows of one sequence per work item (head_dim 64) */
#define TILE_MAX_GROUP 64   /* query heads a KV head, at most, for tiles (a tile's queries: inv_sum below) */

#if defined(__AVX512F__) || defined(GENQ_AVX2)
/* The parts of a tile (run_tile_avx512, run_tile_avx2; head_dim 64) that do not depend on the vector
 * width. */
#if defined(__AVX512F__)
#define TILE_SOFTMAX softmax_in_place
#else
#define TILE_SOFTMAX softmax_in_place8
#endif

/* qs[j * 64 ..] <- the tile's query j (row s0 + j / G, query head h * G + j % G) times the scale */
static inline void tile_queries(const job_t *job, int s0, int NQ, int h, float *qs) {
    const int G = job->num_heads / job->num_kv_heads;
    for (int j = 0; j < NQ; j++) {
        float *q = qs + j * 64;
        load_row(job->q, job->rows[s0 + j / G] * job->q_stride + ((int64_t)h * G + j % G) * 64, 64, job->dtype, q);
        for (int d = 0; d < 64; d++) q[d] *= job->scale;
    }
}

/* rows_at[o] <- where token t0 + o's row of KV head h starts in a cache, o < n */
static inline void chunk_rows(const job_t *job, const int32_t *table, int t0, int n, int h, int64_t *rows_at) {
    const int BS = job->block_size, KVH = job->num_kv_heads;
    for (int o = 0, blk = t0 / BS, off = t0 % BS; o < n; o++) {
        rows_at[o] = (((int64_t)table[blk] * BS + off) * KVH + h) * 64;
        if (++off == BS) { off = 0; blk++; }
    }
}

/* exact softmax in float32 of each of the NQ queries' scores over its own context (the first
 * seq_lens[s0 + j / G] of the tile's len); zero past it. inv_sum[j] <- 1 / the sum. */
static inline void tile_softmax(const job_t *job, int s0, int NQ, int len, float *scores, float *inv_sum) {
    const int G = job->num_heads / job->num_kv_heads;
    for (int j = 0; j < NQ; j++) {
        float *row = scores + (int64_t)j * len;
        const int own = job->seq_lens[s0 + j / G];
        inv_sum[j] = TILE_SOFTMAX(row, own);
        for (int t = own; t < len; t++) row[t] = 0.0f;
    }
}

/* vt[(i * len + t) * 64 ..] <- the V row of KV head h0 + i of token t < len, i < nh, as float32
 * (a token's nh heads are one contiguous run of the cache: read together) */
static inline void tile_values(const job_t *job, const int32_t *table, int len, int h0, int nh, float *vt) {
    const int BS = job->block_size, KVH = job->num_kv_heads;
    for (int64_t t = 0, blk = 0, off = 0; t < len; t++) {
        const int64_t at = (((int64_t)table[blk] * BS + off) * KVH + h0) * 64;
        for (int i = 0; i < nh; i++) load_row(job->v_cache, at + i * 64, 64, job->dtype, vt + ((int64_t)i * len + t) * 64);
        if (++off == BS) { off = 0; blk++; }
    }
}
#endif

#if defined(__AVX512F__)
/* r[i] <- column i of the 16 x 16 matrix of 32-bit words whose rows are r[0..15]. */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    /* u[4g + c], 128-bit lane L: column 4L + c of rows 4g .. 4g + 3 */
    for (int g = 0; g < 16; g += 4) {
        u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
        u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
        u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
        u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
    }
    for (int c = 0; c < 4; c++) {   /* gather lane L of u[c], u[4 + c], u[8 + c], u[12 + c] into column 4L + c */
        const __m512i a0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), a1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xee);
        const __m512i a2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
        const __m512i a3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xee);
        r[c] = _mm512_shuffle_i32x4(a0, a2, 0x88);
        r[4 + c] = _mm512_shuffle_i32x4(a0, a2, 0xdd);
        r[8 + c] = _mm512_shuffle_i32x4(a1, a3, 0x88);
        r[12 + c] = _mm512_shuffle_i32x4(a1, a3, 0xdd);
    }
}


/* scores[j * ld + t] for tokens t < n of a 16-token chunk, of NJ queries (q: rows D = 64 apart,
 * scaled) against the chunk's K rows transposed (kt[d * 16 + t]): one multiply-add per query and
 * dimension covers 16 tokens, with no horizontal sums */
static inline __attribute__((always_inline)) void score_chunk(const float *q, const float *kt, float *scores,
                                                                int64_t ld, const int NJ, int n) {
    __m512 acc[6];
    for (int j = 0; j < NJ; j++) acc[j] = _mm512_setzero_ps();
    for (int d = 0; d < 64; d++) {
        const __m512 kv = _mm512_loadu_ps(kt + d * 16);
        for (int j = 0; j < NJ; j++) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(q[j * 64 + d]), kv, acc[j]);
    }
    for (int j = 0; j < NJ; j++) _mm512_mask_storeu_ps(scores + j * ld, tail_mask(n), acc[j]);
}

/* out rows of NJ queries (j0 ..) of a tile: the probability-weighted sum of the V rows of KV head h
 * gathered as float32 into vt (row t at vt + 64 t) over tokens [0, len) (a query's probabilities
 * are zero past its own length), 64 dims in registers */
static inline __attribute__((always_inline)) void weigh_tile(const job_t *job, int h, int s0, const float *vt,
                                                               const float *probs, int len, const float *inv_sum,
                                                               int j0, const int NJ) {
    const int H = job->num_heads, G = H / job->num_kv_heads;
    __m512 acc[6][4];
    for (int j = 0; j < NJ; j++)
        for (int c = 0; c < 4; c++) acc[j][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < len; t++) {
        __m512 vv[4];
        for (int c = 0; c < 4; c++) vv[c] = _mm512_loadu_ps(vt + t * 64 + c * 16);
        for (int j = 0; j < NJ; j++) {
            const __m512 p = _mm512_set1_ps(probs[(int64_t)(j0 + j) * len + t]);
            for (int c = 0; c < 4; c++) acc[j][c] = _mm512_fmadd_ps(p, vv[c], acc[j][c]);
        }
    }
    for (int j = 0; j < NJ; j++) {
        const int r = (j0 + j) / G, g = (j0 + j) % G;
        const __m512 inv = _mm512_set1_ps(inv_sum[j0 + j]);
        const int64_t at = (job->rows[s0 + r] * H + (int64_t)h * G + g) * 64;
        for (int c = 0; c < 4; c++) store16(job->out, at + c * 16, _mm512_mul_ps(acc[j][c], inv), job->dtype, 0xffff);
    }
}

/* scores[j * len + t] of a tile's NQ queries (scaled, as float32 in qs) against KV head h's K rows,
 * t < len: each 16-token chunk of K read once and transposed (16 tokens a vector), one broadcast
 * multiply-add per query and dimension for 16 tokens. Scratch: qs [NQ][64], kt [64][16]. */
static inline void tile_scores_avx512(const job_t *job, int s0, int NQ, int h, int len, const int32_t *table,
                                      float *scores, float *qs, float *kt) {
    tile_queries(job, s0, NQ, h, qs);
    for (int t0 = 0; t0 < len; t0 += 16) {
        const int n = len - t0 < 16 ? len - t0 : 16;
        int64_t rows_at[16];   /* the chunk's K rows of head h */
        chunk_rows(job, table, t0, n, h, rows_at);
        for (int c = 0; c < 4; c++) {
            __m512i r[16];
            for (int o = 0; o < 16; o++) {
                if (o < n) {
                    r[o] = _mm512_castps_si512(load16(job->k_cache, rows_at[o] + c * 16, job->dtype, 0xffff));
                } else {
                    r[o] = _mm512_setzero_si512();
                }
            }
            transpose16(r);
            for (int d = 0; d < 16; d++) _mm512_storeu_si512(kt + (c * 16 + d) * 16, r[d]);
        }
        for (int j0 = 0; j0 < NQ; j0 += 6) {
            float *sj = scores + (int64_t)j0 * len + t0;
            switch (NQ - j0 < 6 ? NQ - j0 : 6) {
            case 6: score_chunk(qs + j0 * 64, kt, sj, len, 6, n); break;
            case 5: score_chunk(qs + j0 * 64, kt, sj, len, 5, n); break;
            case 4: score_chunk(qs + j0 * 64, kt, sj, len, 4, n); break;
            case 3: score_chunk(qs + j0 * 64, kt, sj, len, 3, n); break;
            case 2: score_chunk(qs + j0 * 64, kt, sj, len, 2, n); break;
            default: score_chunk(qs + j0 * 64, kt, sj, len, 1, n); break;
            }
        }
    }
}

/* R (2 .. TILE_ROWS) consecutive rows of one prefill chunk (row s0 + r: token rows[s0] + r over the
 * first seq_lens[s0] + r cached tokens), KV heads [h0, h1), head_dim 64: the attention of all R * G
 * queries of a KV head at once. Each 16-token chunk of K is read once and transposed (16 tokens a
 * vector), so the scores take one multiply-add per query and dimension for 16 tokens, against a
 * dot product and its share of an add tree per token in run_item_avx512; V is gathered once as
 * float32 and weighed for six queries at a time. The same float32 arithmetic in another order
 * (scores summed over dimensions in turn). Scratch: scores [R*G][len], qs [R*G][64], kt [64][16],
 * vt [len][64]. */
static void run_tile_avx512(const job_t *job, int s0, int R, int h0, int h1, float *scores, float *qs, float *kt,
                            float *vt) {
    const int G = job->num_heads / job->num_kv_heads, NQ = R * G;
    const int len = job->seq_lens[s0 + R - 1];   /* the longest row's context: every row's is a prefix */
    const int32_t *table = job->block_tables + (int64_t)s0 * job->table_stride;
    float inv_sum[TILE_ROWS * TILE_MAX_GROUP];   /* R * G: the caller tiles only where G <= TILE_MAX_GROUP */
    for (int h = h0; h < h1; h++) {
#if GENQ_TILE_AMX
        if (job->dtype == 1 && NQ <= TILE_AMX_MAX_QUERIES && amx_ready())
            tile_scores_amx(job, s0, NQ, h, len, table, scores);
        else
#endif
            tile_scores_avx512(job, s0, NQ, h, len, table, scores, qs, kt);
        tile_softmax(job, s0, NQ, len, scores, inv_sum);
        tile_values(job, table, len, h, 1, vt);
        for (int j0 = 0; j0 < NQ; j0 += 6) {
            switch (NQ - j0 < 6 ? NQ - j0 : 6) {
            case 6: weigh_tile(job, h, s0, vt, scores, len, inv_sum, j0, 6); break;
            case 5: weigh_tile(job, h, s0, vt, scores, len, inv_sum, j0, 5); break;
            case 4: weigh_tile(job, h, s0, vt, scores, len, inv_sum, j0, 4); break;
            case 3: weigh_tile(job, h, s0, vt, scores, len, inv_sum, j0, 3); break;
            case 2: weigh_tile(job, h, s0, vt, scores, len, inv_sum, j0, 2); break;
            default: weigh_tile(job, h, s0, vt, scores, len, inv_sum, j0, 1); break;
            }
        }
    }
}
#endif

#if defined(GENQ_AVX2)
/* run_tile_avx512's arithmetic on 8-lane vectors (head_dim 64), for any R from 1 (a decode row) to
 * TILE_ROWS: K in 8-token chunks transposed to kt[d * 8 + t], so a score takes one multiply-add per
 * query and dimension for 8 tokens; V gathered once as float32 into vt and weighed for three queries
 * at a time, 32 dims in registers (12 accumulators of the 16 registers). */
static inline __attribute__((always_inline)) void score_chunk8(const float *q, const float *kt, float *scores,
                                                                 int64_t ld, const int NJ, int n) {
    __m256 acc[6];
    for (int j = 0; j < NJ; j++) acc[j] = _mm256_setzero_ps();
    for (int d = 0; d < 64; d++) {
        __m256 kv = _mm256_loadu_ps(kt + d * 8);
        PIN8(kv);
        for (int j = 0; j < NJ; j++) acc[j] = _mm256_fmadd_ps(_mm256_broadcast_ss(q + j * 64 + d), kv, acc[j]);
    }
    if (n == 8) {
        for (int j = 0; j < NJ; j++) _mm256_storeu_ps(scores + j * ld, acc[j]);
    } else {
        const __m256i mask = mask8(n);
        for (int j = 0; j < NJ; j++) _mm256_maskstore_ps(scores + j * ld, mask, acc[j]);
    }
}

static inline __attribute__((always_inline)) void weigh_tile8(const job_t *job, int h, int s0, const float *vt,
                                                                const float *probs, int len, const float *inv_sum,
                                                                int j0, const int NJ, int d0) {
    const int H = job->num_heads, G = H / job->num_kv_heads;
    __m256 acc[3][4];
    for (int j = 0; j < NJ; j++)
        for (int c = 0; c < 4; c++) acc[j][c] = _mm256_setzero_ps();
    for (int64_t t = 0; t < len; t++) {   /* 12 accumulators, 3 weights, one V vector at a time */
        __m256 p[3];
        for (int j = 0; j < NJ; j++) {
            p[j] = _mm256_broadcast_ss(probs + (int64_t)(j0 + j) * len + t);
            PIN8(p[j]);
        }
        for (int c = 0; c < 4; c++) {
            __m256 vv = _mm256_loadu_ps(vt + t * 64 + d0 + c * 8);
            PIN8(vv);
            for (int j = 0; j < NJ; j++) acc[j][c] = _mm256_fmadd_ps(p[j], vv, acc[j][c]);
        }
    }
    /* unrolled, so that the accumulators are only ever named by constants: GCC 12 otherwise keeps
     * the array in memory as well and stores all 12 of them every token */
#pragma GCC unroll 3
    for (int j = 0; j < NJ; j++) {
        const int r = (j0 + j) / G, g = (j0 + j) % G;
        const __m256 inv = _mm256_set1_ps(inv_sum[j0 + j]);
        const int64_t at = (job->rows[s0 + r] * H + (int64_t)h * G + g) * 64 + d0;
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) store8(job->out, at + c * 8, _mm256_mul_ps(acc[j][c], inv), job->dtype);
    }
}

/* Every query of a tile against V (weigh_tile8, three queries by 32 dims at a time). Not inlined into
 * run_tile_avx2, where vectors that function keeps live leave too few registers and GCC 12 spills
 * one of the 12 accumulators (a load and a store every token). */
static __attribute__((noinline)) void weigh_tiles8(const job_t *job, int h, int s0, const float *vt,
                                                   const float *probs, int len, const float *inv_sum, int NQ) {
    for (int d0 = 0; d0 < 64; d0 += 32)
        for (int j0 = 0; j0 < NQ; j0 += 3) {
            switch (NQ - j0 < 3 ? NQ - j0 : 3) {
            case 3: weigh_tile8(job, h, s0, vt, probs, len, inv_sum, j0, 3, d0); break;
            case 2: weigh_tile8(job, h, s0, vt, probs, len, inv_sum, j0, 2, d0); break;
            default: weigh_tile8(job, h, s0, vt, probs, len, inv_sum, j0, 1, d0); break;
            }
        }
}

/* kt[d * 8 + o] <- dimension d of the K row at k_cache[rows_at[o] + off], o < n (zero beyond) */
static inline void chunk_keys8(const job_t *job, const int64_t *rows_at, int n, int64_t off, float *kt) {
    for (int c = 0; c < 8; c++) {
        __m256 r[8];
        for (int o = 0; o < 8; o++) r[o] = o < n ? load8(job->k_cache, rows_at[o] + off + c * 8, job->dtype) : _mm256_setzero_ps();
        transpose8(r);
        for (int d = 0; d < 8; d++) _mm256_storeu_ps(kt + (c * 8 + d) * 8, r[d]);
    }
}

/* scores[j * len + o] <- query j (qs[j * 64 ..]) . the chunk's token o, j < NQ, six queries at a time */
static inline void chunk_scores8(const float *qs, const float *kt, float *scores, int len, int NQ, int n) {
    for (int j0 = 0; j0 < NQ; j0 += 6) {
        float *sj = scores + (int64_t)j0 * len;
        switch (NQ - j0 < 6 ? NQ - j0 : 6) {
        case 6: score_chunk8(qs + j0 * 64, kt, sj, len, 6, n); break;
        case 5: score_chunk8(qs + j0 * 64, kt, sj, len, 5, n); break;
        case 4: score_chunk8(qs + j0 * 64, kt, sj, len, 4, n); break;
        case 3: score_chunk8(qs + j0 * 64, kt, sj, len, 3, n); break;
        case 2: score_chunk8(qs + j0 * 64, kt, sj, len, 2, n); break;
        default: score_chunk8(qs + j0 * 64, kt, sj, len, 1, n); break;
        }
    }
}

/* R (1 .. TILE_ROWS) consecutive rows of one prefill chunk, or one decode row: as run_tile_avx512.
 * Scratch: scores [R*G][len], qs [R*G][64], kt [64][8], vt [len][64]. */
static void run_tile_avx2(const job_t *job, int s0, int R, int h0, int h1, float *scores, float *qs, float *kt,
                          float *vt) {
    const int G = job->num_heads / job->num_kv_heads, NQ = R * G;
    const int len = job->seq_lens[s0 + R - 1];
    const int32_t *table = job->block_tables + (int64_t)s0 * job->table_stride;
    float inv_sum[TILE_ROWS * TILE_MAX_GROUP];
    for (int h = h0; h < h1; h++) {
        tile_queries(job, s0, NQ, h, qs);
        for (int t0 = 0; t0 < len; t0 += 8) {
            const int n = len - t0 < 8 ? len - t0 : 8;
            int64_t rows_at[8];
            chunk_rows(job, table, t0, n, h, rows_at);
            chunk_keys8(job, rows_at, n, 0, kt);
            chunk_scores8(qs, kt, scores + t0, len, NQ, n);
        }
        tile_softmax(job, s0, NQ, len, scores, inv_sum);
        tile_values(job, table, len, h, 1, vt);
        weigh_tiles8(job, h, s0, vt, scores, len, inv_sum, NQ);
    }
}

#ifndef GENQ_ROW_HEADS_TOGETHER
#define GENQ_ROW_HEADS_TOGETHER 1
#endif
#if GENQ_ROW_HEADS_TOGETHER
/* One decode row (a tile of one, run_tile_avx2's arithmetic in the same order) over KV heads
 * [h0, h1) read together: each 8-token chunk's K rows of all those heads (one contiguous run a
 * token) before the next chunk, then the V rows of all of them token by token into vt, where
 * run_tile_avx2 reads the whole context once per head, a strided quarter or third of each row at a
 * time. Same sums, same order, so the same bits. Scratch: scores [(h1-h0)*G][len], qs [(h1-h0)*G][64],
 * kt [64][8], vt [h1-h0][len][64]. */
static void run_row_avx2(const job_t *job, int s0, int h0, int h1, float *scores, float *qs, float *kt, float *vt) {
    const int G = job->num_heads / job->num_kv_heads, NHK = h1 - h0;
    const int len = job->seq_lens[s0];
    const int32_t *table = job->block_tables + (int64_t)s0 * job->table_stride;
    float inv_sum[4096];   /* NHK * G <= num_heads <= 4096, checked by the caller */
    for (int h = h0; h < h1; h++) tile_queries(job, s0, G, h, qs + (int64_t)(h - h0) * G * 64);
    for (int t0 = 0; t0 < len; t0 += 8) {
        const int n = len - t0 < 8 ? len - t0 : 8;
        int64_t rows_at[8];
        chunk_rows(job, table, t0, n, h0, rows_at);   /* head h's row: + (h - h0) * 64 */
        for (int h = 0; h < NHK; h++) {
            chunk_keys8(job, rows_at, n, (int64_t)h * 64, kt);
            chunk_scores8(qs + (int64_t)h * G * 64, kt, scores + (int64_t)h * G * len + t0, len, G, n);
        }
    }
    for (int h = 0; h < NHK; h++) tile_softmax(job, s0, G, len, scores + (int64_t)h * G * len, inv_sum + h * G);
    tile_values(job, table, len, h0, NHK, vt);
    for (int h = 0; h < NHK; h++)
        weigh_tiles8(job, h0 + h, s0, vt + (int64_t)h * len * 64, scores + (int64_t)h * G * len, len, inv_sum + h * G, G);
}
#endif
#endif

/* qsort order of work items (length, row, first head, end head, rows): longest first, then the
 * later row first (within a prefill chunk, whose items share its longest row's length: the tile of
 * the longest contexts first), then by head */
static int by_length_descending(const void *a, const void *b) {
    const int32_t *x = (const int32_t *)a, *y = (const int32_t *)b;
    if (x[0] != y[0]) return x[0] > y[0] ? -1 : 1;
    if (x[1] != y[1]) return x[1] > y[1] ? -1 : 1;
    return x[2] < y[2] ? -1 : (x[2] > y[2]);
}

/* Returns 0 on success. */
int genq_paged_decode(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache, void *out, int dtype,
                      const int32_t *block_tables, int64_t table_stride, const int32_t *seq_lens,
                      const int64_t *rows, int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                      int block_size, float scale, int num_threads) {
    if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0 || num_heads > 4096) return 2;
    const int D = head_dim;
    if (num_threads < 1) num_threads = 1;
    int num_decode = 0, max_ctx = 1;
    for (int s = 0; s < num_seqs; s++) {
        if (rows[s] < 0) continue;
        num_decode++;
        max_ctx = seq_lens[s] > max_ctx ? seq_lens[s] : max_ctx;
    }
    int32_t *run_len = malloc(sizeof(int32_t) * ((size_t)num_seqs + 1));
    int32_t *groups = malloc(sizeof(int32_t) * 3 * ((size_t)num_decode + 1));   /* (length, row, rows) */
    if (run_len == NULL || groups == NULL) {
        free(run_len);
        free(groups);
        return 1;
    }
    /* Longest contexts first, so that the dynamic schedule ends with the short items; but the rows of
     * one prefill chunk (consecutive rows of q over contexts one token longer each: the same
     * sequence) stay together in their own order, sorted as one item by the chunk's longest row, so
     * that each row finds the context its neighbour just read in cache (prefill of 10 prompts of
     * ~200 tokens on a 2-core Zen 4: 8-9% faster than every row sorted by its own length). With
     * AVX-512 or AVX2 and head_dim 64, up to TILE_ROWS rows of a chunk are one item (run_tile_avx512,
     * run_tile_avx2), which reads every row's context through its first row's block table: rows are
     * tiled only where their tables agree on the blocks they read (decode rows of different sequences
     * can chain by chance).
     * run_len[s]: the longest context of the chain of rows s belongs to. */
    const int G = num_heads / num_kv_heads;
#if defined(__AVX512F__) || defined(GENQ_AVX2)
    const int tile_rows = D == 64 && G <= TILE_MAX_GROUP ? TILE_ROWS : 1;
#else
    const int tile_rows = 1;
#endif
#define CHAINED(s) ((s) + 1 < num_seqs && rows[s] >= 0 && rows[(s) + 1] == rows[s] + 1 \
                    && seq_lens[(s) + 1] == seq_lens[s] + 1)   /* row s + 1 continues row s's chunk */
    for (int s = num_seqs - 1; s >= 0; s--) run_len[s] = CHAINED(s) ? run_len[s + 1] : seq_lens[s];
    int num_groups = 0, tile_ctx = 0;   /* tile_ctx: the longest context of a tile (0: no tiles) */
    for (int s = 0; s < num_seqs;) {
        if (rows[s] < 0) {
            s++;
            continue;
        }
        int count = 1;
        while (count < tile_rows && CHAINED(s + count - 1)
               && memcmp(block_tables + (int64_t)s * table_stride, block_tables + (int64_t)(s + count) * table_stride,
                         sizeof(int32_t) * (size_t)((seq_lens[s + count] + block_size - 1) / block_size)) == 0)
            count++;
        if (count > 1 && seq_lens[s + count - 1] > tile_ctx) tile_ctx = seq_lens[s + count - 1];
        int32_t *g = groups + 3 * num_groups++;
        g[0] = run_len[s];
        g[1] = s;
        g[2] = count;
        s += count;
    }
#undef CHAINED
    free(run_len);
#if defined(GENQ_AVX2)
    if (tile_rows > 1) tile_ctx = max_ctx;   /* with AVX2 a lone row is a tile of one (run_tile_avx2) */
#endif
    /* Whole rows or tiles (each token's K/V row read in one run) when there are enough of them to
     * keep every thread busy; else one item per KV head. */
    const int span = num_groups >= 4 * num_threads ? num_kv_heads : 1;
    const int per_seq = num_kv_heads / span;
    int num_items = 0;
    int32_t *sorted = malloc(sizeof(int32_t) * 5 * ((size_t)num_groups * per_seq + 1));
    int32_t *items = malloc(sizeof(int32_t) * 4 * ((size_t)num_groups * per_seq + 1));
    if (sorted == NULL || items == NULL) {
        free(groups);
        free(sorted);
        free(items);
        return 1;
    }
    for (int i = 0; i < num_groups; i++)
        for (int h = 0; h < num_kv_heads; h += span) {
            int32_t *it = sorted + 5 * num_items++;
            it[0] = groups[3 * i];
            it[1] = groups[3 * i + 1];
            it[2] = h;
            it[3] = h + span;
            it[4] = groups[3 * i + 2];
        }
    free(groups);
    qsort(sorted, (size_t)num_items, 5 * sizeof(int32_t), by_length_descending);
    for (int i = 0; i < num_items; i++) memcpy(items + 4 * i, sorted + 5 * i + 1, 4 * sizeof(int32_t));
    free(sorted);
    const job_t job = {q, k_cache, v_cache, q_stride, out, block_tables, seq_lens, rows, table_stride, num_heads,
                       num_kv_heads, head_dim, block_size, dtype, scale};
    const size_t NH = (size_t)span * G, TQ = tile_ctx > 0 ? (size_t)tile_rows * G : 0;
    const size_t SR = NH > TQ ? NH : TQ;   /* rows of scores: an item's query heads, or a tile's queries */
    /* kt, vt (vt: every KV head's values for run_row_avx2) */
#if defined(GENQ_AVX2) && GENQ_ROW_HEADS_TOGETHER
    const size_t vt_heads = (size_t)num_kv_heads;
#else
    const size_t vt_heads = 1;
#endif
    const size_t tile_scratch = tile_ctx > 0 ? 64 * 16 + (size_t)tile_ctx * 64 * vt_heads : 0;
    int failed = 0;
    if (num_threads > num_items) num_threads = num_items > 0 ? num_items : 1;
    /* Built with -fopenmp this runs on the process's OpenMP pool: PyTorch's own (its libgomp is
     * already loaded, so ours resolves to it), whose threads are awake after the step's matmuls. */
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        /* + a 16-token chunk of every KV head (run_row_avx512's copy), 64-byte aligned */
        const size_t sweep_floats = (size_t)16 * num_kv_heads * D + 16;
        float *scratch = malloc(sizeof(float) * (SR * max_ctx + 2 * SR * D + (size_t)num_kv_heads * D + tile_scratch
                                                 + sweep_floats));
        if (scratch == NULL) {
            failed = 1;
        } else {
            float *qbuf = scratch + SR * max_ctx, *acc = qbuf + SR * D, *row = acc + SR * D;
#if defined(__AVX512F__) || defined(GENQ_AVX2)
            float *kt = tile_ctx > 0 ? row + (size_t)num_kv_heads * D : NULL, *vt = tile_ctx > 0 ? kt + 64 * 16 : NULL;
#endif
#if defined(__AVX512F__) && GENQ_ROW_SWEEP
            float *sweep = (float *)(((uintptr_t)(row + (size_t)num_kv_heads * D + tile_scratch) + 63) & ~(uintptr_t)63);
#endif
#pragma omp for schedule(dynamic, 1)
            for (int i = 0; i < num_items; i++) {
                const int32_t *it = items + 4 * i;
#if defined(__AVX512F__)
                if (it[3] > 1)
                    run_tile_avx512(&job, it[0], it[3], it[1], it[2], scratch, qbuf, kt, vt);
#if GENQ_ROW_SWEEP
                else if (D % 64 == 0 && D <= 128 && it[2] - it[1] > 1 && dtype == 1)
                    run_row_avx512(&job, it[0], it[1], it[2], scratch, acc, sweep);
#endif
                else if (D % 64 == 0 && D <= 128)
                    run_item_avx512(&job, it[0], it[1], it[2], scratch);
                else
#elif defined(GENQ_AVX2)
#if GENQ_ROW_HEADS_TOGETHER
                if (tile_rows > 1 && it[3] == 1)
                    run_row_avx2(&job, it[0], it[1], it[2], scratch, qbuf, kt, vt);
                else
#endif
                if (tile_rows > 1)
                    run_tile_avx2(&job, it[0], it[3], it[1], it[2], scratch, qbuf, kt, vt);
                else
#endif
                    run_item(&job, it[0], it[1], it[2], scratch, qbuf, acc, row);
            }
            free(scratch);
        }
    }
    free(items);
    return failed;
}

/* ---- Elementwise ops of a layer, fused: one pass each instead of PyTorch's several ---------------
 * Same arithmetic as the references in kernels/rms_norm.py and kernels/rotary.py and the model's
 * silu(gate) * up: float32 inside, rounded to the tensor's type where the reference rounds. */

static inline float load1(const void *base, int64_t i, int dtype) {
    return dtype == 0 ? ((const float *)base)[i] : bf16_to_f32(((const uint16_t *)base)[i]);
}

static inline float round_to(float v, int dtype) {
    return dtype == 0 ? v : bf16_to_f32(f32_to_bf16(v));
}

static inline void store1(void *base, int64_t i, float v, int dtype) {
    if (dtype == 0) ((float *)base)[i] = v;
    else ((uint16_t *)base)[i] = f32_to_bf16(v);
}

/* out = weight * (r / rms(r)), r = x (+ residual, also written to new_residual). Rows contiguous. */
int genq_rms_norm(const void *x, const void *residual, const void *weight, void *out, void *new_residual,
                  int64_t rows, int hidden, float eps, int dtype, int num_threads) {
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        float *r = malloc(sizeof(float) * (size_t)hidden);
        if (r == NULL) {
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < rows; i++) {
                const int64_t at = i * hidden;
#if defined(__AVX512F__)
                {   /* 16 lanes at a time: the same sums of squares, summed in another order */
                    __m512 sq16 = _mm512_setzero_ps();
                    for (int j = 0; j < hidden; j += 16) {
                        const __mmask16 mask = tail_mask(hidden - j);
                        __m512 v = load16(x, at + j, dtype, mask);
                        if (residual != NULL) {
                            v = round16(_mm512_add_ps(v, load16(residual, at + j, dtype, mask)), dtype);
                            store16(new_residual, at + j, v, dtype, mask);
                        }
                        _mm512_mask_storeu_ps(r + j, mask, v);
                        sq16 = _mm512_fmadd_ps(v, v, sq16);
                    }
                    const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(sq16) / (float)hidden + eps));
                    for (int j = 0; j < hidden; j += 16) {
                        const __mmask16 mask = tail_mask(hidden - j);
                        const __m512 normed = round16(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, r + j), inv), dtype);
                        store16(out, at + j, _mm512_mul_ps(load16(weight, j, dtype, mask), normed), dtype, mask);
                    }
                    continue;
                }
#elif defined(GENQ_AVX2)
                if (hidden % 8 == 0) {   /* 8 lanes at a time */
                    __m256 sq8 = _mm256_setzero_ps();
                    for (int j = 0; j < hidden; j += 8) {
                        __m256 v = load8(x, at + j, dtype);
                        if (residual != NULL) {
                            v = round8(_mm256_add_ps(v, load8(residual, at + j, dtype)), dtype);
                            store8(new_residual, at + j, v, dtype);
                        }
                        _mm256_storeu_ps(r + j, v);
                        sq8 = _mm256_fmadd_ps(v, v, sq8);
                    }
                    const __m256 inv = _mm256_set1_ps(1.0f / sqrtf(hsum8(sq8) / (float)hidden + eps));
                    for (int j = 0; j < hidden; j += 8) {
                        const __m256 normed = round8(_mm256_mul_ps(_mm256_loadu_ps(r + j), inv), dtype);
                        store8(out, at + j, _mm256_mul_ps(load8(weight, j, dtype), normed), dtype);
                    }
                    continue;
                }
#endif
                float sq = 0.0f;
                for (int j = 0; j < hidden; j++) {
                    float v = load1(x, at + j, dtype);
                    if (residual != NULL) {
                        v = round_to(v + load1(residual, at + j, dtype), dtype);
                        store1(new_residual, at + j, v, dtype);
                    }
                    r[j] = v;
                    sq += v * v;
                }
                const float inv = 1.0f / sqrtf(sq / (float)hidden + eps);
                for (int j = 0; j < hidden; j++)
                    store1(out, at + j, load1(weight, j, dtype) * round_to(r[j] * inv, dtype), dtype);
            }
            free(r);
        }
    }
    return failed;
}

/* out[i, j] = silu(gate_up[i, j]) * gate_up[i, inter + j]; gate_up rows are 2 * inter long. */
int genq_silu_mul(const void *gate_up, void *out, int64_t rows, int inter, int dtype, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t i = 0; i < rows; i++) {
        const int64_t in = i * 2 * (int64_t)inter, at = i * (int64_t)inter;
        int j = 0;
#if defined(__AVX512F__)
        for (; j < inter; j += 16) {
            const __mmask16 mask = tail_mask(inter - j);
            const __m512 g = load16(gate_up, in + j, dtype, mask);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            const __m512 silu = round16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), dtype);
            store16(out, at + j, _mm512_mul_ps(silu, load16(gate_up, in + inter + j, dtype, mask)), dtype, mask);
        }
#elif defined(GENQ_AVX2)
        for (; j + 8 <= inter; j += 8) {
            const __m256 g = load8(gate_up, in + j, dtype);
            const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
            const __m256 silu = round8(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), dtype);
            store8(out, at + j, _mm256_mul_ps(silu, load8(gate_up, in + inter + j, dtype)), dtype);
        }
#endif
        for (; j < inter; j++) {
            const float g = load1(gate_up, in + j, dtype);
            const float s = round_to(g / (1.0f + expf(-g)), dtype);
            store1(out, at + j, s * load1(gate_up, in + inter + j, dtype), dtype);
        }
    }
    return 0;
}

/* In place, rotate-half: for each token t and head h of q (and k), with c|s = cos_sin[pos[t]]:
 * x1' = x1 c - x2 s, x2' = x2 c + x1 s over the two halves. q/k rows may be strided (a slice of
 * the fused qkv projection): row_stride elements between tokens, heads contiguous. */
int genq_rotary(const int64_t *positions, void *q, int64_t q_stride, int q_heads, void *k, int64_t k_stride,
                int k_heads, const float *cos_sin, int64_t max_position, int head_dim, int64_t tokens, int dtype,
                int num_threads) {
    const int half = head_dim / 2;
    for (int64_t t = 0; t < tokens; t++)
        if (positions[t] < 0 || positions[t] >= max_position) return 3;   /* past the table: nothing written */
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos_sin + positions[t] * head_dim, *s = c + half;
        for (int which = 0; which < 2; which++) {
            void *base = which == 0 ? q : k;
            const int heads = which == 0 ? q_heads : k_heads;
            const int64_t row = t * (which == 0 ? q_stride : k_stride);
            for (int h = 0; h < heads; h++) {
                const int64_t at = row + (int64_t)h * head_dim;
                int j = 0;
#if defined(__AVX512F__)
                for (; j + 16 <= half; j += 16) {
                    const __m512 x1 = load16(base, at + j, dtype, 0xffff), x2 = load16(base, at + half + j, dtype, 0xffff);
                    const __m512 cv = _mm512_loadu_ps(c + j), sv = _mm512_loadu_ps(s + j);
                    store16(base, at + j, _mm512_sub_ps(_mm512_mul_ps(x1, cv), _mm512_mul_ps(x2, sv)), dtype, 0xffff);
                    store16(base, at + half + j, _mm512_add_ps(_mm512_mul_ps(x2, cv), _mm512_mul_ps(x1, sv)), dtype, 0xffff);
                }
#elif defined(GENQ_AVX2)
                for (; j + 8 <= half; j += 8) {
                    const __m256 x1 = load8(base, at + j, dtype), x2 = load8(base, at + half + j, dtype);
                    const __m256 cv = _mm256_loadu_ps(c + j), sv = _mm256_loadu_ps(s + j);
                    store8(base, at + j, _mm256_sub_ps(_mm256_mul_ps(x1, cv), _mm256_mul_ps(x2, sv)), dtype);
                    store8(base, at + half + j, _mm256_add_ps(_mm256_mul_ps(x2, cv), _mm256_mul_ps(x1, sv)), dtype);
                }
#endif
                for (; j < half; j++) {
                    const float x1 = load1(base, at + j, dtype), x2 = load1(base, at + half + j, dtype);
                    store1(base, at + j, x1 * c[j] - x2 * s[j], dtype);
                    store1(base, at + half + j, x2 * c[j] + x1 * s[j], dtype);
                }
            }
        }
    }
    return 0;
}

/* ---- Linear layers at decode batch sizes: y = x W^T (+ bias) -----------------------------------
 * With a few to a few dozen rows of x, a layer's matmul is one pass over its weights, and the BLAS
 * that PyTorch calls spends most of its time outside the FMAs (it runs 2-4x slower per row at 4-48
 * rows than at 128 on the machines we measured). Here W stays in nn.Linear's own [N, K] layout: a
 * tile of 4 weight rows is read once from memory and then held in L1 while every row of x takes
 * its dot products with it (register block: up to 6 rows of x by the 4 weight rows, 24 vector
 * accumulators summed along K; the 4 sums of a row of x leave in one 4-float store). Threads split
 * the weight rows. Each output is a K-long dot product summed in vector lanes, so results differ
 * from the BLAS's by rounding only. float32, or bfloat16 (x, W, bias and y; products summed in
 * float32 and rounded once, as the BLAS does: each tile of W is widened into a float32 scratch as it
 * is read, so it crosses the memory bus at half float32's bytes). AVX-512, or AVX2 with FMA (8-lane
 * vectors, 16 registers: blocks of up to 3 rows of x by the 4 weight rows, 12 accumulators);
 * genq_linear_supported() says whether it is here. */

#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__)
#define GENQ_LIN_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define GENQ_LIN_AVX2 1
#endif

/* 1 where bfloat16 goes through vdpbf16ps (AVX512-BF16), 0 where it is widened to float32. */
int genq_linear_native_bf16(void) {
#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

int genq_linear_supported(void) {
#if defined(GENQ_LIN_AVX512) || defined(GENQ_LIN_AVX2)
    return 1;
#else
    return 0;
#endif
}

#if defined(GENQ_LIN_AVX512) || defined(GENQ_LIN_AVX2)
/* Row m of a register block's output from its sums: q = [s0 s1 s2 s3] (NT = 4) or s0 in lane 0
 * (NT = 1); + bias; stored as float32 or rounded once to bfloat16 (BF). */
static inline __attribute__((always_inline)) void store_row_sums(__m128 q, const int NT, const float *bias, void *y,
                                                                  int64_t ldy, int m, const int BF) {
    if (bias != NULL) q = NT == 4 ? _mm_add_ps(q, _mm_loadu_ps(bias)) : _mm_add_ss(q, _mm_load_ss(bias));
    if (NT == 4 && !BF) {
        _mm_storeu_ps((float *)y + m * ldy, q);
        return;
    }
    if (NT == 4) {   /* the four rounded as f32_to_bf16 does, in one register (no trip through memory) */
        const __m128i bits = _mm_castps_si128(q);
        const __m128i odd = _mm_and_si128(_mm_srli_epi32(bits, 16), _mm_set1_epi32(1));
        const __m128i rounded = _mm_srli_epi32(_mm_add_epi32(bits, _mm_add_epi32(odd, _mm_set1_epi32(0x7fff))), 16);
        const __m128i quiet = _mm_or_si128(_mm_srli_epi32(bits, 16), _mm_set1_epi32(0x40));
        const __m128i out = _mm_blendv_epi8(rounded, quiet, _mm_castps_si128(_mm_cmpunord_ps(q, q)));
        _mm_storel_epi64((__m128i *)((uint16_t *)y + m * ldy), _mm_packus_epi32(out, out));
        return;
    }
    float sums[4];
    _mm_storeu_ps(sums, q);
    for (int j = 0; j < NT; j++) {
        if (BF) ((uint16_t *)y)[m * ldy + j] = f32_to_bf16(sums[j]);
        else ((float *)y)[m * ldy + j] = sums[j];
    }
}
#endif

/* How far ahead the linear kernels fetch weight rows, in tiles of 4 rows: far enough that a core
 * keeps enough lines in flight to stream W at the memory's rate. 2-core Zen 4, SmolLM2's 120 matmuls
 * at 1 / 4 / 16 / 24 rows: float32 15.1 / 14.6 / 22.0 / 30.6 ms against 17.3 / 18.7 / 28.7 / 31.8
 * with the next tile fetched into L1 (bfloat16, vdpbf16ps: 7.7 / 8.0 / 13.0 / 17.6 against 10.8 /
 * 12.3 / 15.2 / 18.4); 2 tiles ahead or 16 were slower, into L3 no faster. */
#ifndef LIN_PREFETCH_TILES
#define LIN_PREFETCH_TILES 4
#endif
/* How the float32 tiles are dealt to the threads. With AVX2, guided (each thread takes half the
 * tiles left, down to 4 at a time), so that when the OS runs something else on one core for a while
 * (the API, Redis or a client beside a worker on a 2-core machine) the other thread takes over its
 * share instead of waiting at the end of the matmul; the chunks stay long runs of consecutive tiles,
 * which the prefetch ahead needs (dynamic chunks of 8 or 32 tiles were 5-15% slower at 24 rows).
 * 2-core AVX2 EPYC (Zen 3), SmolLM2's 120 matmuls alternated in one process: level with static
 * (0.95-1.00x) at 1-128 rows on a quiet machine; 0.87-0.91x at 128 rows and 0.99x at 24 beside a
 * process busy 3 ms of every 15. AVX-512 builds keep the static schedule (not measured there). */
#ifndef LIN_SCHEDULE
#if defined(GENQ_LIN_AVX2)
#define LIN_SCHEDULE guided, 4
#else
#define LIN_SCHEDULE static
#endif
#endif
#ifndef LIN_PREFETCH_HINT
#define LIN_PREFETCH_HINT _MM_HINT_T1
#endif

#if defined(GENQ_LIN_AVX512)
/* Keeps a loaded vector in a register: without it GCC folds the load of x into each of the NT
 * multiply-adds that use it (NT loads instead of one), which costs nothing where two 512-bit loads
 * issue per cycle but makes the block load-bound where one does (Zen 4: 28 loads per 24 FMAs,
 * ~170 of oneDNN's ~225 GFLOP/s on SmolLM2's shapes in cache). */
#define PIN_REGISTER(v) __asm__("" : "+v"(v))
#define LIN_ROWS 6   /* rows of x per register block */

/* The epilogue of a register block: y[m, j] = the 16 lanes of acc[m][j] summed (+ bias[j]), as
 * float32 or rounded once to bfloat16 (BF). NT = 4: the four sums of a row at once (per-lane
 * partials, then the four lanes added). */
static inline __attribute__((always_inline)) void store_block_sums(__m512 acc[LIN_ROWS][4], const int MT, const int NT,
                                                                    const float *bias, void *y, int64_t ldy,
                                                                    const int BF) {
    for (int m = 0; m < MT; m++) {
        __m128 q;
        if (NT == 4) {
            const __m512 s = lane_sums4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
            const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
            q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        } else {
            q = _mm_set_ss(_mm512_reduce_add_ps(acc[m][0]));
        }
        store_row_sums(q, NT, bias, y, ldy, m, BF);
    }
}

/* y[m, 0..NT) for MT rows of x (float32, row stride ldx) against NT float32 weight rows (K apart),
 * NT = 4 or 1; y of element type float32 (BF = 0) or bfloat16 (BF = 1); bias: NT floats or NULL.
 * `next`, when not NULL, is prefetched into L2 alongside (weight rows LIN_PREFETCH_TILES tiles
 * ahead), so that memory works while this tile computes: one line of each of the NT rows from `next`
 * on every pf_every elements of k. Each block of a tile takes its share, so the fetch is spread over
 * the tile's whole compute (at 24 rows on a 2-core Zen 4, 32 against 37 ms for SmolLM2's 120 matmuls
 * when the first block fetched it all), and its share is one contiguous range of k (linear_columns
 * points `next` at its start): with every other line to each of two blocks, float32 at 7-12 rows
 * took as long as reading W and computing one after the other (2-core AMX Xeon: 12 rows 28.6 against
 * 21.5 ms, 24 rows 34.9 against 29.7). A prefetch never faults, so the last tiles', past the
 * matrix's end, are harmless. */
static inline __attribute__((always_inline)) void linear_block(const float *x, int64_t ldx, const float *w, int64_t K,
                                                                const float *bias, void *y, int64_t ldy,
                                                                const int MT, const int NT, const int BF,
                                                                const float *next, int64_t pf_every) {
    __m512 acc[LIN_ROWS][4];
    int64_t pk = 0, pf_at = 0;
    const int64_t full = K & ~(int64_t)15;
    const __mmask16 tail = (__mmask16)((1u << (K & 15)) - 1u);
    for (int m = 0; m < MT; m++)
        for (int j = 0; j < NT; j++) acc[m][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < full; k += 16) {
        __m512 wv[4];
        if (next != NULL && k == pk) {
            for (int j = 0; j < NT; j++) _mm_prefetch((const char *)(next + j * K + pf_at), LIN_PREFETCH_HINT);
            pf_at += 16;
            pk += pf_every;
        }
        for (int j = 0; j < NT; j++) wv[j] = _mm512_loadu_ps(w + j * K + k);
        for (int m = 0; m < MT; m++) {
            __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
            PIN_REGISTER(xv);
            for (int j = 0; j < NT; j++) acc[m][j] = _mm512_fmadd_ps(xv, wv[j], acc[m][j]);
        }
    }
    if (tail) {
        __m512 wv[4];
        for (int j = 0; j < NT; j++) wv[j] = _mm512_maskz_loadu_ps(tail, w + j * K + full);
        for (int m = 0; m < MT; m++) {
            const __m512 xv = _mm512_maskz_loadu_ps(tail, x + m * ldx + full);
            for (int j = 0; j < NT; j++) acc[m][j] = _mm512_fmadd_ps(xv, wv[j], acc[m][j]);
        }
    }
    store_block_sums(acc, MT, NT, bias, y, ldy, BF);
}

#endif

#if defined(GENQ_LIN_AVX2)
#define LIN_ROWS 3   /* rows of x per register block: 12 accumulators + 3 x + 1 w = the 16 registers */

/* the epilogue of a register block, as the AVX-512 one: [sum a, sum b, sum c, sum d] of four 8-lane
 * vectors by horizontal adds (NT = 4), or one vector's sum (NT = 1) */
static inline __m128 sums4_8(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

static inline __attribute__((always_inline)) void store_block_sums(__m256 acc[LIN_ROWS][4], const int MT, const int NT,
                                                                    const float *bias, void *y, int64_t ldy,
                                                                    const int BF) {
    for (int m = 0; m < MT; m++) {
        const __m256 zero = _mm256_setzero_ps();
        store_row_sums(NT == 4 ? sums4_8(acc[m][0], acc[m][1], acc[m][2], acc[m][3]) : sums4_8(acc[m][0], zero, zero, zero),
                       NT, bias, y, ldy, m, BF);
    }
}

/* linear_block with 8-lane vectors: each k step loads the MT rows of x once, then each weight row
 * in turn (one register) into its MT accumulators. The tail (K % 8) by masked loads. */
static inline __attribute__((always_inline)) void linear_block(const float *x, int64_t ldx, const float *w, int64_t K,
                                                                const float *bias, void *y, int64_t ldy,
                                                                const int MT, const int NT, const int BF,
                                                                const float *next, int64_t pf_every) {
    __m256 acc[LIN_ROWS][4];
    int64_t pk = 0, pf_at = 0;
    const int64_t full = K & ~(int64_t)7;
    for (int m = 0; m < MT; m++)
        for (int j = 0; j < NT; j++) acc[m][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < full; k += 8) {
        __m256 xv[LIN_ROWS];
        if (next != NULL && k == pk) {
            for (int j = 0; j < NT; j++) _mm_prefetch((const char *)(next + j * K + pf_at), LIN_PREFETCH_HINT);
            pf_at += 16;
            pk += pf_every;
        }
        for (int m = 0; m < MT; m++) {
            xv[m] = _mm256_loadu_ps(x + m * ldx + k);
            PIN8(xv[m]);
        }
        for (int j = 0; j < NT; j++) {
            __m256 wv = _mm256_loadu_ps(w + j * K + k);
            PIN8(wv);
            for (int m = 0; m < MT; m++) acc[m][j] = _mm256_fmadd_ps(xv[m], wv, acc[m][j]);
        }
    }
    if (K & 7) {
        const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(K & 7)), lanes);
        __m256 xv[LIN_ROWS];
        for (int m = 0; m < MT; m++) xv[m] = _mm256_maskload_ps(x + m * ldx + full, tail);
        for (int j = 0; j < NT; j++) {
            const __m256 wv = _mm256_maskload_ps(w + j * K + full, tail);
            for (int m = 0; m < MT; m++) acc[m][j] = _mm256_fmadd_ps(xv[m], wv, acc[m][j]);
        }
    }
    store_block_sums(acc, MT, NT, bias, y, ldy, BF);
}
#endif

#if defined(GENQ_LIN_AVX512) || defined(GENQ_LIN_AVX2)
/* Every row of x against NT weight rows (element type float32, or bfloat16 when BF: those are
 * widened into `wide`, NT * K floats, first), in register blocks of at most LIN_ROWS rows of
 * balanced sizes (32 rows: 6,6,5,5,5,5, not 6,6,6,6,6,2). */
static void linear_columns(const float *x, int64_t ldx, const void *w, int64_t K, const void *bias, void *y,
                           int64_t ldy, int M, int NT, int BF, float *wide) {
    const int blocks = (M + LIN_ROWS - 1) / LIN_ROWS;
    const size_t esize = BF ? 2 : 4;
    const float *wf = (const float *)w, *bf = (const float *)bias;
    float bias_wide[4];
    if (BF) {
        load_row(w, 0, (int)(NT * K), 1, wide);
        wf = wide;
        if (bias != NULL) {
            for (int j = 0; j < NT; j++) bias_wide[j] = bf16_to_f32(((const uint16_t *)bias)[j]);
            bf = bias_wide;
        }
    }
    for (int b = 0, m = 0; b < blocks; b++) {
        const int rows = (M - m + (blocks - b) - 1) / (blocks - b);
        const float *xm = x + m * ldx;
        void *ym = (char *)y + (size_t)m * ldy * esize;
        /* a later tile's rows are fetched while this one computes, shared out among the blocks
         * (block b takes the b-th contiguous range of k, a line every blocks k-steps), so that
         * memory streams at an even rate through the whole tile (float32 only: a bfloat16 tile
         * was widened into `wide` already) */
        const int64_t range = ((K + 15) / 16 + blocks - 1) / blocks * 16;   /* whole lines of floats */
        const float *ahead = !BF ? wf + LIN_PREFETCH_TILES * NT * K + b * range : NULL;
        const int64_t every = (int64_t)blocks * 16;
#define LIN_CASE(R) case R: {                                                                   \
            if (NT == 4 && BF) linear_block(xm, ldx, wf, K, bf, ym, ldy, R, 4, 1, ahead, every);      \
            else if (NT == 4) linear_block(xm, ldx, wf, K, bf, ym, ldy, R, 4, 0, ahead, every);       \
            else if (BF) linear_block(xm, ldx, wf, K, bf, ym, ldy, R, 1, 1, NULL, 0);                \
            else linear_block(xm, ldx, wf, K, bf, ym, ldy, R, 1, 0, NULL, 0);                        \
        } break;
        switch (rows) {
#if LIN_ROWS == 6
        LIN_CASE(6) LIN_CASE(5) LIN_CASE(4)
#endif
        LIN_CASE(3) LIN_CASE(2) LIN_CASE(1)
        }
#undef LIN_CASE
        m += rows;
    }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
/* bfloat16 on a CPU with AVX512-BF16: x and W stay bfloat16 and vdpbf16ps takes 32 of their
 * products per instruction into 16 float32 lanes (lane i: x[2i] w[2i] + x[2i+1] w[2i+1] + acc), so
 * a tile crosses the memory bus at bfloat16's bytes and is never widened into scratch. The
 * instruction rounds to nearest even and treats bfloat16 subnormals as zero; sums stay float32
 * and y is rounded once, as in the widening path. MT rows of x against NT = 4 or 1 weight rows. */
static inline __attribute__((always_inline)) void linear_block_dpbf16(const uint16_t *x, int64_t ldx, const uint16_t *w,
                                                                       int64_t K, const float *bias, void *y,
                                                                       int64_t ldy, const int MT, const int NT,
                                                                       const int OUTF, const uint16_t *next,
                                                                       int64_t pf_every) {
    __m512 acc[LIN_ROWS][4];
    int64_t pk = 0, pf_at = 0;
    const int64_t full = K & ~(int64_t)31;
    const __mmask32 tail = (__mmask32)((1ull << (K & 31)) - 1ull);
    for (int m = 0; m < MT; m++)
        for (int j = 0; j < NT; j++) acc[m][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < full; k += 32) {
        __m512i wv[4];
        if (next != NULL && k == pk) {
            for (int j = 0; j < NT; j++) _mm_prefetch((const char *)(next + j * K + pf_at), LIN_PREFETCH_HINT);
            pf_at += 32;
            pk += pf_every;
        }
        for (int j = 0; j < NT; j++) wv[j] = _mm512_loadu_si512(w + j * K + k);
        for (int m = 0; m < MT; m++) {
            __m512i xv = _mm512_loadu_si512(x + m * ldx + k);
            PIN_REGISTER(xv);
            for (int j = 0; j < NT; j++) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)xv, (__m512bh)wv[j]);
        }
    }
    if (tail) {
        __m512i wv[4];
        for (int j = 0; j < NT; j++) wv[j] = _mm512_maskz_loadu_epi16(tail, w + j * K + full);
        for (int m = 0; m < MT; m++) {
            const __m512i xv = _mm512_maskz_loadu_epi16(tail, x + m * ldx + full);
            for (int j = 0; j < NT; j++) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], (__m512bh)xv, (__m512bh)wv[j]);
        }
    }
    store_block_sums(acc, MT, NT, bias, y, ldy, !OUTF);
}

/* linear_columns for the vdpbf16ps path: every row of x against NT weight rows, balanced blocks. */
static void linear_columns_dpbf16(const uint16_t *x, int64_t ldx, const uint16_t *w, int64_t K, const uint16_t *bias,
                                  void *y, int64_t ldy, int M, int NT, int OUTF) {
    const int blocks = (M + LIN_ROWS - 1) / LIN_ROWS;
    float bias_wide[4];
    const float *bf = NULL;
    if (bias != NULL) {
        for (int j = 0; j < NT; j++) bias_wide[j] = bf16_to_f32(bias[j]);
        bf = bias_wide;
    }
    for (int b = 0, m = 0; b < blocks; b++) {
        const int rows = (M - m + (blocks - b) - 1) / (blocks - b);
        const int64_t range = ((K + 31) / 32 + blocks - 1) / blocks * 32;   /* as in linear_columns */
        const uint16_t *xm = x + m * ldx, *ahead = w + LIN_PREFETCH_TILES * NT * K + b * range;
        const int64_t every = (int64_t)blocks * 32;
        void *ym = (char *)y + (size_t)m * ldy * (OUTF ? 4 : 2);
#define LIN_CASE(R) case R: {                                                                   \
            if (NT == 4 && OUTF) linear_block_dpbf16(xm, ldx, w, K, bf, ym, ldy, R, 4, 1, ahead, every);     \
            else if (NT == 4) linear_block_dpbf16(xm, ldx, w, K, bf, ym, ldy, R, 4, 0, ahead, every);        \
            else if (OUTF) linear_block_dpbf16(xm, ldx, w, K, bf, ym, ldy, R, 1, 1, NULL, 0);               \
            else linear_block_dpbf16(xm, ldx, w, K, bf, ym, ldy, R, 1, 0, NULL, 0);                         \
        } break;
        switch (rows) {
        LIN_CASE(6) LIN_CASE(5) LIN_CASE(4) LIN_CASE(3) LIN_CASE(2) LIN_CASE(1)
        }
#undef LIN_CASE
        m += rows;
    }
}
#define GENQ_LINEAR_DPBF16 1

/* bfloat16 on a CPU with AVX512-BF16 but no AMX tiles (or with them turned off), on W's tile-packed copy
 * (cpu_kernels.pack_tiles: per 16 weight rows, K / 32 blocks of 16 k pairs x 16 rows, 1 KB each, in k
 * order; the layout linear_amx_packed reads). A 64-byte row of a block is a vector of 16 outputs' k
 * pairs, so the block multiplies as an outer product: for each k pair, that pair of x[m] broadcast to
 * the 16 lanes and one vdpbf16ps per 16 outputs, each lane one output's sum. A register block is
 * PK_ROWS rows of x by up to PK_COLS groups of 16 outputs (8 x 3: 24 accumulators, 3 weight vectors,
 * the broadcast), so there are no sums across lanes at the end (linear_block_dpbf16, W as it lies,
 * reduces 16 lanes per output: with K = 576 a tenth of its work), a decode step of up to 8 rows reads
 * each weight once, and a thread's share of W is one sequential run. Each output's sum runs over k in
 * order, a pair at a time (vdpbf16ps: exact products, float32 sums, round to nearest even, bfloat16
 * subnormals read as zero), so a row's result does not depend on the other rows of its call. The next
 * panel's weights are prefetched into L2 while the first row block of one panel computes. 2-core Zen 4,
 * SmolLM2's 120 matmuls (benchmarks/cpu_linear.py --dtype bfloat16, ms): 1 row 9.0 against 9.6 for W
 * as it lies, 24 rows 19.0 against 20.8, 64 43.3 against 49.2, 128 74.5 against 89.9 (oneDNN's packed
 * GEMM 79.5), 1,024 518.6 against oneDNN's 544.7; 8 x 3 against 6 x 4 blocks: 8 rows 10.1 against 12.3,
 * 24 16.7 against 18.1, level at 32-256 (docs/kernels.md). */
#ifndef PK_ROWS
#define PK_ROWS 8   /* 6 or 4 also build (-DPK_ROWS=, with -DPK_COLS= 4 or 6: at most 24 accumulators) */
#endif
#ifndef PK_COLS
#define PK_COLS 3
#endif
static inline __attribute__((always_inline)) void packed_block_dpbf16(const uint16_t *x, int64_t ldx,
                                                                       const uint16_t *wp, int ksteps,
                                                                       const float *bias, void *y, int64_t ldy,
                                                                       const int MT, const int NG, const int OUTF,
                                                                       const char *ahead, int pf_lines) {
    __m512 acc[PK_ROWS][PK_COLS];
    const size_t block = (size_t)ksteps * 512;   /* words of one group's blocks */
    for (int m = 0; m < MT; m++)
        for (int g = 0; g < NG; g++) acc[m][g] = _mm512_setzero_ps();
    const uint16_t *xr[PK_ROWS];
    for (int m = 0; m < MT; m++) xr[m] = x + m * ldx;
    int pf = 0;
    for (int kb = 0; kb < ksteps; kb++) {
        const uint16_t *wk = wp + (size_t)kb * 512;
        for (int i = 0; i < pf_lines; i++, pf++) _mm_prefetch(ahead + (size_t)pf * 64, _MM_HINT_T1);
        for (int p = 0; p < 16; p++) {
            __m512i wv[PK_COLS];
            for (int g = 0; g < NG; g++) wv[g] = _mm512_loadu_si512(wk + g * block + p * 32);
            for (int m = 0; m < MT; m++) {
                int32_t pair;   /* x[m, k], x[m, k + 1] (memcpy: x's rows need not be 4-byte aligned) */
                memcpy(&pair, xr[m] + kb * 32 + 2 * p, 4);
                __m512i xv = _mm512_set1_epi32(pair);
                PIN_REGISTER(xv);
                for (int g = 0; g < NG; g++) acc[m][g] = _mm512_dpbf16_ps(acc[m][g], (__m512bh)xv, (__m512bh)wv[g]);
            }
        }
    }
    for (int m = 0; m < MT; m++)
        for (int g = 0; g < NG; g++) {
            __m512 v = acc[m][g];
            if (bias != NULL) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + 16 * g));
            if (OUTF) _mm512_storeu_ps((float *)y + m * ldy + 16 * g, v);
            else _mm256_storeu_si256((__m256i *)((uint16_t *)y + m * ldy + 16 * g), to_bf16_16(v));
        }
}

static int linear_dpbf16_packed(const uint16_t *x, int64_t ldx, const uint16_t *wp, const uint16_t *bias, void *y,
                                int64_t ldy, int M, int N, int K, int OUTF, int num_threads) {
    const int groups = N / 16, ksteps = K / 32;
    const size_t block = (size_t)ksteps * 512;
    const size_t ysize = OUTF ? 4 : 2;
    const int rblocks = (M + PK_ROWS - 1) / PK_ROWS;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int t = 0; t < num_threads; t++) {
        const int T = num_threads;
        const int g0 = (int)((int64_t)groups * t / T), g1 = (int)((int64_t)groups * (t + 1) / T);
        float bias_wide[16 * PK_COLS];
        for (int ga = g0; ga < g1; ga += PK_COLS) {
            const int NG = g1 - ga < PK_COLS ? g1 - ga : PK_COLS;
            const float *bw = NULL;
            if (bias != NULL) {
                for (int i = 0; i < 16 * NG; i++) bias_wide[i] = bf16_to_f32(bias[ga * 16 + i]);
                bw = bias_wide;
            }
            const uint16_t *wg = wp + (size_t)ga * block;
            /* the next panel's lines (NG groups' worth, past this thread's end harmless: prefetch never
             * faults), spread over this panel's first row block */
            const char *ahead = (const char *)(wg + (size_t)NG * block);
            const int pf_lines = (int)((NG * block * 2 / 64 + ksteps - 1) / ksteps);
            for (int b = 0, m = 0; b < rblocks; b++) {
                const int rows = (M - m + (rblocks - b) - 1) / (rblocks - b);
                const uint16_t *xm = x + (int64_t)m * ldx;
                void *ym = (char *)y + ((size_t)m * ldy + (size_t)ga * 16) * ysize;
                const int npf = b == 0 ? pf_lines : 0;
#define PK_CASE(R, G) case R * 8 + G:                                                              \
                if (OUTF) packed_block_dpbf16(xm, ldx, wg, ksteps, bw, ym, ldy, R, G, 1, ahead, npf);   \
                else packed_block_dpbf16(xm, ldx, wg, ksteps, bw, ym, ldy, R, G, 0, ahead, npf);       \
                break;
#if PK_COLS == 6
#define PK_ROW_CASES(R) PK_CASE(R, 6) PK_CASE(R, 5) PK_CASE(R, 4) PK_CASE(R, 3) PK_CASE(R, 2) PK_CASE(R, 1)
#elif PK_COLS == 3
#define PK_ROW_CASES(R) PK_CASE(R, 3) PK_CASE(R, 2) PK_CASE(R, 1)
#else
#define PK_ROW_CASES(R) PK_CASE(R, 4) PK_CASE(R, 3) PK_CASE(R, 2) PK_CASE(R, 1)
#endif
                switch (rows * 8 + NG) {
#if PK_ROWS >= 8
                PK_ROW_CASES(8) PK_ROW_CASES(7)
#endif
#if PK_ROWS >= 6
                PK_ROW_CASES(6) PK_ROW_CASES(5)
#endif
                PK_ROW_CASES(4) PK_ROW_CASES(3) PK_ROW_CASES(2) PK_ROW_CASES(1)
                }
#undef PK_ROW_CASES
#undef PK_CASE
                m += rows;
            }
        }
    }
    return 0;
}
#endif

#if defined(GENQ_LINEAR_DPBF16) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
/* bfloat16 on a CPU with AMX: the tile unit does 16 x 16 x 32 products per TDPBF16PS, so a decode step's
 * matmul costs about what reading W costs at any batch up to 32 rows, where the vdpbf16ps path above grows
 * with the rows (on a 2-core AMX Xeon, SmolLM2's 120 matmuls: 7% slower at 1 row, 2.4x faster at 16, 3.4x at
 * 32; docs/kernels.md). One row stays here too, so that a row's result never depends on how many rows share
 * its call (the LM head's logits stay batch-invariant). W is the tiles' A operand as it lies in memory (16
 * weight rows x 32 k, rows K apart), and x the B operand, repacked per call into the pair-interleaved layout
 * B takes (x is small); each C tile holds 16 outputs for up to 16 rows of x and is transposed on the way out.
 * Sums stay float32 (the unit rounds to nearest even and reads bfloat16 subnormals as zero, as vdpbf16ps
 * does; only the order of the additions differs) and y is rounded once. Taken where K is a multiple of 32 and
 * N of 16 (every projection of the Llama models genq serves); other shapes stay on vdpbf16ps. Linux lends the
 * tile registers to a process that asks (arch_prctl); if it refuses, or genq_linear_set_amx(0) turned it off,
 * the vdpbf16ps path runs. Software prefetch made it 5-20% slower up to 16 rows of x (the hardware's own
 * streams keep up); with two B tiles the loads of W fall behind, and there it helps (AMX_PREFETCH). */
#include <sys/syscall.h>
#include <unistd.h>

#define GENQ_LINEAR_AMX 1
#define AMX_ROWS 32   /* rows of x per pass over W: two B tiles (16 rows each), four C tiles */
#ifndef AMX_PREFETCH
#define AMX_PREFETCH 2   /* k-blocks ahead that W's rows are prefetched, with more than 16 rows of x (0: never) */
#endif
#ifndef AMX_NEXT_PAIR
#define AMX_NEXT_PAIR 1   /* up to 16 rows of x: touch the next pair's rows ahead (0: never) */
#endif

static int amx_wanted = 1, amx_granted = -1;   /* read and set atomically: callers run without the GIL */

static int amx_ready(void) {
    int granted = __atomic_load_n(&amx_granted, __ATOMIC_RELAXED);
    if (granted < 0) {   /* ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA (18); asking twice is harmless */
        granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
        __atomic_store_n(&amx_granted, granted, __ATOMIC_RELAXED);
    }
    return __atomic_load_n(&amx_wanted, __ATOMIC_RELAXED) && granted;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed, aligned(64))) amx_config_t;

/* GCC's tile loads are asm statements that declare no memory operand (its tile stores do clobber
 * memory): between ordinary stores and a tile load of that memory the compiler must be told, else it
 * may drop or delay the stores, as it did with ldtilecfg's config (whose asm reads 8 bytes of it).
 * AMX_READS(array): tile loads read it; AMX_MEMORY_BARRIER(): all memory (once a call). */
#define AMX_READS(array) __asm__ volatile("" : : "m"(array))
#define AMX_MEMORY_BARRIER() __asm__ volatile("" : : : "memory")

/* Configures this thread's tiles 0 .. 7 as rows[t] rows (NULL: 16 each) of colsb[t] bytes each (0: tile t
 * unused). */
static void amx_load_config(const uint16_t colsb[8], const uint8_t *rows) {
    amx_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = colsb[t] ? (rows != NULL ? rows[t] : 16) : 0;
        cfg.colsb[t] = colsb[t];
    }
    /* GCC counts LDTILECFG as reading 8 bytes of cfg, so without this it may drop the stores above
     * (seen with a second copy of this code in the same file: the unwritten config faulted) */
    AMX_READS(cfg);
    _tile_loadconfig(&cfg);
}

/* Tiles: 0-3 C (weight block a = 0/1 by row block b = 0/1: tile a + 2b), 4-5 A (W), 6-7 B (x). */
static void amx_configure(int mb0, int mb1) {
    const uint16_t c0 = (uint16_t)(mb0 * 4), c1 = (uint16_t)((mb1 > 0 ? mb1 : 1) * 4);
    const uint16_t colsb[8] = {c0, c0, c1, c1, 64, 64, c0, c1};
    amx_load_config(colsb, NULL);
}

/* The B tile of k-block kb for rows x[0..mb): xp + kb * 16 * mb holds, for pair j < 16 and row m,
 * the word (x[m, 32 kb + 2j], x[m, 32 kb + 2j + 1]) at j * mb + m. */
static inline void amx_pack_block(const uint16_t *x, int64_t ldx, int mb, int kb, uint32_t *xp) {
    __m512i r[16];
    for (int m = 0; m < 16; m++)
        r[m] = m < mb ? _mm512_loadu_si512(x + m * ldx + 32 * kb) : _mm512_setzero_si512();
    transpose16(r);
    for (int j = 0; j < 16; j++) _mm512_mask_storeu_epi32(xp + ((size_t)kb * 16 + j) * mb, tail_mask(mb), r[j]);
}

/* C tile c (16 weight rows from n0, by mb rows of x; float32, mb words a row) into y[m0 + m, n0 + i]
 * (+ bias). */
static inline void amx_store(const float *c, int mb, const float *bias16, void *y, int64_t ldy, int64_t n0, int m0,
                             const int OUTF) {
    __m512i r[16];
    if (mb == 1) {   /* one row of x: the tile is already that row's 16 outputs */
        r[0] = _mm512_loadu_si512(c);
    } else {
        for (int i = 0; i < 16; i++) r[i] = _mm512_maskz_loadu_epi32(tail_mask(mb), c + i * mb);
        transpose16(r);
    }
    const __m512 b = bias16 != NULL ? _mm512_loadu_ps(bias16) : _mm512_setzero_ps();
    for (int m = 0; m < mb; m++) {
        const __m512 v = _mm512_add_ps(_mm512_castsi512_ps(r[m]), b);
        if (OUTF) _mm512_storeu_ps((float *)y + (int64_t)(m0 + m) * ldy + n0, v);
        else _mm256_storeu_si256((__m256i *)((uint16_t *)y + (int64_t)(m0 + m) * ldy + n0), to_bf16_16(v));
    }
}

static int linear_amx(const uint16_t *x, int64_t ldx, const uint16_t *w, const uint16_t *bias, void *y, int64_t ldy,
                      int M, int N, int K, int OUTF, int num_threads) {
    const int nblocks = N / 16, pairs = (nblocks + 1) / 2, ksteps = K / 32;
    const int nm = (M + AMX_ROWS - 1) / AMX_ROWS;   /* blocks of AMX_ROWS rows of x */
    const size_t block_words = (size_t)AMX_ROWS * K / 2;
    /* every block of x repacked (block b at xp + b * block_words, its second tile's rows after the
     * first's); one row alone (a single stream's step) is used in place and needs none */
    uint32_t *xp = M > 1 ? malloc(sizeof(uint32_t) * (nm * block_words + 16)) : NULL;
    if (M > 1 && xp == NULL) return 1;
#pragma omp parallel num_threads(num_threads)
    {
        float c[4][16 * 16] __attribute__((aligned(64)));
        float bias_wide[32] __attribute__((aligned(64)));
        if (M > 1) {
#pragma omp for schedule(static)
            for (int i = 0; i < nm * ksteps; i++) {
                const int b = i / ksteps, kb = i % ksteps, m0 = b * AMX_ROWS;
                const int mb0 = M - m0 < 16 ? M - m0 : 16, mb1 = M - m0 - mb0 < 16 ? M - m0 - mb0 : 16;
                if (mb0 == 1) continue;   /* a last block of one row: used in place */
                amx_pack_block(x + m0 * ldx, ldx, mb0, kb, xp + b * block_words);
                if (mb1 > 0) amx_pack_block(x + (m0 + mb0) * ldx, ldx, mb1, kb, xp + b * block_words + (size_t)mb0 * K / 2);
            }
        }
        AMX_MEMORY_BARRIER();   /* xp, written above, is read by tile loads below */
        int shape = -1;   /* the (mb0, mb1) the tiles are configured for */
        /* Each pair of weight blocks is multiplied by every block of x in turn, so W crosses the memory
         * bus once whatever M: the pair's rows (32 x K) stay in L2 for the blocks after the first. */
#pragma omp for schedule(static)
        for (int pair = 0; pair < pairs; pair++) {
            const int64_t n0 = (int64_t)pair * 32;
            const int two = n0 + 16 < N;   /* a second weight block (N is a multiple of 16) */
            const uint16_t *w0 = w + n0 * K, *w1 = w0 + 16 * (int64_t)K;
            const float *b0 = NULL;
            if (bias != NULL) {
                for (int i = 0; i < (two ? 32 : 16); i++) bias_wide[i] = bf16_to_f32(bias[n0 + i]);
                b0 = bias_wide;
            }
            for (int b = 0; b < nm; b++) {
                const int m0 = b * AMX_ROWS;
                const int mb0 = M - m0 < 16 ? M - m0 : 16, mb1 = M - m0 - mb0 < 16 ? M - m0 - mb0 : 16;
                /* one row of x is already in B's layout (its pairs in order, one word a tile row) */
                const char *xb0 = mb0 == 1 ? (const char *)(x + m0 * ldx) : (const char *)(xp + b * block_words);
                const uint32_t *xp1 = xp != NULL ? xp + b * block_words + (size_t)mb0 * K / 2 : NULL;
                if (shape != mb0 * 64 + mb1) {
                    amx_configure(mb0, mb1);
                    shape = mb0 * 64 + mb1;
                }
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                for (int kb = 0; kb < ksteps; kb++) {
#if AMX_PREFETCH
                    /* with two B tiles the unit's loads of W fall behind the hardware's streams (the
                     * first block of x only: for the others the pair's rows are in cache) */
                    if (b == 0 && mb1 > 0 && kb + AMX_PREFETCH < ksteps) {
                        for (int r = 0; r < 16; r++)
                            _mm_prefetch((const char *)(w0 + r * (int64_t)K + (kb + AMX_PREFETCH) * 32), _MM_HINT_T0);
                        if (two)
                            for (int r = 0; r < 16; r++)
                                _mm_prefetch((const char *)(w1 + r * (int64_t)K + (kb + AMX_PREFETCH) * 32), _MM_HINT_T0);
                    }
#endif
#if AMX_NEXT_PAIR
                    /* up to 16 rows of x: a line of the next pair's weight rows (which follow this pair's in
                     * memory) every k-block, into L3, so that the hardware's streams start there early */
                    if (M <= 16 && pair + 1 < pairs)
                        _mm_prefetch((const char *)(w0 + 32 * (int64_t)K) + (int64_t)kb * 2048, _MM_HINT_T2);
#endif
                    _tile_loadd(4, w0 + kb * 32, K * 2);
                    _tile_loadd(6, xb0 + (size_t)kb * 16 * mb0 * 4, mb0 * 4);
                    _tile_dpbf16ps(0, 4, 6);
                    if (two) {
                        _tile_loadd(5, w1 + kb * 32, K * 2);
                        _tile_dpbf16ps(1, 5, 6);
                    }
                    if (mb1 > 0) {
                        _tile_loadd(7, xp1 + (size_t)kb * 16 * mb1, mb1 * 4);
                        _tile_dpbf16ps(2, 4, 7);
                        if (two) _tile_dpbf16ps(3, 5, 7);
                    }
                }
                _tile_stored(0, c[0], mb0 * 4);
                if (two) _tile_stored(1, c[1], mb0 * 4);
                if (mb1 > 0) {
                    _tile_stored(2, c[2], mb1 * 4);
                    if (two) _tile_stored(3, c[3], mb1 * 4);
                }
                for (int a = 0; a < (two ? 2 : 1); a++) {
                    const float *ba = b0 != NULL ? b0 + 16 * a : NULL;
                    amx_store(c[a], mb0, ba, y, ldy, n0 + 16 * a, m0, OUTF);
                    if (mb1 > 0) amx_store(c[2 + a], mb1, ba, y, ldy, n0 + 16 * a, m0 + mb0, OUTF);
                }
            }
        }
        _tile_release();
    }
    free(xp);
    return 0;
}
/* The same products with the operands' roles swapped: x is the A operand as it lies (up to 16 rows of x
 * by 32 k, rows ldx apart: nothing repacked per call) and W the B operand, from a copy packed once per
 * weight (cpu_kernels.pack_tiles): wp holds, for weight block nb (16 rows of W) and k-block kb, one 1 KB
 * tile at wp + (nb * K / 32 + kb) * 512 whose row j (a k pair) is (W[16 nb + c, 32 kb + 2 j],
 * W[16 nb + c, 32 kb + 2 j + 1]) for c < 16, so each block's tiles lie in k order, one sequential
 * stream, and each C tile holds 16 outputs of up to 16 rows of x as y wants them (no transposition on
 * the way out). Rows of x go in groups of about AMX_GROUP_BYTES (a group stays in L2 while the threads'
 * shares of W pass); within a group each pair of weight blocks multiplies every 32-row block. Faster
 * than linear_amx at every batch and than oneDNN's tiles up to ~1,000 rows on a 2-core AMX Xeon
 * (docs/kernels.md); each product and float32 sum are linear_amx's (the same bits: only the roles
 * differ, and the tests hold it). */
#ifndef AMX_GROUP_BYTES
#define AMX_GROUP_BYTES (256 * 1024)   /* rows of x a group holds: this many bytes of them, at least 32 rows */
#endif

/* Tiles: 0-3 C (row block r = 0/1 by weight block a = 0/1: tile 2r + a), 4-5 A (x), 6-7 B (W). */
static void amx_configure_packed(int mb0, int mb1) {
    const uint8_t r1 = (uint8_t)(mb1 > 0 ? mb1 : 1);   /* (mb1 = 0: tiles 2, 3 and 5 unused) */
    const uint16_t colsb[8] = {64, 64, 64, 64, 64, 64, 64, 64};
    const uint8_t rows[8] = {(uint8_t)mb0, (uint8_t)mb0, r1, r1, (uint8_t)mb0, r1, 16, 16};
    amx_load_config(colsb, rows);
}

/* C tile (mb rows of 16 float32 sums, 64 bytes apart) + bias into y rows m0 .. m0 + mb, columns n0 .. n0 + 15 */
static inline void amx_store_rows(const float *c, int mb, const float *bias16, void *y, int64_t ldy, int64_t n0,
                                  int64_t m0, const int OUTF) {
    const __m512 b = bias16 != NULL ? _mm512_loadu_ps(bias16) : _mm512_setzero_ps();
    for (int m = 0; m < mb; m++) {
        const __m512 v = _mm512_add_ps(_mm512_load_ps(c + 16 * m), b);
        if (OUTF) _mm512_storeu_ps((float *)y + (m0 + m) * ldy + n0, v);
        else _mm256_storeu_si256((__m256i *)((uint16_t *)y + (m0 + m) * ldy + n0), to_bf16_16(v));
    }
}

static int linear_amx_packed(const uint16_t *x, int64_t ldx, const uint16_t *wp, const uint16_t *bias, void *y,
                             int64_t ldy, int M, int N, int K, int OUTF, int num_threads) {
    const int nblocks = N / 16, pairs = (nblocks + 1) / 2, ksteps = K / 32;
    const size_t block_words = (size_t)ksteps * 512;   /* one weight block's tiles, in bfloat16 words */
    const int group = AMX_GROUP_BYTES / (K * 2) > 32 ? AMX_GROUP_BYTES / (K * 2) / 32 * 32 : 32;
#pragma omp parallel num_threads(num_threads)
    {
        float c[4][16 * 16] __attribute__((aligned(64)));
        float bias_wide[32] __attribute__((aligned(64)));
        int shape = -1;
        for (int g0 = 0; g0 < M; g0 += group) {
            const int g1 = M - g0 < group ? M : g0 + group;
#pragma omp for schedule(static) nowait
            for (int pair = 0; pair < pairs; pair++) {
                const int64_t n0 = (int64_t)pair * 32;
                const int two = n0 + 16 < N;
                const uint16_t *w0 = wp + (size_t)pair * 2 * block_words, *w1 = w0 + block_words;
                const float *b0 = NULL;
                if (bias != NULL) {
                    for (int i = 0; i < (two ? 32 : 16); i++) bias_wide[i] = bf16_to_f32(bias[n0 + i]);
                    b0 = bias_wide;
                }
                for (int m0 = g0; m0 < g1; m0 += 32) {
                    const int mb0 = g1 - m0 < 16 ? g1 - m0 : 16, mb1 = g1 - m0 - mb0 < 16 ? g1 - m0 - mb0 : 16;
                    if (shape != mb0 * 64 + mb1) {
                        amx_configure_packed(mb0, mb1);
                        shape = mb0 * 64 + mb1;
                    }
                    const uint16_t *x0 = x + (int64_t)m0 * ldx, *x1 = x0 + 16 * ldx;
                    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                    for (int kb = 0; kb < ksteps; kb++) {
                        _tile_loadd(4, x0 + kb * 32, ldx * 2);
                        _tile_loadd(6, w0 + (size_t)kb * 512, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        if (two) {
                            _tile_loadd(7, w1 + (size_t)kb * 512, 64);
                            _tile_dpbf16ps(1, 4, 7);
                        }
                        if (mb1 > 0) {
                            _tile_loadd(5, x1 + kb * 32, ldx * 2);
                            _tile_dpbf16ps(2, 5, 6);
                            if (two) _tile_dpbf16ps(3, 5, 7);
                        }
                    }
                    _tile_stored(0, c[0], 64);
                    if (two) _tile_stored(1, c[1], 64);
                    if (mb1 > 0) {
                        _tile_stored(2, c[2], 64);
                        if (two) _tile_stored(3, c[3], 64);
                    }
                    for (int a = 0; a < (two ? 2 : 1); a++) {
                        const float *ba = b0 != NULL ? b0 + 16 * a : NULL;
                        amx_store_rows(c[a], mb0, ba, y, ldy, n0 + 16 * a, m0, OUTF);
                        if (mb1 > 0) amx_store_rows(c[2 + a], mb1, ba, y, ldy, n0 + 16 * a, m0 + mb0, OUTF);
                    }
                }
            }
        }
        _tile_release();
    }
    return 0;
}
#endif

#if GENQ_TILE_AMX
/* A prefill tile's scores (run_tile_avx512) of a bfloat16 cache on the tile unit: scores[j * len + t] =
 * scale * (query j . K row t of head h) for the tile's NQ (<= TILE_AMX_MAX_QUERIES) queries (query j:
 * row s0 + j / G, query head h * G + j % G) and tokens t < len. The queries (bfloat16, as stored) are
 * the A tiles, 16 queries by 32 dimensions; each 16-token chunk of K is the B tile, its 32-bit
 * dimension pairs transposed so that a tile row holds one pair of all 16 tokens; one TDPBF16PS per
 * 16 queries, 16 tokens and 32 dimensions, where score_chunk takes 32 multiply-adds (each of 16 tokens)
 * after widening K and transposing it as float32. Sums in float32 (products of bfloat16 are exact;
 * subnormal inputs read as zero), scaled after. Shares the tile registers with linear_amx (each call
 * configures them; a thread runs one at a time). */
static void tile_scores_amx(const job_t *job, int s0, int NQ, int h, int len, const int32_t *table, float *scores) {
    const int G = job->num_heads / job->num_kv_heads, NT = (NQ + 15) / 16;
    const uint16_t *q = (const uint16_t *)job->q, *k = (const uint16_t *)job->k_cache;
    uint16_t qa[TILE_AMX_MAX_QUERIES * 64] __attribute__((aligned(64)));
    uint32_t kb[2][16 * 16] __attribute__((aligned(64)));
    float c[16 * 16] __attribute__((aligned(64)));
    for (int j = 0; j < NT * 16; j++) {   /* rows past NQ: zeros, their scores never stored */
        if (j < NQ) memcpy(qa + j * 64, q + job->rows[s0 + j / G] * job->q_stride + ((int64_t)h * G + j % G) * 64, 128);
        else memset(qa + j * 64, 0, 128);
    }
    /* 0: C (16 queries x 16 tokens), 1: A (queries), 2-3: B (K, two k-steps) */
    static const uint16_t colsb[8] = {64, 64, 64, 64, 0, 0, 0, 0};
    amx_load_config(colsb, NULL);
    AMX_READS(qa);   /* (read by the tile loads below) */
    const __m512 scale = _mm512_set1_ps(job->scale);
    for (int t0 = 0; t0 < len; t0 += 16) {
        const int n = len - t0 < 16 ? len - t0 : 16;
        int64_t rows_at[16];
        chunk_rows(job, table, t0, n, h, rows_at);
        for (int ks = 0; ks < 2; ks++) {   /* dims 32 ks .. 32 ks + 31: 16 pairs, one 32-bit word each */
            __m512i r[16];
            for (int o = 0; o < 16; o++)
                r[o] = o < n ? _mm512_loadu_si512(k + rows_at[o] + 32 * ks) : _mm512_setzero_si512();
            transpose16(r);   /* r[p]: pair p of the 16 tokens */
            for (int p = 0; p < 16; p++) _mm512_store_si512(kb[ks] + p * 16, r[p]);
        }
        AMX_READS(kb);   /* (read by the tile loads below) */
        _tile_loadd(2, kb[0], 64);
        _tile_loadd(3, kb[1], 64);
        for (int i = 0; i < NT; i++) {
            _tile_zero(0);
            _tile_loadd(1, qa + i * 16 * 64, 128);
            _tile_dpbf16ps(0, 1, 2);
            _tile_loadd(1, qa + i * 16 * 64 + 32, 128);
            _tile_dpbf16ps(0, 1, 3);
            _tile_stored(0, c, 64);
            for (int m = 0; m < 16 && i * 16 + m < NQ; m++)
                _mm512_mask_storeu_ps(scores + (int64_t)(i * 16 + m) * len + t0, tail_mask(n),
                                      _mm512_mul_ps(_mm512_load_ps(c + m * 16), scale));
        }
    }
    _tile_release();
}
#endif

#if GENQ_ROW_AMX
/* A decode row's scores (run_row_avx512) over KV heads [h0, h0 + NHK) of a bfloat16 cache on the tile
 * unit: scores[j * ctx + t] = scale * (query j . K row t of head h0 + j / G), j < NHK * G. Each 16-token
 * chunk, copied in memory order into buf as run_row_avx512 does ([16 tokens][NHK heads][D]), is the A
 * operand as it lies (16 tokens by 32 dimensions, a token's rows NHK * D apart): no transposition, where
 * tile_scores_amx (many queries) transposes K into B; the B operand is the head's G queries, their
 * dimension pairs packed once a row. One TDPBF16PS per head, 16 tokens and 32 dimensions, where
 * score_tokens_dpbf16 takes two vdpbf16ps and its share of a 16 x 16 add tree per query and token.
 * Sums in float32 (products of bfloat16 are exact; subnormal inputs read as zero), scaled after. */
static void row_scores_amx(const job_t *job, int seq, int h0, int NHK, float *scores, void *buf) {
    const int G = job->num_heads / job->num_kv_heads, D = job->head_dim, DS = D / 32;
    const int ctx = job->seq_lens[seq];
    const int32_t *table = job->block_tables + (int64_t)seq * job->table_stride;
    const uint16_t *q = (const uint16_t *)job->q + job->rows[seq] * job->q_stride + (int64_t)h0 * G * D;
    uint32_t qb[ROW_AMX_MAX_WORDS] __attribute__((aligned(64)));
    float c[16 * 16] __attribute__((aligned(64)));
    /* qb: for head hh and dims 32 s .. 32 s + 31, 16 rows (pairs p) of G words (query g's pair p) */
    for (int hh = 0; hh < NHK; hh++)
        for (int ds = 0; ds < DS; ds++)
            for (int p = 0; p < 16; p++)
                for (int g = 0; g < G; g++)
                    memcpy(qb + ((hh * DS + ds) * 16 + p) * G + g, q + (hh * G + g) * D + ds * 32 + 2 * p, 4);
    /* 0: C (16 tokens x G queries), 1: A (K), 2: B (queries) */
    const uint16_t colsb[8] = {(uint16_t)(4 * G), 64, (uint16_t)(4 * G), 0, 0, 0, 0, 0};
    amx_load_config(colsb, NULL);
    AMX_READS(qb);
    const __m512 scale = _mm512_set1_ps(job->scale);
    const __m512i at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(G));
    const uint16_t *k = (const uint16_t *)buf;
    for (int t0 = 0; t0 < ctx; t0 += 16) {
        const int n = ctx - t0 < 16 ? ctx - t0 : 16;
        sweep_chunk(job, job->k_cache, table, t0, n, h0, NHK, buf);   /* (rows past n: the last chunk's, unused) */
        AMX_MEMORY_BARRIER();   /* buf, just written, is read by tile loads */
        for (int hh = 0; hh < NHK; hh++) {
            _tile_zero(0);
            for (int ds = 0; ds < DS; ds++) {
                _tile_loadd(1, k + hh * D + 32 * ds, NHK * D * 2);
                _tile_loadd(2, qb + (hh * DS + ds) * 16 * G, 4 * G);
                _tile_dpbf16ps(0, 1, 2);
            }
            _tile_stored(0, c, 4 * G);
            for (int g = 0; g < G; g++)   /* column g of the tile: query hh * G + g's 16 scores */
                _mm512_mask_storeu_ps(scores + (int64_t)(hh * G + g) * ctx + t0, tail_mask(n),
                                      _mm512_mul_ps(_mm512_i32gather_ps(at, c + g, 4), scale));
        }
    }
    _tile_release();
}
#endif

/* Whether bfloat16 matmuls of AMX-friendly shapes go to the tile unit, and with them the bfloat16
 * attention scores of prefill tiles and decode rows (tile_scores_amx, row_scores_amx): enable 0 or 1
 * sets it (tests and benchmarks compare the two paths), -1 only asks. Returns 1 where they go, 0
 * where they do not. */
int genq_linear_set_amx(int enable) {
#if defined(GENQ_LINEAR_AMX)
    if (enable >= 0) __atomic_store_n(&amx_wanted, enable != 0, __ATOMIC_RELAXED);
    return amx_ready();
#else
    (void)enable;
    return 0;
#endif
}

/* y[m, n] = sum_k x[m, k] w[n, k] (+ bias[n]) for m < M, n < N; x rows ldx elements apart, y rows
 * ldy apart, w and bias contiguous, all of element type dtype (0 float32, 1 bfloat16; 2: bfloat16
 * x, W and bias with float32 y, the unrounded sums, where vdpbf16ps is built in). Returns 0; 1 if
 * out of memory; 2 where this build has no such kernel. */
int genq_linear(const void *x, int64_t ldx, const void *w, const void *bias, void *y, int64_t ldy,
                int M, int N, int K, int dtype, int num_threads) {
#if defined(GENQ_LIN_AVX512) || defined(GENQ_LIN_AVX2)
    const int tiles = N / 4, BF = dtype == 1;
    const size_t esize = BF ? 2 : 4;
    if (num_threads < 1) num_threads = 1;
#if defined(GENQ_LINEAR_DPBF16)
    if (BF || dtype == 2) {
        const uint16_t *xb = (const uint16_t *)x, *wb = (const uint16_t *)w, *bb = (const uint16_t *)bias;
        const int OUTF = dtype == 2;
        const size_t ysize = OUTF ? 4 : 2;
#if defined(GENQ_LINEAR_AMX)
        if (K % 32 == 0 && N % 16 == 0 && amx_ready())
            return linear_amx(xb, ldx, wb, bb, y, ldy, M, N, K, OUTF, num_threads);
#endif
#pragma omp parallel num_threads(num_threads)
        {
#pragma omp for schedule(static) nowait
            for (int t = 0; t < tiles; t++)
                linear_columns_dpbf16(xb, ldx, wb + (size_t)t * 4 * K, K, bb != NULL ? bb + (size_t)t * 4 : NULL,
                                      (char *)y + (size_t)t * 4 * ysize, ldy, M, 4, OUTF);
#pragma omp for schedule(static)
            for (int n = tiles * 4; n < N; n++)
                linear_columns_dpbf16(xb, ldx, wb + (size_t)n * K, K, bb != NULL ? bb + n : NULL,
                                      (char *)y + (size_t)n * ysize, ldy, M, 1, OUTF);
        }
        return 0;
    }
#endif
    if (dtype == 2) return 2;   /* float32 output of bfloat16 inputs: the vdpbf16ps path only */
    const float *xf = (const float *)x;
    float *widened = NULL;
    if (BF) {   /* x is small (M x K): widen it once, so the inner loop loads float32 rows */
        widened = malloc(sizeof(float) * ((size_t)M * K + 1));
        if (widened == NULL) return 1;
        for (int m = 0; m < M; m++) load_row(x, (int64_t)m * ldx, K, 1, widened + (size_t)m * K);
        xf = widened;
        ldx = K;
    }
    int failed = 0;
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        float *wide = BF ? malloc(sizeof(float) * 4 * ((size_t)K + 1)) : NULL;   /* 4 widened weight rows */
        const int ready = !BF || wide != NULL;   /* (every thread still meets both loops) */
        if (!ready) failed = 1;
#pragma omp for schedule(LIN_SCHEDULE) nowait
        for (int t = 0; t < tiles; t++)
            if (ready)
                linear_columns(xf, ldx, (const char *)w + (size_t)t * 4 * K * esize, K,
                               bias != NULL ? (const char *)bias + (size_t)t * 4 * esize : NULL,
                               (char *)y + (size_t)t * 4 * esize, ldy, M, 4, BF, wide);
#pragma omp for schedule(static)
        for (int n = tiles * 4; n < N; n++)
            if (ready)
                linear_columns(xf, ldx, (const char *)w + (size_t)n * K * esize, K,
                               bias != NULL ? (const char *)bias + (size_t)n * esize : NULL,
                               (char *)y + (size_t)n * esize, ldy, M, 1, BF, wide);
        free(wide);
    }
    free(widened);
    return failed;
#else
    (void)x; (void)ldx; (void)w; (void)bias; (void)y; (void)ldy; (void)M; (void)N; (void)K; (void)dtype;
    (void)num_threads;
    return 2;
#endif
}

/* genq_linear with W's tile-packed copy wp as well (cpu_kernels.pack_tiles: the layout linear_amx_packed
 * and linear_dpbf16_packed read; NULL: none): bfloat16 batches of any size go to linear_amx_packed where
 * the tiles run, else to linear_dpbf16_packed where vdpbf16ps does; the rest to genq_linear on w. */
int genq_linear_packed(const void *x, int64_t ldx, const void *w, const void *wp, const void *bias, void *y,
                       int64_t ldy, int M, int N, int K, int dtype, int num_threads) {
#if defined(GENQ_LINEAR_AMX)
    if (wp != NULL && (dtype == 1 || dtype == 2) && K % 32 == 0 && N % 16 == 0 && amx_ready())
        return linear_amx_packed((const uint16_t *)x, ldx, (const uint16_t *)wp, (const uint16_t *)bias, y, ldy,
                                 M, N, K, dtype == 2, num_threads < 1 ? 1 : num_threads);
#endif
#if defined(GENQ_LINEAR_DPBF16)
    if (wp != NULL && (dtype == 1 || dtype == 2) && K % 32 == 0 && N % 16 == 0)
        return linear_dpbf16_packed((const uint16_t *)x, ldx, (const uint16_t *)wp, (const uint16_t *)bias, y, ldy,
                                    M, N, K, dtype == 2, num_threads < 1 ? 1 : num_threads);
#else
    (void)wp;
#endif
    return genq_linear(x, ldx, w, bias, y, ldy, M, N, K, dtype, num_threads);
}

/* out[r] = the index of the first maximum of row r of x (rows ld floats apart, cols long), a NaN
 * counting as the maximum (its first), as torch's max(dim=-1).indices and argmax give it: greedy
 * sampling's pick from the LM head's float32 logits. Rows split among the threads. */
int genq_argmax_rows(const float *x, int64_t rows, int64_t cols, int64_t ld, int64_t *out, int num_threads) {
    if (cols <= 0) return 2;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * ld;
        int64_t best = 0, j = 0;
        float top = -INFINITY;
#if defined(__AVX512F__)
        if (cols >= 16) {
            /* per lane: its largest value so far and where (strictly greater replaces, so each lane
             * keeps its first maximum); a vector with a NaN stops it, and the loop below finds the NaN */
            __m512 mv = _mm512_set1_ps(-INFINITY);
            __m512i mi = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), idx = mi;
            for (; j + 16 <= cols && j < (int64_t)1 << 30; j += 16, idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16))) {
                const __m512 v = _mm512_loadu_ps(row + j);
                if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) break;
                const __mmask16 gt = _mm512_cmp_ps_mask(v, mv, _CMP_GT_OQ);
                mv = _mm512_mask_mov_ps(mv, gt, v);
                mi = _mm512_mask_mov_epi32(mi, gt, idx);
            }
            /* the lanes' maximum, then the smallest index holding it (all -inf so far: index 0) */
            top = _mm512_reduce_max_ps(mv);
            best = _mm512_mask_reduce_min_epi32(_mm512_cmp_ps_mask(mv, _mm512_set1_ps(top), _CMP_EQ_OQ), mi);
        }
#endif
        for (; j < cols; j++) {   /* the rest (every column without AVX-512): a NaN ends the row */
            const float v = row[j];
            if (v != v) {
                best = j;
                break;
            }
            if (v > top) {
                top = v;
                best = j;
            }
        }
        out[r] = best;
    }
    return 0;
}

/* The step's new K and V rows into their cache slots: k_cache[slot] = k[t] (slot < 0: skipped).
 * k, v rows may be strided (slices of the fused qkv projection); each row is row_elems contiguous
 * elements, the cache's rows likewise. */
int genq_store_kv(const void *k, int64_t k_stride, const void *v, int64_t v_stride, void *k_cache, void *v_cache,
                  const int64_t *slots, int64_t tokens, int64_t num_slots, int row_elems, int dtype) {
    const size_t esize = dtype == 0 ? 4 : 2, bytes = (size_t)row_elems * esize;
    for (int64_t t = 0; t < tokens; t++)
        if (slots[t] >= num_slots) return 3;   /* past the cache: nothing written */
    for (int64_t t = 0; t < tokens; t++) {
        if (slots[t] < 0) continue;
        memcpy((char *)k_cache + slots[t] * bytes, (const char *)k + t * k_stride * esize, bytes);
        memcpy((char *)v_cache + slots[t] * bytes, (const char *)v + t * v_stride * esize, bytes);
    }
    return 0;
}

/* ---- A whole decode step's decoder layers in one call ------------------------------------------
 * For a step of few tokens (decode rows, short prefill chunks) every op of a Llama layer already has
 * a compiled kernel above, and the Python between them (a dozen calls a layer, each checking its
 * tensors and crossing ctypes) cost about as much as the ops themselves at batch 1. This runs the
 * same kernels, in the same order, with the same arguments and thread counts, for every layer:
 * results are bit for bit those of the per-op path (kernels.fused_decode checks that).
 *
 * Per layer (as worker/engine/models/llama.py): h = norm(x [+ residual]); qkv = h Wqkv^T (+ b);
 * rotary on q, k in place; k, v into the cache; attn = paged attention of q; x = attn Wo^T;
 * h = norm(x + residual); x = silu_mul(h Wgu^T (+ b)) Wdown^T (+ b). The first layer takes residual
 * = x. On return x and residual hold the last layer's output and residual stream. */
typedef struct {
    const void *input_norm, *post_norm, *qkv_w, *qkv_b, *o_w, *gate_up_w, *gate_up_b, *down_w, *down_b;
    void *k_cache, *v_cache;
    const void *qkv_wp, *o_wp, *gate_up_wp, *down_wp;   /* tile-packed copies (genq_linear_packed), or NULL */
} genq_layer_t;

int genq_decode_layers(const genq_layer_t *layers, int num_layers, void *x, void *residual, void *h, void *qkv,
                       void *attn, void *gate_up, void *act, int64_t tokens, int hidden, int num_heads,
                       int num_kv_heads, int head_dim, int inter, float eps, const int64_t *positions,
                       const float *cos_sin, int64_t max_position, const int64_t *slots, int64_t num_slots,
                       const int32_t *block_tables, int64_t table_stride, const int32_t *seq_lens,
                       const int64_t *rows, int num_rows, int block_size, float scale, int dtype,
                       int linear_dtype, int threads, int norm_threads, int rotary_threads, int silu_threads) {
    const size_t esize = dtype == 0 ? 4 : 2;
    const int q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim, qkv_size = q_size + 2 * kv_size;
    const int M = (int)tokens;
    char *qkv_bytes = (char *)qkv;
    int status;
    for (int l = 0; l < num_layers; l++) {
        const genq_layer_t *L = &layers[l];
        if (l == 0) {
            memcpy(residual, x, (size_t)tokens * hidden * esize);
            status = genq_rms_norm(x, NULL, L->input_norm, h, NULL, tokens, hidden, eps, dtype, norm_threads);
        } else {
            status = genq_rms_norm(x, residual, L->input_norm, h, residual, tokens, hidden, eps, dtype, norm_threads);
        }
        if (status) return 10 + status;
        if ((status = genq_linear_packed(h, hidden, L->qkv_w, L->qkv_wp, L->qkv_b, qkv, qkv_size, M, qkv_size, hidden,
                                         linear_dtype, threads)))
            return 20 + status;
        if ((status = genq_rotary(positions, qkv, qkv_size, num_heads, qkv_bytes + (size_t)q_size * esize, qkv_size,
                                  num_kv_heads, cos_sin, max_position, head_dim, tokens, dtype, rotary_threads)))
            return 30 + status;
        if ((status = genq_store_kv(qkv_bytes + (size_t)q_size * esize, qkv_size,
                                    qkv_bytes + (size_t)(q_size + kv_size) * esize, qkv_size, L->k_cache, L->v_cache,
                                    slots, tokens, num_slots, kv_size, dtype)))
            return 40 + status;
        if ((status = genq_paged_decode(qkv, qkv_size, L->k_cache, L->v_cache, attn, dtype, block_tables, table_stride,
                                        seq_lens, rows, num_rows, num_heads, num_kv_heads, head_dim, block_size, scale,
                                        threads)))
            return 50 + status;
        if ((status = genq_linear_packed(attn, q_size, L->o_w, L->o_wp, NULL, x, hidden, M, hidden, q_size,
                                         linear_dtype, threads)))
            return 60 + status;
        if ((status = genq_rms_norm(x, residual, L->post_norm, h, residual, tokens, hidden, eps, dtype, norm_threads)))
            return 70 + status;
        if ((status = genq_linear_packed(h, hidden, L->gate_up_w, L->gate_up_wp, L->gate_up_b, gate_up, 2 * inter, M,
                                         2 * inter, hidden, linear_dtype, threads)))
            return 80 + status;
        if ((status = genq_silu_mul(gate_up, act, tokens, inter, dtype, silu_threads)))
            return 90 + status;
        if ((status = genq_linear_packed(act, inter, L->down_w, L->down_wp, L->down_b, x, hidden, M, hidden, inter,
                                         linear_dtype, threads)))
            return 100 + status;
    }
    return 0;
}
