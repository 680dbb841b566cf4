/* CPU implementation of the lmcache paged-KV transfer ABI (see lmcache_kernels.h). */
#include "lmcache_kernels.h"
#include "lmcache_check.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
/* x86-64 streams with SSE2, which every x86-64 CPU has (AVX2's wider stores gained
 * nothing measurable on a copy bound by memory); elsewhere, or built with
 * -DLMC_NO_STREAMING, every copy is a memcpy. */
#if defined(__x86_64__) && !defined(LMC_NO_STREAMING)
#define LMC_X86_STREAMING 1
#include <immintrin.h>
#else
#define LMC_X86_STREAMING 0
#endif

int lmc_abi_version(void) { return LMC_ABI_VERSION; }

/*
 * Streaming (non-temporal) stores for large copies.
 *
 * Why: a KV chunk is copied as thousands of runs of a few KiB (a block's rows of
 * one layer). memcpy of a run that small uses ordinary stores, so every
 * destination line is first read into the cache (read for ownership) and later
 * written back: about twice the memory traffic of the copy. A single large
 * memcpy avoids that with streaming stores: copied run by run (32 KiB runs), a
 * chunk went at 0.55 of one 512 MiB memcpy per thread, and at 0.9-1.0 with
 * streaming stores (2-core AMD EPYC; `lmcache bench core` went from 0.8 to 1.0-1.1).
 *
 * When: a copy of at least LMC_STREAM_MIN_BYTES in all (a chunk of any real
 * model): its destination would not stay in the cache until it is read anyway
 * (a store's is the cache's slot; a load's is a prefix the forward pass reads
 * layer by layer after every chunk is in). Smaller copies (one layer of a
 * layer-wise load, a short tail) keep ordinary stores, so KV the engine reads
 * right after is still cached. Not derived from the last-level cache's size:
 * VMs report the whole host socket's (256 MiB on this 2-core guest).
 * LMCACHE_CPU_STREAM_MIN_BYTES overrides the threshold: a decimal number of
 * bytes, read once per process at its first copy; a negative number turns
 * streaming off; any other text is ignored (the default stays).
 * Only whole 64-byte lines of a run are streamed (a partial line streamed
 * costs a read-modify-write in memory); its head and tail use memcpy.
 */
#define LMC_STREAM_MIN_BYTES ((int64_t)4 << 20)
static int64_t stream_min_bytes = LMC_STREAM_MIN_BYTES;
static pthread_once_t stream_once = PTHREAD_ONCE_INIT;
static uint64_t streamed_bytes;

uint64_t lmc_cpu_streamed_bytes(void) { return __atomic_load_n(&streamed_bytes, __ATOMIC_RELAXED); }

static void stream_init(void) {
    const char *env = getenv("LMCACHE_CPU_STREAM_MIN_BYTES");
    char *end = NULL;
    long long v = env && *env ? strtoll(env, &end, 10) : 0;
    if (env && *env && end && *end == '\0') stream_min_bytes = v < 0 ? -1 : (int64_t)v;
}

#if LMC_X86_STREAMING
#define LMC_STREAMING 1
#define LMC_LINE 64

static void stream_lines_sse2(char *d, const char *s, uint64_t n) {
    for (uint64_t i = 0; i < n; i += LMC_LINE) {
        __m128i a = _mm_loadu_si128((const __m128i *)(s + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(s + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(s + i + 32));
        __m128i e = _mm_loadu_si128((const __m128i *)(s + i + 48));
        _mm_stream_si128((__m128i *)(d + i), a);
        _mm_stream_si128((__m128i *)(d + i + 16), b);
        _mm_stream_si128((__m128i *)(d + i + 32), c);
        _mm_stream_si128((__m128i *)(d + i + 48), e);
    }
}

/* memcpy with the destination's whole 64-byte lines written by streaming stores;
 * returns the bytes streamed. */
static uint64_t copy_streaming(char *d, const char *s, uint64_t n) {
    uint64_t head = (uint64_t)(-(uintptr_t)d) & (LMC_LINE - 1);
    if (n < head + 4 * LMC_LINE) { /* too short to be worth it */
        memcpy(d, s, n);
        return 0;
    }
    memcpy(d, s, head);
    d += head, s += head, n -= head;
    uint64_t body = n & ~(uint64_t)(LMC_LINE - 1);
    stream_lines_sse2(d, s, body);
    memcpy(d + body, s + body, n - body);
    return body;
}

static void stream_fence(void) { _mm_sfence(); }
#else
#define LMC_STREAMING 0
static uint64_t copy_streaming(char *d, const char *s, uint64_t n) {
    memcpy(d, s, n);
    return 0;
}
static void stream_fence(void) {}
#endif

/* One run of a copy; returns the bytes written by streaming stores. */
static inline uint64_t copy_run(char *d, const char *s, uint64_t n, int streaming) {
    if (streaming) return copy_streaming(d, s, n);
    memcpy(d, s, n);
    return 0;
}

typedef struct {
    const lmc_paged *p;
    const int64_t *table;
    uint64_t row_lo, row_hi, chunk_row0, chunk_rows;
    char *chunk;
    int to_chunk, streaming;
    uint32_t plane_lo, plane_hi;
} job_t;

static void copy_planes(const job_t *j) {
    const lmc_paged *p = j->p;
    const uint64_t rpb = p->rows_per_block, rb = p->row_bytes;
    const uint64_t segs = p->row_segments > 1 ? p->row_segments : 1, sb = rb / segs;
    /* Rows of a block are one run when they are packed back to back. */
    const int packed = segs == 1 && (rpb == 1 || p->row_stride == rb);
    uint64_t streamed = 0;
    for (uint32_t pl = j->plane_lo; pl < j->plane_hi; pl++) {
        char *base = (char *)(uintptr_t)p->plane_base[pl];
        char *rows = j->chunk + ((uint64_t)pl * j->chunk_rows + (j->row_lo - j->chunk_row0)) * rb;
        uint64_t r = j->row_lo;
        while (r < j->row_hi) {
            uint64_t b = r / rpb, off = r % rpb;
            uint64_t n = rpb - off;
            if (n > j->row_hi - r) n = j->row_hi - r;
            char *blk = base + (uint64_t)j->table[b] * p->block_stride;
            if (packed) {
                char *src = blk + off * rb;
                if (j->to_chunk)
                    streamed += copy_run(rows, src, n * rb, j->streaming);
                else
                    streamed += copy_run(src, rows, n * rb, j->streaming);
            } else {
                for (uint64_t i = 0; i < n; i++) {
                    char *src = blk + (off + i) * p->row_stride;
                    for (uint64_t sg = 0; sg < segs; sg++) {
                        char *a = src + sg * p->segment_stride, *c = rows + i * rb + sg * sb;
                        if (j->to_chunk)
                            streamed += copy_run(c, a, sb, j->streaming);
                        else
                            streamed += copy_run(a, c, sb, j->streaming);
                    }
                }
            }
            rows += n * rb;
            r += n;
        }
    }
    /* Streaming stores are weakly ordered: drain them before the copy is reported done. */
    if (j->streaming) {
        stream_fence();
        __atomic_fetch_add(&streamed_bytes, streamed, __ATOMIC_RELAXED);
    }
}

static void *run_job(void *arg) {
    copy_planes((const job_t *)arg);
    return NULL;
}

#define LMC_MAX_THREADS 16

static int run(const lmc_paged *p, const int64_t *table, uint64_t table_len, uint64_t row_lo,
               uint64_t row_hi, char *chunk, uint64_t chunk_row0, uint64_t chunk_rows,
               int threads, int to_chunk) {
    int rc = lmc_check(p, table, table_len, row_lo, row_hi, chunk_row0, chunk_rows, 1);
    if (rc != LMC_OK || row_lo == row_hi) return rc;
    if (!chunk) return LMC_EINVAL;
    if (threads <= 0) threads = 4;
    if (threads > LMC_MAX_THREADS) threads = LMC_MAX_THREADS;
    if ((uint32_t)threads > p->num_planes) threads = (int)p->num_planes;
    /* Small copies are not worth a thread start. */
    const uint64_t total = (row_hi - row_lo) * p->row_bytes * p->num_planes;
    if (total < (1u << 20)) threads = 1;
    pthread_once(&stream_once, stream_init);
    const int streaming =
        LMC_STREAMING && stream_min_bytes >= 0 && total >= (uint64_t)stream_min_bytes;
    job_t jobs[LMC_MAX_THREADS];
    pthread_t tids[LMC_MAX_THREADS];
    int started[LMC_MAX_THREADS] = {0};
    for (int t = 0; t < threads; t++) {
        jobs[t] = (job_t){p, table, row_lo, row_hi, chunk_row0, chunk_rows, chunk, to_chunk,
                          streaming, (uint32_t)((uint64_t)p->num_planes * t / threads),
                          (uint32_t)((uint64_t)p->num_planes * (t + 1) / threads)};
    }
    for (int t = 1; t < threads; t++)
        started[t] = pthread_create(&tids[t], NULL, run_job, &jobs[t]) == 0;
    copy_planes(&jobs[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t])
            pthread_join(tids[t], NULL);
        else
            copy_planes(&jobs[t]); /* no thread: do its share here */
    }
    return LMC_OK;
}

int lmc_cpu_gather(const lmc_paged *p, const int64_t *table, uint64_t table_len, uint64_t row_lo,
                   uint64_t row_hi, void *chunk, uint64_t chunk_row0, uint64_t chunk_rows,
                   int threads) {
    return run(p, table, table_len, row_lo, row_hi, (char *)chunk, chunk_row0, chunk_rows,
               threads, 1);
}

int lmc_cpu_scatter(const lmc_paged *p, const int64_t *table, uint64_t table_len,
                    uint64_t row_lo, uint64_t row_hi, const void *chunk, uint64_t chunk_row0,
                    uint64_t chunk_rows, int threads) {
    return run(p, table, table_len, row_lo, row_hi, (char *)(uintptr_t)chunk, chunk_row0,
               chunk_rows, threads, 0);
}
