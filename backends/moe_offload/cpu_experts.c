/* Routed int4 experts computed by the CPU, straight from the expert store (moe-offload).
 *
 * The store's int4 layout (quant.py): per expert and projection, rows of C/2 bytes (low nibble =
 * even column, high = odd, value q + 8) and bf16 scales [R, C/G]. The GPU's kernels read the same
 * bytes, so there is one copy of every expert in host memory.
 *
 * experts_layer(): one token, n experts of one layer: out[H] = sum_j w[j] * down_j(silu(g_j) * u_j)
 * with [g_j, u_j] = gate_up_j x, in stages (input, gate_up rows, silu(g) * u, down rows, the
 * weighted sum) run by a pool of threads that spin while there is work and sleep when there is
 * none; the row stages hand out 32 KB chunks of contiguous rows. The dot products (rows_dot) widen
 * 16 packed bytes at a time to floats with the vector instructions -march=native allows and keep
 * 4 rows in flight, prefetching the next 4: about 20 GB/s of weights per core (AMD EPYC, AVX-512),
 * so a few cores reach the host memory's bandwidth (docs/moe-offload.md).
 *
 * Experts of an int4 checkpoint may carry per-group zero points (uint8 [R, C/G]: z replaces the 8)
 * and fp16 scales: the same pass reads them (a zero-point pointer and a scale flag), the compiler
 * keeping a copy of the pass without them for our own symmetric bf16 experts.
 *
 * worker_*(): the hybrid decode step. A thread waits, layer after layer, for the GPU to publish a
 * token's hidden state and the experts it leaves to the CPU (flags in pinned host memory that the
 * GPU writes), computes them and raises a flag the GPU waits on. No CUDA call and no Python.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline float bf16(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- one block of rows: the dot products -----------------------------------------------------
 * A row's dot product is sum_g s[g] * (sum_i lo_i xe_i + hi_i xo_i - z_g * xs[g]) where lo/hi are
 * the nibbles as stored (0..15), xe/xo the input's even/odd columns, xs[g] the sum of x over group
 * g and z_g its zero point (8 for the symmetric format of quant.py). With b_i = lo_i + 16 hi_i, the
 * byte itself, lo_i xe_i + hi_i xo_i = b_i xe_i + hi_i xd_i where xd = xo - 16 xe (computed once
 * per input): one mask less per 32 weights. Bytes and nibbles become floats exactly and the
 * products are float32, so the result is the reference's up to the order of the additions and
 * xd's one rounding.
 *
 * The vector path works on 16 bytes (32 weights) at a time with GCC/clang vector types: the
 * compiler emits AVX-512, AVX2, SSE2 or NEON for whatever -march says, so one source serves the
 * native build and the portable one. ROWS rows go together so each load of x serves ROWS rows and
 * each row still streams its own contiguous bytes. Groups whose half width is not a multiple of
 * 16 bytes (tiny test models) take the scalar path. */
#define VB 16                      /* bytes of packed int4 per vector step: 32 weights */
#define ROWS 4                     /* rows per block */
#define PREFETCH_BYTES 16384       /* how far ahead in a run of rows the next lines are asked for */
typedef float vf __attribute__((vector_size(4 * VB)));
typedef int32_t vi __attribute__((vector_size(4 * VB)));
typedef uint8_t vb __attribute__((vector_size(VB)));

static inline float fp16(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);                /* exact, one instruction */
#endif
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    float f;
    if (e == 0) {                       /* zero and subnormals: m * 2^-24 */
        f = (float)m * (1.0f / 16777216.0f);
        return sign ? -f : f;
    }
    uint32_t u = sign | ((e == 31 ? 255u : e + 112u) << 23) | (m << 13);
    memcpy(&f, &u, 4);
    return f;
}

/* the scale of entry i of a [rows, groups] grid: fp16 or bf16 */
static inline float scale_at(const uint16_t *s, int64_t i, int f16) {
    return f16 ? fp16(s[i]) : bf16(s[i]);
}

/* the zero point of entry i of a [rows, groups] grid: z's, or the symmetric format's 8 (z NULL) */
static inline float group_zero(const uint8_t *z, int64_t i) {
    return z ? (float)z[i] : 8.f;
}

/* 16 packed bytes -> the bytes (0..255) and their high nibbles (0..15) as floats, exactly.
 * Compilers scalarise a byte vector's conversion, so the widening is written per instruction set. */
static inline void nibbles(const uint8_t *q, vf *lo, vf *hi) {
#if defined(__AVX512F__)
    __m512i w = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
    *lo = (vf)_mm512_cvtepi32_ps(w);
    *hi = (vf)_mm512_cvtepi32_ps(_mm512_srli_epi32(w, 4));
#elif defined(__AVX2__)
    __m256i w0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q));
    __m256i w1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8)));
    __m256 l[2] = {_mm256_cvtepi32_ps(w0), _mm256_cvtepi32_ps(w1)};
    __m256 h[2] = {_mm256_cvtepi32_ps(_mm256_srli_epi32(w0, 4)), _mm256_cvtepi32_ps(_mm256_srli_epi32(w1, 4))};
    memcpy(lo, l, sizeof *lo);
    memcpy(hi, h, sizeof *hi);
#elif defined(__ARM_NEON)
    uint8x16_t b = vld1q_u8(q);
    uint8x16_t bl = b, bh = vshrq_n_u8(b, 4);
    uint16x8_t l0 = vmovl_u8(vget_low_u8(bl)), l1 = vmovl_u8(vget_high_u8(bl));
    uint16x8_t h0 = vmovl_u8(vget_low_u8(bh)), h1 = vmovl_u8(vget_high_u8(bh));
    float32x4_t l[4] = {vcvtq_f32_u32(vmovl_u16(vget_low_u16(l0))), vcvtq_f32_u32(vmovl_u16(vget_high_u16(l0))),
                        vcvtq_f32_u32(vmovl_u16(vget_low_u16(l1))), vcvtq_f32_u32(vmovl_u16(vget_high_u16(l1)))};
    float32x4_t h[4] = {vcvtq_f32_u32(vmovl_u16(vget_low_u16(h0))), vcvtq_f32_u32(vmovl_u16(vget_high_u16(h0))),
                        vcvtq_f32_u32(vmovl_u16(vget_low_u16(h1))), vcvtq_f32_u32(vmovl_u16(vget_high_u16(h1)))};
    memcpy(lo, l, sizeof *lo);
    memcpy(hi, h, sizeof *hi);
#else
    for (int i = 0; i < VB; i++) {
        (*lo)[i] = (float)q[i];
        (*hi)[i] = (float)(q[i] >> 4);
    }
#endif
}

static inline float hsum(const vf *v) {
    float s = 0.f;
    for (int i = 0; i < VB; i++) s += (*v)[i];
    return s;
}

/* ROWS rows of packed int4 [.., c/2] (row stride c/2 bytes) with scales [.., c/g] against the split
 * input: out[r] = the row's dot product. Each group of a row is g/2 bytes (64, one cache line, at
 * group 128); meanwhile the same line PREFETCH_BYTES further on is asked for (with the hardware's
 * prefetchers alone, one core read 8 GB/s from memory where it computed 14 from its caches). */
static inline __attribute__((always_inline)) void rows_dot_vec(
        const uint8_t *q, const uint16_t *s, const uint8_t *z, int f16, const float *xe, const float *xd,
        const float *xs, int c, int g, float *out) {
    const int hb = c / 2, gb = g / 2, ng = c / g;
    const int64_t ahead = (PREFETCH_BYTES / hb + ROWS - 1) / ROWS * ROWS;   /* rows */
    vf acc[ROWS];
    float corr[ROWS];
    for (int r = 0; r < ROWS; r++) {
        acc[r] = (vf){0};
        corr[r] = 0.f;
    }
    for (int k = 0; k < ng; k++) {
        vf ae[ROWS], ad[ROWS];
        for (int r = 0; r < ROWS; r++) ae[r] = ad[r] = (vf){0};
        for (int i = k * gb; i < (k + 1) * gb; i += VB) {
            vf e, d;
            memcpy(&e, xe + i, sizeof e);
            memcpy(&d, xd + i, sizeof d);
            for (int r = 0; r < ROWS; r++) {
                vf lo, hi;
                nibbles(q + (int64_t)r * hb + i, &lo, &hi);
                ae[r] += lo * e;
                ad[r] += hi * d;
            }
        }
        for (int r = 0; r < ROWS; r++) {
            __builtin_prefetch(q + (ahead + r) * hb + k * gb, 0, 3);
            float sc = scale_at(s, (int64_t)r * ng + k, f16);
            acc[r] += sc * (ae[r] + ad[r]);
            corr[r] += sc * group_zero(z, (int64_t)r * ng + k) * xs[k];
        }
    }
    for (int r = 0; r < ROWS; r++) out[r] = hsum(&acc[r]) - corr[r];
}

static void rows_dot_scalar(const uint8_t *q, const uint16_t *s, const uint8_t *z, int f16, int nr,
                            const float *xe, const float *xd, const float *xs, int c, int g, float *out) {
    const int hb = c / 2, gb = g / 2, ng = c / g;
    for (int r = 0; r < nr; r++) {
        const uint8_t *b = q + (int64_t)r * hb;
        float acc = 0.f;
        for (int k = 0; k < ng; k++) {
            float a = 0.f;
            for (int i = k * gb; i < (k + 1) * gb; i++) a += (float)b[i] * xe[i] + (float)(b[i] >> 4) * xd[i];
            int64_t i = (int64_t)r * ng + k;
            acc += scale_at(s, i, f16) * (a - group_zero(z, i) * xs[k]);
        }
        out[r] = acc;
    }
}

/* rows [0, n) starting at q / s (/ z, the zero points, or NULL), ROWS at a time */
static void rows_dot(const uint8_t *q, const uint16_t *s, const uint8_t *z, int f16, int n, const float *xe,
                     const float *xd, const float *xs, int c, int g, float *out) {
    const int hb = c / 2, ng = c / g;
    const int vec = (g / 2) % VB == 0;
    for (int r = 0; r < n; r += ROWS) {
        int nr = n - r < ROWS ? n - r : ROWS;
        const uint8_t *qr = q + (int64_t)r * hb, *zr = z ? z + (int64_t)r * ng : NULL;
        const uint16_t *sr = s + (int64_t)r * ng;
        if (vec && nr == ROWS && !z && !f16 && g == 128)   /* the usual group, unrolled: our experts */
            rows_dot_vec(qr, sr, NULL, 0, xe, xd, xs, c, 128, out + r);
        else if (vec && nr == ROWS && g == 128)            /* and a checkpoint's */
            rows_dot_vec(qr, sr, zr, f16, xe, xd, xs, c, 128, out + r);
        else if (vec && nr == ROWS)
            rows_dot_vec(qr, sr, zr, f16, xe, xd, xs, c, g, out + r);
        else
            rows_dot_scalar(qr, sr, zr, f16, nr, xe, xd, xs, c, g, out + r);
    }
}

/* ---- a pool of threads that spin between the stages of a layer ---------------------------- */
typedef struct pool pool_t;
typedef void (*stage_fn)(void *job, int part, int parts);

struct pool {
    int n;                         /* threads, the caller included */
    pthread_t *th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    volatile int stop;
    int gen;                       /* bumped to release the workers into a stage */
    int arrived;
    int sleepers;
    stage_fn fn;
    void *job;
    int64_t spin_ns;
};

typedef struct { pool_t *p; int id; } worker_arg;

static void *pool_main(void *a) {
    worker_arg *wa = a;
    pool_t *p = wa->p;
    int id = wa->id;
    free(wa);
    int mine = 0;                  /* gen is 0 until the first stage, which waits for every thread */
    for (;;) {
        int64_t t0 = now_ns();
        while (__atomic_load_n(&p->gen, __ATOMIC_SEQ_CST) == mine) {
            if (p->stop) return NULL;
            if (now_ns() - t0 > p->spin_ns) {
                pthread_mutex_lock(&p->mu);
                __atomic_add_fetch(&p->sleepers, 1, __ATOMIC_SEQ_CST);
                while (__atomic_load_n(&p->gen, __ATOMIC_SEQ_CST) == mine && !p->stop)
                    pthread_cond_wait(&p->cv, &p->mu);
                __atomic_sub_fetch(&p->sleepers, 1, __ATOMIC_SEQ_CST);
                pthread_mutex_unlock(&p->mu);
                t0 = now_ns();
            } else {
                cpu_relax();
            }
        }
        if (p->stop) return NULL;
        mine = __atomic_load_n(&p->gen, __ATOMIC_SEQ_CST);
        p->fn(p->job, id, p->n);
        __atomic_add_fetch(&p->arrived, 1, __ATOMIC_SEQ_CST);
    }
}

static pool_t *pool_new(int n) {
    pool_t *p = calloc(1, sizeof(pool_t));
    p->n = n < 1 ? 1 : n;
    p->spin_ns = 3000000;          /* 3 ms: the gaps between a token's layers, not between tokens */
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->th = calloc(p->n, sizeof(pthread_t));
    for (int i = 1; i < p->n; i++) {
        worker_arg *wa = malloc(sizeof(worker_arg));
        wa->p = p;
        wa->id = i;
        pthread_create(&p->th[i], NULL, pool_main, wa);
    }
    return p;
}

/* run fn(job, part, parts) on every thread, the caller being part 0; returns when all are done */
static void pool_run(pool_t *p, stage_fn fn, void *job) {
    p->fn = fn;
    p->job = job;
    __atomic_store_n(&p->arrived, 0, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&p->gen, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&p->sleepers, __ATOMIC_SEQ_CST)) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
    fn(job, 0, p->n);
    while (__atomic_load_n(&p->arrived, __ATOMIC_SEQ_CST) < p->n - 1) cpu_relax();
}

static void pool_free(pool_t *p) {
    p->stop = 1;
    pthread_mutex_lock(&p->mu);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n; i++) pthread_join(p->th[i], NULL);
    free(p->th);
    free(p);
}

/* ---- one layer's experts ---------------------------------------------------------------------- */
typedef struct {
    int h, inter, g, n;
    const float *x;                /* [H] */
    const int32_t *ids;            /* [n] */
    const float *w;                /* [n] */
    const uint8_t *guq;            /* [E, 2I, H/2] */
    const uint16_t *gus;           /* [E, 2I, H/G] */
    const uint8_t *dnq;            /* [E, H, I/2] */
    const uint16_t *dns;           /* [E, H, I/G] */
    float *out;                    /* [H] */
    float *xe, *xd, *xg;           /* [H/2], [H/2], [H/G]: see rows_dot */
    float *hid;                    /* [n, 2I] */
    float *ae, *ad, *ag;           /* [n, I/2], [n, I/2], [n, I/G]: the activation, as xe/xd/xg */
    float *ydn;                    /* [n, H]: each expert's down projection */
    const uint8_t *guz, *dnz;      /* zero points [E, 2I, H/G], [E, H, I/G], or NULL (8) */
    int f16;                       /* scales are fp16 (else bf16) */
    int next;                      /* the next row a thread takes (the row stages) */
} layer_job;

static inline void span(int total, int part, int parts, int *a, int *b) {
    int per = (total + parts - 1) / parts;
    *a = part * per;
    *b = *a + per < total ? *a + per : total;
    if (*a > total) *a = total;
}

static void stage_input(void *v, int part, int parts) {    /* x split into even/odd, group sums */
    layer_job *j = v;
    const int ng = j->h / j->g, gb = j->g / 2;
    if (part) return;               /* H floats: not worth a split */
    for (int k = 0; k < ng; k++) {
        float s = 0.f;
        for (int i = 0; i < gb; i++) {
            int c = k * gb + i;
            j->xe[c] = j->x[2 * c];
            j->xd[c] = j->x[2 * c + 1] - 16.f * j->x[2 * c];
            s += j->x[2 * c] + j->x[2 * c + 1];
        }
        j->xg[k] = s;
    }
}

/* The row stages hand out chunks of rows through an atomic counter: each thread streams a chunk's
 * contiguous bytes (32 KB: 32 gate_up rows or 128 down rows at the 80B model's widths), and a
 * thread that the system holds up (a core shared with other work, the thread driving the GPU)
 * delays the layer by one chunk at most, not by its whole share. */
#define CHUNK_BYTES 32768

static inline int take(layer_job *j, int total, int chunk, int *a, int *b) {
    *a = __atomic_fetch_add(&j->next, chunk, __ATOMIC_RELAXED);
    *b = *a + chunk < total ? *a + chunk : total;
    return *a < total;
}

static inline int chunk_rows(int row_bytes) {
    int r = CHUNK_BYTES / row_bytes;
    r = r / ROWS * ROWS;
    return r < ROWS ? ROWS : r;
}

/* rows [0, n x rows) of the n experts' projection q/s/z (expert ids[k]'s rows at k x rows) into
 * out, one chunk after another; expert k's input is xe/xd + k x per_k and its group sums
 * xs + k x per_k / (g/2) (per_k 0: one input for all) */
static void expert_rows(layer_job *j, const uint8_t *q, const uint16_t *s, const uint8_t *z, int rows, int c,
                        const float *xe, const float *xd, const float *xs, int per_k, float *out) {
    const int hb = c / 2, ng = c / j->g, chunk = chunk_rows(hb);
    int a, b;
    while (take(j, j->n * rows, chunk, &a, &b)) {
        while (a < b) {                     /* a chunk may end one expert and begin the next */
            int k = a / rows, row = a % rows, m = rows - row < b - a ? rows - row : b - a;
            int64_t first = (int64_t)j->ids[k] * rows + row, xk = (int64_t)k * per_k;
            rows_dot(q + first * hb, s + first * ng, z ? z + first * ng : NULL, j->f16, m, xe + xk, xd + xk,
                     xs + xk / (j->g / 2), c, j->g, out + a);
            a += m;
        }
    }
}

static void stage_gate_up(void *v, int part, int parts) {   /* every expert sees the same input */
    layer_job *j = v;
    (void)part, (void)parts;
    expert_rows(j, j->guq, j->gus, j->guz, 2 * j->inter, j->h, j->xe, j->xd, j->xg, 0, j->hid);
}

static void stage_act(void *v, int part, int parts) {      /* silu(gate) * up, split like the input */
    layer_job *j = v;
    const int per = j->inter / j->g, gb = j->g / 2;
    int a, b;
    span(j->n * per, part, parts, &a, &b);
    for (int k = a; k < b; k++) {
        int e = k / per, grp = k % per;
        const float *gate = j->hid + (int64_t)e * 2 * j->inter, *up = gate + j->inter;
        float s = 0.f;
        for (int i = 0; i < gb; i++) {
            int c = grp * gb + i;
            float g0 = gate[2 * c], g1 = gate[2 * c + 1];
            float v0 = g0 / (1.f + __builtin_expf(-g0)) * up[2 * c];
            float v1 = g1 / (1.f + __builtin_expf(-g1)) * up[2 * c + 1];
            j->ae[e * (j->inter / 2) + c] = v0;
            j->ad[e * (j->inter / 2) + c] = v1 - 16.f * v0;
            s += v0 + v1;
        }
        j->ag[k] = s;
    }
}

static void stage_down(void *v, int part, int parts) {      /* each expert's own input: [n, H] */
    layer_job *j = v;
    (void)part, (void)parts;
    expert_rows(j, j->dnq, j->dns, j->dnz, j->h, j->inter, j->ae, j->ad, j->ag, j->inter / 2, j->ydn);
}

static void stage_sum(void *v, int part, int parts) {       /* out = sum_k w[k] y_k */
    layer_job *j = v;
    int a, b;
    span(j->h, part, parts, &a, &b);
    for (int r = a; r < b; r++) {
        float acc = 0.f;
        for (int k = 0; k < j->n; k++) acc += j->w[k] * j->ydn[(int64_t)k * j->h + r];
        j->out[r] = acc;
    }
}

static void run_layer(pool_t *p, layer_job *j, float *scratch) {
    j->xe = scratch;
    j->xd = j->xe + j->h / 2;
    j->xg = j->xd + j->h / 2;
    j->hid = j->xg + j->h / j->g;
    j->ae = j->hid + (int64_t)j->n * 2 * j->inter;
    j->ad = j->ae + (int64_t)j->n * j->inter / 2;
    j->ag = j->ad + (int64_t)j->n * j->inter / 2;
    j->ydn = j->ag + (int64_t)j->n * (j->inter / j->g);
    if (j->n == 0) {
        memset(j->out, 0, sizeof(float) * j->h);
        return;
    }
    pool_run(p, stage_input, j);
    j->next = 0;
    pool_run(p, stage_gate_up, j);
    pool_run(p, stage_act, j);
    j->next = 0;
    pool_run(p, stage_down, j);
    pool_run(p, stage_sum, j);
}

static int64_t scratch_floats(int h, int inter, int g, int k) {
    return h + h / g + (int64_t)k * (2 * inter + inter + inter / g + h) + 64;
}

/* ---- the entry points -------------------------------------------------------------------------- */
typedef struct {
    pool_t *pool;
    float *scratch;
    int h, inter, g, kmax;
} engine_t;

void *engine_new(int threads, int h, int inter, int g, int kmax) {
    engine_t *e = calloc(1, sizeof(engine_t));
    e->pool = pool_new(threads);
    e->h = h;
    e->inter = inter;
    e->g = g;
    e->kmax = kmax;
    e->scratch = calloc(scratch_floats(h, inter, g, kmax), sizeof(float));
    return e;
}

void engine_free(void *v) {
    engine_t *e = v;
    pool_free(e->pool);
    free(e->scratch);
    free(e);
}

int engine_threads(void *v) { return ((engine_t *)v)->pool->n; }

/* the instructions this build's widening uses */
const char *kernel_isa(void) {
#if defined(__AVX512F__)
    return "AVX-512";
#elif defined(__AVX2__)
    return "AVX2";
#elif defined(__ARM_NEON)
    return "NEON";
#else
    return "scalar widening";
#endif
}

/* out[H] = the weighted sum of experts ids[0..n) of one layer (n <= kmax) */
void experts_layer(void *v, const float *x, int n, const int32_t *ids, const float *w, const void *guq,
                   const void *gus, const void *dnq, const void *dns, float *out) {
    engine_t *e = v;
    layer_job j = {e->h, e->inter, e->g, n, x, ids, w, guq, gus, dnq, dns, out};
    run_layer(e->pool, &j, e->scratch);
}

/* the same with zero points (guz, dnz: NULL for none) and fp16 scales (f16) */
void experts_layer_ext(void *v, const float *x, int n, const int32_t *ids, const float *w, const void *guq,
                       const void *gus, const void *guz, const void *dnq, const void *dns, const void *dnz, int f16,
                       float *out) {
    engine_t *e = v;
    layer_job j = {e->h, e->inter, e->g, n, x, ids, w, guq, gus, dnq, dns, out};
    j.guz = guz;
    j.dnz = dnz;
    j.f16 = f16;
    run_layer(e->pool, &j, e->scratch);
}

/* ---- the hybrid decode step's CPU side ------------------------------------------------------- */
typedef struct {
    engine_t *eng;
    int layers, kmax;
    const int64_t *guq, *gus, *dnq, *dns;   /* per layer: addresses of the store's tensors */
    volatile int32_t *ready, *done;         /* [L]: the token's number once published / served */
    const float *x;                          /* [L, H] */
    const int32_t *ids, *n;                  /* [L, K], [L] */
    const float *w;                          /* [L, K] */
    float *y;                                /* [L, H] */
    int64_t *times;                          /* [L, 2]: start and end of each layer's work, ns */
    int64_t timeout_ns;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int armed, stop, timeouts;
    const int64_t *guz, *dnz;                /* per layer: zero points' addresses, or NULL (none) */
    int f16;
} worker_t;

static void *worker_main(void *v) {
    worker_t *w = v;
    int served = 0;
    for (;;) {
        pthread_mutex_lock(&w->mu);
        while (!w->stop && w->armed == served) pthread_cond_wait(&w->cv, &w->mu);
        if (w->stop) {
            pthread_mutex_unlock(&w->mu);
            return NULL;
        }
        int seq = w->armed;
        pthread_mutex_unlock(&w->mu);
        served = seq;
        for (int l = 0; l < w->layers; l++) {
            int64_t t0 = now_ns();
            while (__atomic_load_n(&w->ready[l], __ATOMIC_ACQUIRE) != seq) {
                if (w->stop) return NULL;
                if (now_ns() - t0 > w->timeout_ns) {   /* the GPU gave up on this token */
                    w->timeouts++;
                    goto next;
                }
                cpu_relax();
            }
            int64_t t1 = now_ns();
            int n = w->n[l];
            if (n > 0) {
                engine_t *e = w->eng;
                layer_job j = {e->h, e->inter, e->g, n, w->x + (int64_t)l * e->h, w->ids + l * w->kmax,
                               w->w + l * w->kmax, (const void *)w->guq[l], (const void *)w->gus[l],
                               (const void *)w->dnq[l], (const void *)w->dns[l], w->y + (int64_t)l * e->h};
                j.guz = w->guz ? (const void *)w->guz[l] : NULL;
                j.dnz = w->dnz ? (const void *)w->dnz[l] : NULL;
                j.f16 = w->f16;
                run_layer(e->pool, &j, e->scratch);
            }
            w->times[2 * l] = t1;
            w->times[2 * l + 1] = now_ns();
            __atomic_store_n(&w->done[l], seq, __ATOMIC_RELEASE);
        }
    next:;
    }
}

void *worker_new(void *eng, int layers, int kmax, const int64_t *guq, const int64_t *gus, const int64_t *dnq,
                 const int64_t *dns, int32_t *ready, int32_t *done, const float *x, const int32_t *ids,
                 const int32_t *n, const float *wts, float *y, int64_t *times, int64_t timeout_ns) {
    worker_t *w = calloc(1, sizeof(worker_t));
    w->eng = eng;
    w->layers = layers;
    w->kmax = kmax;
    w->guq = guq;
    w->gus = gus;
    w->dnq = dnq;
    w->dns = dns;
    w->ready = ready;
    w->done = done;
    w->x = x;
    w->ids = ids;
    w->n = n;
    w->w = wts;
    w->y = y;
    w->times = times;
    w->timeout_ns = timeout_ns;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    pthread_create(&w->th, NULL, worker_main, w);
    return w;
}

/* zero points (per-layer addresses, or NULL) and fp16 scales; before the first worker_arm */
void worker_set_ext(void *v, const int64_t *guz, const int64_t *dnz, int f16) {
    worker_t *w = v;
    w->guz = guz;
    w->dnz = dnz;
    w->f16 = f16;
}

/* the next token is number seq: serve its layers as the GPU publishes them */
void worker_arm(void *v, int seq) {
    worker_t *w = v;
    pthread_mutex_lock(&w->mu);
    w->armed = seq;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

int worker_timeouts(void *v) { return ((worker_t *)v)->timeouts; }

void worker_free(void *v) {
    worker_t *w = v;
    pthread_mutex_lock(&w->mu);
    w->stop = 1;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->th, NULL);
    free(w);
}
