/* Paged-attention decode on the CPU: one new query token per sequence, attending to the
 * sequence's whole context straight from the block-table KV cache (no gather, no copy).
 *
 * Built at first use by kernels/cpu_kernels.py (gcc -O3 -march=native) and called through ctypes,
 * which releases the GIL. Work items are (sequence, KV head) pairs split over `num_threads`
 * pthreads by context length. Each item reads its K rows once (scores for the KV head's group of
 * query heads), takes an exact softmax in float32, then reads its V rows once.
 *
 * Layouts (all contiguous):
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
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const void *q, *k_cache, *v_cache;
    void *out;
    const int32_t *block_tables, *seq_lens;
    const int64_t *rows;
    const int32_t *items;      /* (seq, kv_head) pairs, flattened */
    int64_t table_stride;
    int num_heads, num_kv_heads, head_dim, block_size, dtype;
    float scale;
    int begin, end;            /* this thread's items */
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
#endif
        for (; i < n; i++) dst[i] = bf16_to_f32(src[i]);
    }
}

static void run_item(const job_t *job, int seq, int kv_head, float *scores, float *qbuf, float *acc, float *row) {
    const int H = job->num_heads, KVH = job->num_kv_heads, D = job->head_dim, BS = job->block_size;
    const int G = H / KVH;
    const int ctx = job->seq_lens[seq];
    const int64_t token = job->rows[seq];
    const int32_t *table = job->block_tables + (int64_t)seq * job->table_stride;

    for (int g = 0; g < G; g++) {
        load_row(job->q, (token * H + (int64_t)kv_head * G + g) * D, D, job->dtype, qbuf + g * D);
        for (int d = 0; d < D; d++) qbuf[g * D + d] *= job->scale;
    }
    /* scores[g * ctx + t] = q_g . k_t */
    for (int t = 0; t < ctx; t++) {
        const int64_t slot = (int64_t)table[t / BS] * BS + t % BS;   /* BS is a power of two in practice */
        const int64_t at = (slot * KVH + kv_head) * D;
        const float *k;
        if (job->dtype == 0) {
            k = (const float *)job->k_cache + at;
        } else {
            load_row(job->k_cache, at, D, 1, row);
            k = row;
        }
        for (int g = 0; g < G; g++) scores[(int64_t)g * ctx + t] = dot(qbuf + g * D, k, D);
    }
    float inv_sum[256];   /* G <= 256, checked by the caller */
    for (int g = 0; g < G; g++) {
        float *s = scores + (int64_t)g * ctx;
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int t = 0; t < ctx; t++) m = s[t] > m ? s[t] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int t = 0; t < ctx; t++) {
            s[t] = expf(s[t] - m);
            sum += s[t];
        }
        inv_sum[g] = 1.0f / sum;
    }
    memset(acc, 0, sizeof(float) * (size_t)G * D);
    for (int t = 0; t < ctx; t++) {
        const int64_t slot = (int64_t)table[t / BS] * BS + t % BS;
        const int64_t at = (slot * KVH + kv_head) * D;
        const float *v;
        if (job->dtype == 0) {
            v = (const float *)job->v_cache + at;
        } else {
            load_row(job->v_cache, at, D, 1, row);
            v = row;
        }
        for (int g = 0; g < G; g++) axpy(acc + g * D, scores[(int64_t)g * ctx + t], v, D);
    }
    for (int g = 0; g < G; g++) {
        const int64_t at = (token * H + (int64_t)kv_head * G + g) * D;
        const float *a = acc + g * D;
        if (job->dtype == 0) {
            float *o = (float *)job->out + at;
            for (int d = 0; d < D; d++) o[d] = a[d] * inv_sum[g];
        } else {
            uint16_t *o = (uint16_t *)job->out + at;
            for (int d = 0; d < D; d++) o[d] = f32_to_bf16(a[d] * inv_sum[g]);
        }
    }
}

static void *run_job(void *arg) {
    const job_t *job = (const job_t *)arg;
    const int G = job->num_heads / job->num_kv_heads, D = job->head_dim;
    int max_ctx = 1;
    for (int i = job->begin; i < job->end; i++) {
        const int ctx = job->seq_lens[job->items[2 * i]];
        max_ctx = ctx > max_ctx ? ctx : max_ctx;
    }
    float *scores = malloc(sizeof(float) * ((size_t)G * max_ctx + 3 * (size_t)G * D + D));
    if (scores == NULL) return (void *)1;
    float *qbuf = scores + (size_t)G * max_ctx, *acc = qbuf + (size_t)G * D, *row = acc + (size_t)G * D;
    for (int i = job->begin; i < job->end; i++) run_item(job, job->items[2 * i], job->items[2 * i + 1], scores, qbuf, acc, row);
    free(scores);
    return NULL;
}

/* Returns 0 on success. */
int genq_paged_decode(const void *q, const void *k_cache, const void *v_cache, void *out, int dtype,
                      const int32_t *block_tables, int64_t table_stride, const int32_t *seq_lens,
                      const int64_t *rows, int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                      int block_size, float scale, int num_threads) {
    if (num_kv_heads <= 0 || num_heads % num_kv_heads != 0 || num_heads / num_kv_heads > 256) return 2;
    int num_items = 0;
    int64_t total = 0;
    int32_t *items = malloc(sizeof(int32_t) * 2 * ((size_t)num_seqs * num_kv_heads + 1));
    if (items == NULL) return 1;
    for (int s = 0; s < num_seqs; s++) {
        if (rows[s] < 0) continue;
        for (int h = 0; h < num_kv_heads; h++) {
            items[2 * num_items] = s;
            items[2 * num_items + 1] = h;
            num_items++;
            total += seq_lens[s];
        }
    }
    if (num_threads < 1) num_threads = 1;
    if (num_threads > num_items) num_threads = num_items > 0 ? num_items : 1;
    job_t jobs[64];
    pthread_t threads[64];
    int started[64] = {0};
    if (num_threads > 64) num_threads = 64;
    /* split the items into num_threads runs of about equal context length */
    int begin = 0;
    int64_t done = 0;
    for (int t = 0; t < num_threads; t++) {
        int end = begin;
        const int64_t goal = total * (t + 1) / num_threads;
        while (end < num_items && (t == num_threads - 1 || done < goal)) {
            done += seq_lens[items[2 * end]];
            end++;
        }
        jobs[t] = (job_t){q, k_cache, v_cache, out, block_tables, seq_lens, rows, items, table_stride, num_heads,
                          num_kv_heads, head_dim, block_size, dtype, scale, begin, end};
        begin = end;
    }
    int failed = 0;
    for (int t = 1; t < num_threads; t++) {
        started[t] = pthread_create(&threads[t], NULL, run_job, &jobs[t]) == 0;
        if (!started[t] && run_job(&jobs[t]) != NULL) failed = 1;   /* no thread: run it here */
    }
    if (run_job(&jobs[0]) != NULL) failed = 1;
    for (int t = 1; t < num_threads; t++) {
        void *result = NULL;
        if (started[t]) {
            pthread_join(threads[t], &result);
            if (result != NULL) failed = 1;
        }
    }
    free(items);
    return failed;
}
