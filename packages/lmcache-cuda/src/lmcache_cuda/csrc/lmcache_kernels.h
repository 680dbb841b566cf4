/*
 * lmcache paged-KV transfer ABI: gather (engine paged memory -> one
 * contiguous chunk buffer) and scatter (the reverse), over raw pointers.
 *
 * No libtorch, no Python: a plain C ABI that Python binds with cffi, so an
 * upgrade of torch (or of Python) can never break it.
 *
 * Model. An engine's KV for one request is a set of *planes* (for vLLM flash
 * layouts: layer x {K, V}; MLA: one plane per layer; SGLang: the K and V
 * buffers of each layer). A plane is an array of blocks; a block holds
 * `rows_per_block` rows (tokens); a row is `row_bytes` contiguous bytes.
 * Rows of a request are numbered 0, 1, ...: row r lives in block
 * block_table[r / rows_per_block] at position r % rows_per_block.
 *
 * A chunk buffer holds rows [chunk_row0, chunk_row0 + chunk_rows) of every
 * plane, plane after plane, each plane's rows contiguous (lmcache's
 * "neutral-v1" chunk format when a row is a token's heads x head_size).
 *
 * A row need not be contiguous in the engine's memory: it is `row_segments`
 * runs of row_bytes / row_segments bytes, `segment_stride` bytes apart (vLLM's
 * [blocks, heads, block_size, K|V] views keep each head's K apart from the
 * next head's, by the V between them or by a whole block of tokens). In the
 * chunk the runs are back to back.
 *
 * Whole-block layouts (vLLM's CPU backend packs blocks for the matrix units)
 * use rows_per_block = 1 and row_bytes = the block's bytes.
 */
#ifndef LMCACHE_KERNELS_H
#define LMCACHE_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LMC_ABI_VERSION 4

/* Return codes: 0 is success; nothing is copied when an argument is bad. */
#define LMC_OK 0
#define LMC_EINVAL -1      /* a size, stride or range is inconsistent */
#define LMC_EBLOCK -2      /* a block id in the used part of the table is out of range */
#define LMC_ECUDA -3       /* a CUDA call failed: see lmc_cuda_last_error() */

typedef struct lmc_paged {
    uint32_t num_planes;         /* planes in plane_base */
    const uint64_t *plane_base;  /* address of block 0, row 0 of each plane */
    uint64_t block_stride;       /* bytes from one block to the next, in a plane */
    uint64_t row_stride;         /* bytes from one row to the next, inside a block */
    uint64_t row_bytes;          /* bytes of one row (in the chunk, contiguous) */
    uint64_t rows_per_block;     /* rows (tokens) in a block; 1 for whole-block copies */
    uint64_t num_blocks;         /* blocks in each plane: ids must be below it */
    uint64_t base_align;         /* CUDA: a power of two dividing every plane base (the
                                    bases are device memory the launcher cannot read);
                                    0: unknown, copies go byte by byte. CPU: unused */
    uint64_t row_segments;       /* runs a row is made of in paged memory (0 or 1: one) */
    uint64_t segment_stride;     /* bytes from one run of a row to the next (if several) */
} lmc_paged;

int lmc_abi_version(void);

/* CPU: copy rows [row_lo, row_hi) of every plane into / out of `chunk`.
 * `threads` <= 0 picks a default (up to 4). */
int lmc_cpu_gather(const lmc_paged *paged, const int64_t *block_table, uint64_t table_len,
                   uint64_t row_lo, uint64_t row_hi, void *chunk, uint64_t chunk_row0,
                   uint64_t chunk_rows, int threads);
int lmc_cpu_scatter(const lmc_paged *paged, const int64_t *block_table, uint64_t table_len,
                    uint64_t row_lo, uint64_t row_hi, const void *chunk, uint64_t chunk_row0,
                    uint64_t chunk_rows, int threads);
/* Bytes this process has written with streaming stores (whole 64-byte lines of
 * copies of at least LMCACHE_CPU_STREAM_MIN_BYTES, 4 MiB by default, on x86-64),
 * counted after the stores are fenced: proof the path ran. */
uint64_t lmc_cpu_streamed_bytes(void);

/* CUDA: the same on device memory. `paged->plane_base` and `block_table` are
 * device pointers (the host struct itself is read on the host); `chunk` is
 * pinned host memory mapped into the device (or device memory). Asynchronous
 * on `stream` (a cudaStream_t; NULL for the default stream). */
int lmc_cuda_gather(const lmc_paged *paged, const int64_t *block_table, uint64_t table_len,
                    uint64_t row_lo, uint64_t row_hi, void *chunk, uint64_t chunk_row0,
                    uint64_t chunk_rows, void *stream);
int lmc_cuda_scatter(const lmc_paged *paged, const int64_t *block_table, uint64_t table_len,
                     uint64_t row_lo, uint64_t row_hi, const void *chunk, uint64_t chunk_row0,
                     uint64_t chunk_rows, void *stream);
const char *lmc_cuda_last_error(void);
/* The word (16, 8, 4 or 1 bytes) a copy with these arguments moves per thread. */
int lmc_cuda_word_bytes(const lmc_paged *paged, const void *chunk);
/* Kernels launched successfully by this process: proof that the kernel path ran. */
uint64_t lmc_cuda_launch_count(void);

/* CUDA runtime helpers (the runtime is linked into the CUDA library, so
 * Python needs no libcudart of its own). */
int lmc_cuda_device_count(void);                    /* 0 when no GPU or no driver */
int lmc_cuda_host_register(void *ptr, uint64_t nbytes);   /* pin + map host memory */
int lmc_cuda_host_unregister(void *ptr);
int lmc_cuda_stream_synchronize(void *stream);

#ifdef __cplusplus
}
#endif

#endif
