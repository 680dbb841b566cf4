/* Argument checks shared by the CPU and CUDA launchers: run before any copy. */
#ifndef LMCACHE_CHECK_H
#define LMCACHE_CHECK_H

#include "lmcache_kernels.h"

/* Shared by CPU and CUDA launchers: every check happens before any copy. */
static inline int lmc_check(const lmc_paged *p, const int64_t *table, uint64_t table_len, uint64_t row_lo,
              uint64_t row_hi, uint64_t chunk_row0, uint64_t chunk_rows, int check_table) {
    if (!p || !p->plane_base || p->num_planes == 0 || p->row_bytes == 0 ||
        p->rows_per_block == 0)
        return LMC_EINVAL;
    if (row_lo > row_hi || row_lo < chunk_row0 || row_hi > chunk_row0 + chunk_rows)
        return LMC_EINVAL;
    if (p->row_segments > 1) {
        if (p->row_bytes % p->row_segments) return LMC_EINVAL;
        /* runs of one row must not overlap each other */
        if (p->segment_stride < p->row_bytes / p->row_segments) return LMC_EINVAL;
    } else if (p->rows_per_block > 1 && p->row_stride < p->row_bytes) {
        return LMC_EINVAL;
    }
    if (row_hi == row_lo) return LMC_OK;
    if (!table) return LMC_EINVAL;
    uint64_t last_block = (row_hi - 1) / p->rows_per_block;
    if (last_block >= table_len) return LMC_EINVAL;
    if (check_table) {
        for (uint64_t b = row_lo / p->rows_per_block; b <= last_block; b++)
            if (table[b] < 0 || (uint64_t)table[b] >= p->num_blocks) return LMC_EBLOCK;
    }
    return LMC_OK;
}

#endif
