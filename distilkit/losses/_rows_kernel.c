/* distilkit CPU kernel: per-row logit divergences and their closed-form gradients in one sweep per row.
 *
 * For each kept row r of the [n, v] float32 logits s (student) and t (teacher), with x = z / T:
 *   rows[r] = rscale[r] * D(softmax(x_s) || softmax(x_t)),   grad[r, :] = gscale[r] * dD/dx_s.
 * The formulas are those of the divergence table, distilkit/losses/_table.py, which also numbers the kinds: the
 * build passes -DKD_CE=0 -DKD_KL=1 ... (distilkit/losses/_cpu_kernel.py, DEFINES). A row is read
 * from memory once (its maxima); the exponentials and the gradient then work on the row while it sits in the
 * cache: two exp per element (plus one log for jsd / skew_kl), the logits read once, the gradient written once.
 * Dropped rows get 0 and a zero gradient without reading their logits. Rows are split over nthreads threads.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#if !defined(KD_CE) || !defined(KD_KL) || !defined(REVERSE_KL) || !defined(JSD) || !defined(SKEW_KL) || !defined(TVD)
#error "build through distilkit/losses/_cpu_kernel.py: it defines the kind numbers from the divergence table"
#endif

typedef struct {
    const float *s, *t;
    float *grad, *rows;
    const float *inv_temp, *gscale, *rscale; /* [n] or [1] (stride 0) */
    int64_t temp_stride, gscale_stride, rscale_stride;
    const uint8_t *keep; /* [n] or NULL */
    int64_t v, lds, ldt, ldg;
    int kind, stream;
    float param;
    int64_t begin, end;
    float *work; /* 2 v floats, this thread's */
} job_t;

/* exp(x) for x <= 0, flushed to 0 below -87 (a float32 normal stays normal): Cody-Waite reduction and a degree-6
 * Taylor polynomial on |r| <= ln2/2 (relative error about 2e-7). Branch-free, so the loops vectorise. */
static inline float dk_exp(float x) {
    float xc = x < -87.0f ? -87.0f : x;
    float k = __builtin_rintf(xc * 1.44269504088896341f);
    float r = xc - k * 0.693145751953125f;
    r = r - k * 1.42860682030941723e-06f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.0f ? 0.0f : p * scale;
}

/* log(x) for normal x > 0: x = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh((m-1)/(m+1)) by its series. */
static inline float dk_log(float x) {
    int32_t bits;
    memcpy(&bits, &x, sizeof bits);
    int32_t e = ((bits >> 23) & 0xff) - 127;
    int32_t mbits = (bits & 0x007fffff) | 0x3f800000;
    float m;
    memcpy(&m, &mbits, sizeof m);
    int big = m > 1.41421356f;
    m = big ? 0.5f * m : m;
    float ef = (float)(e + big);
    float f = (m - 1.0f) / (m + 1.0f);
    float f2 = f * f;
    float q = 1.0f / 11.0f;
    q = q * f2 + 1.0f / 9.0f;
    q = q * f2 + 1.0f / 7.0f;
    q = q * f2 + 1.0f / 5.0f;
    q = q * f2 + 1.0f / 3.0f;
    q = q * f2 + 1.0f;
    return 2.0f * f * q + ef * 0.693147180559945309f;
}

/* Both maxima in one read. Only this loop assumes finite-math (so gcc may turn the selects into vector max
 * instructions, which order infinities correctly); the rest of the file keeps IEEE semantics for inf. */
__attribute__((optimize("finite-math-only"))) static void row_max(const float *restrict s,
                                                                 const float *restrict t, int64_t v,
                                                                 float *ms_out, float *mt_out) {
    float ms = s[0], mt = t[0];
    for (int64_t i = 0; i < v; i++) {
        ms = s[i] > ms ? s[i] : ms;
        mt = t[i] > mt ? t[i] : mt;
    }
    *ms_out = ms;
    *mt_out = mt;
}

#define BLOCK 1024

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

/* dst[0:n] = src[0:n] with non-temporal stores where the instruction set has them: the destination is written
 * without being read first (no read-for-ownership) and without evicting the row from the cache. */
static void stream_copy(float *restrict dst, const float *restrict src, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i < n && ((uintptr_t)(dst + i) & 63); i++) dst[i] = src[i];
    for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
#elif defined(__AVX__)
    for (; i < n && ((uintptr_t)(dst + i) & 31); i++) dst[i] = src[i];
    for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
#endif
    for (; i < n; i++) dst[i] = src[i];
}

static void store_fence(void) {
#if defined(__AVX512F__) || defined(__AVX__)
    _mm_sfence();
#endif
}

/* The last sweep of a row: g[i] = expr (the gradient), block by block; streamed out when g is a row buffer. */
#define FINAL(expr)                                                    \
    for (int64_t b0 = 0; b0 < v; b0 += BLOCK) {                        \
        const int64_t e0 = b0 + BLOCK < v ? b0 + BLOCK : v;            \
        for (int64_t i = b0; i < e0; i++) g[i] = (expr);               \
        if (g != out) stream_copy(out + b0, g + b0, e0 - b0);          \
    }

static void one_row(const job_t *j, int64_t r, const float *next_s, const float *next_t) {
    const float *restrict s = j->s + r * j->lds, *restrict t = j->t + r * j->ldt;
    /* e_T and then a go into w, this thread's row buffer. e_S goes into g: a second row buffer when the gradient's
     * memory is already paged in (``stream``: each gradient row is then written once, with streaming stores), or
     * the gradient's row itself, overwritten in place by the last sweep, when the memory is fresh (the page fault
     * zeroes the page through the cache anyway; measured faster than streaming stores there). */
    const int64_t v = j->v;
    float *out = j->grad + r * j->ldg, *restrict w = j->work, *g = j->stream ? j->work + v : out;
    if (j->keep && !j->keep[r]) {
        memset(out, 0, (size_t)v * sizeof(float));
        j->rows[r] = 0.0f;
        return;
    }
    const float it = j->inv_temp[r * j->temp_stride];
    const float gs = j->gscale[r * j->gscale_stride];
    float ms, mt;
    row_max(s, t, v, &ms, &mt);
    /* e_S -> g, e_T -> w, with the sums and the one-pass dot products; x' = (z - max) / T. The sweep goes in
     * blocks, each also prefetching the same block of the next row, so that row's maxima read the cache, not
     * memory, and the memory traffic overlaps the arithmetic. */
    float ss = 0.0f, st = 0.0f, dot = 0.0f;
    float infinite = 0.0f, lost = 0.0f; /* reverse_kl: its infinite terms, and the student's mass on them */
    const int kind = j->kind;
    for (int64_t b = 0; b < v; b += BLOCK) {
        const int64_t e = b + BLOCK < v ? b + BLOCK : v;
        if (next_s) {
            for (int64_t i = b; i < e; i += 16) {
                __builtin_prefetch(next_s + i);
                __builtin_prefetch(next_t + i);
            }
        }
        float bs = 0.0f, bt = 0.0f, bd = 0.0f;
        if (kind == KD_CE) {
            for (int64_t i = b; i < e; i++) {
                float xs = (s[i] - ms) * it, et = dk_exp((t[i] - mt) * it), es = dk_exp(xs);
                g[i] = es; w[i] = et; bs += es; bt += et; bd += et > 0.0f ? et * xs : 0.0f; /* 0 log 0 = 0 */
            }
        } else if (kind == KD_KL || kind == REVERSE_KL) {
            /* kd_kl: <e_T, x'_T - x'_S>; reverse_kl: <e_S, x'_S - x'_T>; 0 where the weight is 0 (-inf logits). */
            const int rev = kind == REVERSE_KL;
            for (int64_t i = b; i < e; i++) {
                float xs = (s[i] - ms) * it, xt = (t[i] - mt) * it, et = dk_exp(xt), es = dk_exp(xs);
                float p = rev ? es : et, d = rev ? xs - xt : xt - xs;
                g[i] = es; w[i] = et; bs += es; bt += et; bd += p > 0.0f ? p * d : 0.0f;
            }
        } else {
            for (int64_t i = b; i < e; i++) {
                float es = dk_exp((s[i] - ms) * it), et = dk_exp((t[i] - mt) * it);
                g[i] = es; w[i] = et; bs += es; bt += et;
            }
        }
        ss += bs; st += bt; dot += bd;
    }
    if (kind == REVERSE_KL && !isfinite(dot)) {
        /* A term where the teacher is -inf and the student is not: +inf. Rare, so counted here in a second pass
         * rather than in the sweep above: such terms are left out of the dot product (they add nothing to the
         * gradient: the divergence table's rule), and the student's mass on them is kept for the finite part. */
        dot = 0.0f;
        for (int64_t i = 0; i < v; i++) {
            if (g[i] <= 0.0f) continue;
            if (t[i] == -INFINITY) {
                infinite += 1.0f; lost += g[i];
            } else {
                dot += g[i] * ((s[i] - ms) * it - (t[i] - mt) * it);
            }
        }
    }
    const float lss = logf(ss), lst = logf(st), rs = 1.0f / ss, rt = 1.0f / st;
    float row;
    if (kind == KD_CE || kind == KD_KL) {
        /* kd_ce: -sum p_T log p_S = log ss - <p_T, x'_S>;  kd_kl: <p_T, x'_T - x'_S> - log st + log ss. */
        row = kind == KD_CE ? lss - dot * rt : dot * rt - lst + lss;
        FINAL(gs * (g[i] * rs - w[i] * rt));
    } else if (kind == REVERSE_KL) {
        const float finite_row = dot * rs + (lst - lss) * (infinite > 0.0f ? (ss - lost) * rs : 1.0f);
        row = infinite > 0.0f ? INFINITY : finite_row;
        const float c = lst - lss - finite_row; /* grad = p_S (log p_S - log p_T - row) over the finite terms */
        /* 0 where p_S = 0 (a -inf student logit would give 0 * -inf); an infinite term's log-ratio counts as 0. */
        if (infinite > 0.0f) { /* (rare) */
            FINAL(g[i] > 0.0f ? gs * (g[i] * rs) * (t[i] == -INFINITY ? -finite_row : (s[i] - ms - (t[i] - mt)) * it
                                                                                      + c) : 0.0f);
        } else {
            FINAL(g[i] > 0.0f ? gs * (g[i] * rs) * ((s[i] - ms - (t[i] - mt)) * it + c) : 0.0f);
        }
    } else {
        /* tvd / jsd / skew_kl: rows and a = d row / d p_S in one more sweep (a kept in w), then
         * grad = p_S (a - <p_S, a>). */
        float acc = 0.0f, pa = 0.0f;
        const float b = j->param, nb = 1.0f - j->param;
        if (kind == TVD) {
            for (int64_t i = 0; i < v; i++) {
                float ps = g[i] * rs, d = ps - w[i] * rt;
                float a = d > 0.0f ? 0.5f : (d < 0.0f ? -0.5f : 0.0f);
                acc += d > 0.0f ? d : -d; w[i] = a; pa += ps * a;
            }
            acc *= 0.5f;
        } else if (kind == JSD) { /* b KL(p_T || m) + (1-b) KL(p_S || m), m = b p_T + (1-b) p_S */
            for (int64_t i = 0; i < v; i++) {
                float ps = g[i] * rs, pt = w[i] * rt, mix = b * pt + nb * ps;
                float lm = mix > 0.0f ? dk_log(mix) : 0.0f;
                float ls = (s[i] - ms) * it - lss, lt = (t[i] - mt) * it - lst;
                float a = nb * (ls - lm);
                acc += (pt > 0.0f ? b * pt * (lt - lm) : 0.0f) + (ps > 0.0f ? ps * a : 0.0f);
                w[i] = a; pa += ps > 0.0f ? ps * a : 0.0f;
            }
        } else { /* SKEW_KL: KL(p_T || m), m = a p_T + (1-a) p_S */
            for (int64_t i = 0; i < v; i++) {
                float ps = g[i] * rs, pt = w[i] * rt, mix = b * pt + nb * ps;
                float lm = mix > 0.0f ? dk_log(mix) : 0.0f;
                float lt = (t[i] - mt) * it - lst;
                float a = pt > 0.0f ? -nb * pt / mix : 0.0f;
                acc += pt > 0.0f ? pt * (lt - lm) : 0.0f;
                w[i] = a; pa += ps * a;
            }
        }
        row = acc;
        /* 0 where p_S = 0: jsd's a is -inf there (a -inf student logit). */
        FINAL(g[i] > 0.0f ? gs * (g[i] * rs) * (w[i] - pa) : 0.0f);
    }
    j->rows[r] = j->rscale[r * j->rscale_stride] * row;
}

static void *run_job(void *arg) {
    job_t *j = (job_t *)arg;
    for (int64_t r = j->begin; r < j->end; r++) {
        const int next = r + 1 < j->end && !(j->keep && !j->keep[r + 1]);
        one_row(j, r, next ? j->s + (r + 1) * j->lds : NULL, next ? j->t + (r + 1) * j->ldt : NULL);
    }
    if (j->stream) store_fence();
    return NULL;
}

/* Ask for transparent huge pages on the (not yet touched) gradient: first writes to fresh 4 KiB pages cost
 * more than the whole kernel otherwise. Harmless where THP is off. */
static void advise_huge(void *p, size_t bytes) {
    const uintptr_t huge = (uintptr_t)1 << 21;
    uintptr_t lo = ((uintptr_t)p + huge - 1) & ~(huge - 1), hi = ((uintptr_t)p + bytes) & ~(huge - 1);
    if (hi > lo) madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
}

/* ``flags``: 1 = advise huge pages for the gradient (fresh memory), 2 = stream the gradient rows out (memory
 * already paged in). Returns 0, or -1 when the row buffers could not be allocated. */
int dk_rows_grad(const float *s, const float *t, float *grad, float *rows, const float *inv_temp,
                 int64_t temp_stride, const float *gscale, int64_t gscale_stride, const float *rscale,
                 int64_t rscale_stride, const uint8_t *keep, int64_t n, int64_t v, int64_t lds, int64_t ldt,
                 int64_t ldg, int kind, float param, int nthreads, int flags) {
    if (flags & 1) advise_huge(grad, (size_t)n * (size_t)ldg * sizeof(float));
    if (nthreads < 1) nthreads = 1;
    if (nthreads > n) nthreads = (int)(n > 0 ? n : 1);
    if (nthreads > 256) nthreads = 256;
    job_t jobs[256];
    pthread_t threads[256];
    float *work = (float *)malloc((size_t)nthreads * 2 * (size_t)v * sizeof(float));
    if (!work) return -1;
    for (int k = 0; k < nthreads; k++) {
        job_t j = {s, t, grad, rows, inv_temp, gscale, rscale, temp_stride, gscale_stride, rscale_stride, keep,
                   v, lds, ldt, ldg, kind, (flags & 2) != 0, param, n * k / nthreads, n * (k + 1) / nthreads,
                   work + (size_t)k * 2 * v};
        jobs[k] = j;
    }
    int started[256] = {0};
    for (int k = 1; k < nthreads; k++) started[k] = pthread_create(&threads[k], NULL, run_job, &jobs[k]) == 0;
    run_job(&jobs[0]);
    for (int k = 1; k < nthreads; k++) {
        if (started[k]) pthread_join(threads[k], NULL);
        else run_job(&jobs[k]); /* no thread: do its rows here */
    }
    free(work);
    return 0;
}
