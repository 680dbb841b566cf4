/* CUDA implementation of the lmcache paged-KV transfer ABI (see lmcache_kernels.h).
 *
 * Threads move the widest word (16, 8, 4 or 1 bytes) that the row size, both
 * strides, the chunk address and every plane base allow, so loads from device
 * memory and stores into pinned host memory (over PCIe, through the mapped
 * chunk) are wide and coalesced. A CUDA block of 256 threads copies several
 * rows when rows are narrow (a 256-byte row, one KV head at TP8, is 16 words
 * of 16 bytes: 16 rows per block), so no thread idles. A row made of several
 * runs in paged memory (a head's K, then the next head's) is copied word by
 * word all the same: each word finds its run by division.
 */
#include "lmcache_check.h"
#include "lmcache_kernels.h"

#include <cuda_runtime.h>

#include <stdio.h>

static __thread char last_error[256];
static uint64_t launches;

extern "C" uint64_t lmc_cuda_launch_count(void) {
    return __atomic_load_n(&launches, __ATOMIC_RELAXED);
}

extern "C" const char *lmc_cuda_last_error(void) { return last_error; }

static int fail(cudaError_t err, const char *what) {
    snprintf(last_error, sizeof last_error, "%s: %s", what, cudaGetErrorString(err));
    /* A failed runtime call also leaves its error pending for cudaGetLastError; clear
     * it here (it is reported through last_error), or the next good launch, which
     * judges itself by cudaGetLastError, would be reported as failed. */
    cudaGetLastError();
    return LMC_ECUDA;
}

struct Args {
    const uint64_t *plane_base; /* device array */
    const int64_t *table;       /* device array */
    uint64_t block_stride, row_stride, row_bytes, rows_per_block;
    uint64_t seg_words, seg_stride; /* words per run of a row, bytes between runs */
    uint64_t row_lo, num_rows, chunk_row0, chunk_rows;
    char *chunk;
    uint32_t lanes, rows_per_cta; /* threads per row, rows per CUDA block */
};

static const unsigned kThreads = 256;

template <bool ToChunk, typename Word>
__global__ void copy_rows(Args a) {
    const uint32_t sub = threadIdx.x / a.lanes, lane = threadIdx.x % a.lanes;
    const uint64_t local = static_cast<uint64_t>(blockIdx.x) * a.rows_per_cta + sub;
    if (local >= a.num_rows) return;
    const uint64_t r = a.row_lo + local;
    const uint32_t plane = blockIdx.y;
    const uint64_t b = r / a.rows_per_block, off = r % a.rows_per_block;
    char *paged = reinterpret_cast<char *>(a.plane_base[plane]) +
                  static_cast<uint64_t>(a.table[b]) * a.block_stride + off * a.row_stride;
    char *row = a.chunk + (static_cast<uint64_t>(plane) * a.chunk_rows + (r - a.chunk_row0)) *
                              a.row_bytes;
    /* Both fit in 32 bits (the launcher checks): a 32-bit division is cheap. */
    const uint32_t n = static_cast<uint32_t>(a.row_bytes / sizeof(Word));
    const uint32_t sw = static_cast<uint32_t>(a.seg_words);
    Word *chunk_words = reinterpret_cast<Word *>(row);
    Word *paged_words = reinterpret_cast<Word *>(paged);
    for (uint32_t i = lane; i < n; i += a.lanes) {
        /* Word i of the row sits in run i / sw of it in paged memory. */
        Word *pw = sw >= n ? paged_words + i
                           : reinterpret_cast<Word *>(paged + (i / sw) * a.seg_stride) + i % sw;
        if (ToChunk)
            chunk_words[i] = *pw;
        else
            *pw = chunk_words[i];
    }
}

/* The widest word every address and size of this copy is a multiple of. */
static unsigned word_bytes(const lmc_paged *p, const char *chunk) {
    const uint64_t segs = p->row_segments > 1 ? p->row_segments : 1;
    const uint64_t all = p->row_bytes | p->block_stride | p->row_stride |
                         (segs > 1 ? (p->row_bytes / segs) | p->segment_stride : 0) |
                         reinterpret_cast<uintptr_t>(chunk) | (p->base_align ? 0 : 1);
    for (unsigned w = 16; w > 1; w /= 2)
        if (all % w == 0 && p->base_align % w == 0) return w;
    return 1;
}

template <bool ToChunk, typename Word>
static void launch_words(const Args &a, dim3 grid, cudaStream_t s) {
    copy_rows<ToChunk, Word><<<grid, kThreads, 0, s>>>(a);
}

template <bool ToChunk>
static int launch(const lmc_paged *p, const int64_t *table, uint64_t table_len, uint64_t row_lo,
                  uint64_t row_hi, char *chunk, uint64_t chunk_row0, uint64_t chunk_rows,
                  void *stream) {
    /* The table lives on the device: the caller checked its ids on the host. */
    int rc = lmc_check(p, table, table_len, row_lo, row_hi, chunk_row0, chunk_rows, 0);
    if (rc != LMC_OK || row_lo == row_hi) return rc;
    if (!chunk || p->num_planes > 65535u) return LMC_EINVAL;
    const unsigned w = word_bytes(p, chunk);
    /* Threads per row: the row's words rounded up to a power of two, at most a block. */
    const uint64_t words = p->row_bytes / w;
    if (words > 0xffffffffu) return LMC_EINVAL;
    uint32_t lanes = 1;
    while (lanes < words && lanes < kThreads) lanes *= 2;
    const uint64_t segs = p->row_segments > 1 ? p->row_segments : 1;
    Args a{p->plane_base, table, p->block_stride, p->row_stride, p->row_bytes, p->rows_per_block,
           words / segs, segs > 1 ? p->segment_stride : 0,
           row_lo, row_hi - row_lo, chunk_row0, chunk_rows, chunk, lanes, kThreads / lanes};
    const uint64_t ctas = (a.num_rows + a.rows_per_cta - 1) / a.rows_per_cta;
    if (ctas > 0x7fffffffu) return LMC_EINVAL;
    dim3 grid(static_cast<unsigned>(ctas), p->num_planes);
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    /* Judge this launch alone: an error some other caller left pending is not ours. */
    cudaGetLastError();
    switch (w) {
        case 16: launch_words<ToChunk, uint4>(a, grid, s); break;
        case 8: launch_words<ToChunk, uint2>(a, grid, s); break;
        case 4: launch_words<ToChunk, uint32_t>(a, grid, s); break;
        default: launch_words<ToChunk, char>(a, grid, s); break;
    }
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return fail(err, "kernel launch");
    __atomic_fetch_add(&launches, 1, __ATOMIC_RELAXED);
    return LMC_OK;
}

/* The word width a copy with these arguments uses (for tests and benchmarks). */
extern "C" int lmc_cuda_word_bytes(const lmc_paged *p, const void *chunk) {
    return static_cast<int>(word_bytes(p, static_cast<const char *>(chunk)));
}

extern "C" int lmc_cuda_gather(const lmc_paged *p, const int64_t *table, uint64_t table_len,
                               uint64_t row_lo, uint64_t row_hi, void *chunk,
                               uint64_t chunk_row0, uint64_t chunk_rows, void *stream) {
    return launch<true>(p, table, table_len, row_lo, row_hi, static_cast<char *>(chunk),
                        chunk_row0, chunk_rows, stream);
}

extern "C" int lmc_cuda_scatter(const lmc_paged *p, const int64_t *table, uint64_t table_len,
                                uint64_t row_lo, uint64_t row_hi, const void *chunk,
                                uint64_t chunk_row0, uint64_t chunk_rows, void *stream) {
    return launch<false>(p, table, table_len, row_lo, row_hi,
                         const_cast<char *>(static_cast<const char *>(chunk)), chunk_row0,
                         chunk_rows, stream);
}

extern "C" int lmc_abi_version(void) { return LMC_ABI_VERSION; }

extern "C" int lmc_cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); /* clear: no driver or no device is not an error here */
        return 0;
    }
    return n;
}

extern "C" int lmc_cuda_host_register(void *ptr, uint64_t nbytes) {
    cudaError_t err = cudaHostRegister(ptr, nbytes, cudaHostRegisterPortable | cudaHostRegisterMapped);
    return err == cudaSuccess ? LMC_OK : fail(err, "cudaHostRegister");
}

extern "C" int lmc_cuda_host_unregister(void *ptr) {
    cudaError_t err = cudaHostUnregister(ptr);
    return err == cudaSuccess ? LMC_OK : fail(err, "cudaHostUnregister");
}

extern "C" int lmc_cuda_stream_synchronize(void *stream) {
    cudaError_t err = cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
    return err == cudaSuccess ? LMC_OK : fail(err, "cudaStreamSynchronize");
}
