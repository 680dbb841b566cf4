/* CUDA implementation of the lmcache paged-KV transfer ABI (see lmcache_kernels.h).
 *
 * One CUDA block copies one row (a token's heads x head_size) of one plane;
 * its threads move 16 bytes each when the row and both addresses allow, so
 * loads from device memory and stores into pinned host memory (over PCIe,
 * through the mapped chunk) are wide and coalesced.
 */
#include "lmcache_check.h"
#include "lmcache_kernels.h"

#include <cuda_runtime.h>

#include <stdio.h>

static __thread char last_error[256];

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
    uint64_t row_lo, chunk_row0, chunk_rows;
    char *chunk;
};

template <bool ToChunk, bool Wide>
__global__ void copy_rows(Args a) {
    const uint64_t r = a.row_lo + blockIdx.x;
    const uint32_t plane = blockIdx.y;
    const uint64_t b = r / a.rows_per_block, off = r % a.rows_per_block;
    char *paged = reinterpret_cast<char *>(a.plane_base[plane]) +
                  static_cast<uint64_t>(a.table[b]) * a.block_stride + off * a.row_stride;
    char *row = a.chunk + (static_cast<uint64_t>(plane) * a.chunk_rows + (r - a.chunk_row0)) *
                              a.row_bytes;
    if (Wide) {
        const uint64_t n = a.row_bytes / 16;
        uint4 *dst = reinterpret_cast<uint4 *>(ToChunk ? row : paged);
        const uint4 *src = reinterpret_cast<const uint4 *>(ToChunk ? paged : row);
        for (uint64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
    } else {
        char *dst = ToChunk ? row : paged;
        const char *src = ToChunk ? paged : row;
        for (uint64_t i = threadIdx.x; i < a.row_bytes; i += blockDim.x) dst[i] = src[i];
    }
}

template <bool ToChunk>
static int launch(const lmc_paged *p, const int64_t *table, uint64_t table_len, uint64_t row_lo,
                  uint64_t row_hi, char *chunk, uint64_t chunk_row0, uint64_t chunk_rows,
                  void *stream) {
    /* The table lives on the device: the caller checked its ids on the host. */
    int rc = lmc_check(p, table, table_len, row_lo, row_hi, chunk_row0, chunk_rows, 0);
    if (rc != LMC_OK || row_lo == row_hi) return rc;
    if (!chunk || p->num_planes > 65535u || row_hi - row_lo > 0x7fffffffu) return LMC_EINVAL;
    Args a{p->plane_base, table,  p->block_stride, p->row_stride, p->row_bytes,
           p->rows_per_block, row_lo, chunk_row0, chunk_rows, chunk};
    const bool wide = p->row_bytes % 16 == 0 && p->block_stride % 16 == 0 &&
                      p->row_stride % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(chunk) % 16 == 0;
    dim3 grid(static_cast<unsigned>(row_hi - row_lo), p->num_planes);
    const unsigned threads = p->row_bytes >= 4096 ? 256 : 128;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    /* Judge this launch alone: an error some other caller left pending is not ours. */
    cudaGetLastError();
    if (wide)
        copy_rows<ToChunk, true><<<grid, threads, 0, s>>>(a);
    else
        copy_rows<ToChunk, false><<<grid, threads, 0, s>>>(a);
    cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? LMC_OK : fail(err, "kernel launch");
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
