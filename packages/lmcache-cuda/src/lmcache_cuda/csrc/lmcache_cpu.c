/* CPU implementation of the lmcache paged-KV transfer ABI (see lmcache_kernels.h). */
#include "lmcache_kernels.h"
#include "lmcache_check.h"

#include <pthread.h>
#include <string.h>

int lmc_abi_version(void) { return LMC_ABI_VERSION; }

typedef struct {
    const lmc_paged *p;
    const int64_t *table;
    uint64_t row_lo, row_hi, chunk_row0, chunk_rows;
    char *chunk;
    int to_chunk;
    uint32_t plane_lo, plane_hi;
} job_t;

static void copy_planes(const job_t *j) {
    const lmc_paged *p = j->p;
    const uint64_t rpb = p->rows_per_block, rb = p->row_bytes;
    const uint64_t segs = p->row_segments > 1 ? p->row_segments : 1, sb = rb / segs;
    /* Rows of a block are one run when they are packed back to back. */
    const int packed = segs == 1 && (rpb == 1 || p->row_stride == rb);
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
                    memcpy(rows, src, n * rb);
                else
                    memcpy(src, rows, n * rb);
            } else {
                for (uint64_t i = 0; i < n; i++) {
                    char *src = blk + (off + i) * p->row_stride;
                    for (uint64_t sg = 0; sg < segs; sg++) {
                        char *a = src + sg * p->segment_stride, *c = rows + i * rb + sg * sb;
                        if (j->to_chunk)
                            memcpy(c, a, sb);
                        else
                            memcpy(a, c, sb);
                    }
                }
            }
            rows += n * rb;
            r += n;
        }
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
    if ((row_hi - row_lo) * p->row_bytes * p->num_planes < (1u << 20)) threads = 1;
    job_t jobs[LMC_MAX_THREADS];
    pthread_t tids[LMC_MAX_THREADS];
    int started[LMC_MAX_THREADS] = {0};
    for (int t = 0; t < threads; t++) {
        jobs[t] = (job_t){p, table, row_lo, row_hi, chunk_row0, chunk_rows, chunk, to_chunk,
                          (uint32_t)((uint64_t)p->num_planes * t / threads),
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
