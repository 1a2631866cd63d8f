/* Routed int4 experts computed by the CPU, straight from the expert store (moe-offload).
 *
 * The store's int4 layout (quant.py): per expert and projection, rows of C/2 bytes (low nibble =
 * even column, high = odd, value q + 8) and bf16 scales [R, C/G]. The GPU's kernels read the same
 * bytes, so there is one copy of every expert in host memory.
 *
 * experts_layer(): one token, n experts of one layer: out[H] = sum_j w[j] * down_j(silu(g_j) * u_j)
 * with [g_j, u_j] = gate_up_j x. Rows are split over a pool of threads that spin while there is
 * work and sleep when there is none. A row's dot product is sum_g s[g] * (sum_i lo_i xe_i + hi_i
 * xo_i - 8 * sum(x over g)): the inner loop is byte -> float conversions and FMAs the compiler
 * vectorises, so one core keeps up with several GB/s of weights.
 *
 * Experts of an int4 checkpoint may carry per-group zero points (uint8 [R, C/G]: z replaces the 8)
 * and fp16 scales: row_dot_ext reads them, chosen once per row, so the symmetric bf16 path is the
 * same code as before.
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

/* one group's sum of nibble * x: hb packed bytes against the split input */
static inline float group_dot(const uint8_t *b, const float *e, const float *o, int hb) {
    float a = 0.f;
#pragma omp simd reduction(+:a)
    for (int i = 0; i < hb; i++) a += (float)(b[i] & 15) * e[i] + (float)(b[i] >> 4) * o[i];
    return a;
}

/* one row of packed int4 [C/2] with scales [C/G] against the split input */
static inline float row_dot(const uint8_t *q, const uint16_t *s, const float *xe, const float *xo,
                            const float *gs, int c, int g) {
    const int hb = g / 2;
    float acc = 0.f;
    for (int k = 0; k < c / g; k++)
        acc += bf16(s[k]) * (group_dot(q + k * hb, xe + k * hb, xo + k * hb, hb) - gs[k]);
    return acc;
}

static inline float fp16(uint16_t h) {
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

/* row_dot with zero points z [C/G] (or NULL: 8) and fp16 or bf16 scales: gs is 8 * sum(x over g) */
static float row_dot_ext(const uint8_t *q, const uint16_t *s, const uint8_t *z, int f16, const float *xe,
                         const float *xo, const float *gs, int c, int g) {
    const int hb = g / 2;
    float acc = 0.f;
    for (int k = 0; k < c / g; k++) {
        float off = z ? (float)z[k] * (0.125f * gs[k]) : gs[k];
        acc += (f16 ? fp16(s[k]) : bf16(s[k])) * (group_dot(q + k * hb, xe + k * hb, xo + k * hb, hb) - off);
    }
    return acc;
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
    float *xe, *xo, *xg;           /* [H/2], [H/2], [H/G] */
    float *hid;                    /* [n, 2I] */
    float *ae, *ao, *ag;           /* [n, I/2], [n, I/2], [n, I/G] */
    const uint8_t *guz, *dnz;      /* zero points [E, 2I, H/G], [E, H, I/G], or NULL (8) */
    int f16;                       /* scales are fp16 (else bf16) */
} layer_job;

static inline void span(int total, int part, int parts, int *a, int *b) {
    int per = (total + parts - 1) / parts;
    *a = part * per;
    *b = *a + per < total ? *a + per : total;
    if (*a > total) *a = total;
}

static void stage_input(void *v, int part, int parts) {    /* x split into even/odd, group sums */
    layer_job *j = v;
    int a, b;
    span(j->h / j->g, part, parts, &a, &b);
    for (int k = a; k < b; k++) {
        float s = 0.f;
        for (int i = 0; i < j->g / 2; i++) {
            int c = k * (j->g / 2) + i;
            j->xe[c] = j->x[2 * c];
            j->xo[c] = j->x[2 * c + 1];
            s += j->x[2 * c] + j->x[2 * c + 1];
        }
        j->xg[k] = 8.f * s;
    }
}

static void stage_gate_up(void *v, int part, int parts) {
    layer_job *j = v;
    const int rows = 2 * j->inter, hb = j->h / 2, ng = j->h / j->g;
    int a, b;
    span(j->n * rows, part, parts, &a, &b);
    const int ext = j->guz != NULL || j->f16;
    for (int r = a; r < b; r++) {
        int e = j->ids[r / rows], row = r % rows;
        int64_t at = (int64_t)e * rows + row;
        j->hid[r] = ext ? row_dot_ext(j->guq + at * hb, j->gus + at * ng, j->guz ? j->guz + at * ng : NULL, j->f16,
                                      j->xe, j->xo, j->xg, j->h, j->g)
                        : row_dot(j->guq + at * hb, j->gus + at * ng, j->xe, j->xo, j->xg, j->h, j->g);
    }
}

static void stage_act(void *v, int part, int parts) {      /* silu(gate) * up, split like the input */
    layer_job *j = v;
    const int per = j->inter / j->g;
    int a, b;
    span(j->n * per, part, parts, &a, &b);
    for (int k = a; k < b; k++) {
        int e = k / per, grp = k % per;
        const float *gate = j->hid + (int64_t)e * 2 * j->inter, *up = gate + j->inter;
        float s = 0.f;
        for (int i = 0; i < j->g / 2; i++) {
            int c = grp * (j->g / 2) + i;
            float g0 = gate[2 * c], g1 = gate[2 * c + 1];
            float v0 = g0 / (1.f + __builtin_expf(-g0)) * up[2 * c];
            float v1 = g1 / (1.f + __builtin_expf(-g1)) * up[2 * c + 1];
            j->ae[e * (j->inter / 2) + c] = v0;
            j->ao[e * (j->inter / 2) + c] = v1;
            s += v0 + v1;
        }
        j->ag[k] = 8.f * s;
    }
}

static void stage_down(void *v, int part, int parts) {
    layer_job *j = v;
    const int hb = j->inter / 2, ng = j->inter / j->g;
    int a, b;
    span(j->h, part, parts, &a, &b);
    const int ext = j->dnz != NULL || j->f16;
    for (int r = a; r < b; r++) {
        float acc = 0.f;
        for (int k = 0; k < j->n; k++) {
            int64_t at = (int64_t)j->ids[k] * j->h + r;
            acc += j->w[k] * (ext ? row_dot_ext(j->dnq + at * hb, j->dns + at * ng, j->dnz ? j->dnz + at * ng : NULL,
                                                j->f16, j->ae + k * hb, j->ao + k * hb, j->ag + k * ng, j->inter, j->g)
                                  : row_dot(j->dnq + at * hb, j->dns + at * ng, j->ae + k * hb, j->ao + k * hb,
                                            j->ag + k * ng, j->inter, j->g));
        }
        j->out[r] = acc;
    }
}

static void run_layer(pool_t *p, layer_job *j, float *scratch) {
    j->xe = scratch;
    j->xo = j->xe + j->h / 2;
    j->xg = j->xo + j->h / 2;
    j->hid = j->xg + j->h / j->g;
    j->ae = j->hid + (int64_t)j->n * 2 * j->inter;
    j->ao = j->ae + (int64_t)j->n * j->inter / 2;
    j->ag = j->ao + (int64_t)j->n * j->inter / 2;
    if (j->n == 0) {
        memset(j->out, 0, sizeof(float) * j->h);
        return;
    }
    pool_run(p, stage_input, j);
    pool_run(p, stage_gate_up, j);
    pool_run(p, stage_act, j);
    pool_run(p, stage_down, j);
}

static int64_t scratch_floats(int h, int inter, int g, int k) {
    return h + h / g + (int64_t)k * (2 * inter + inter + inter / g) + 64;
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
