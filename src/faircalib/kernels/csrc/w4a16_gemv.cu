// INT4 group-wise weights x bf16 activations for a few token rows (M <= 8): a memory-bound
// GEMV that reads each weight byte once, at as much of HBM's bandwidth as it can.
//
// Why not torch's int4 kernel or our Triton GEMV: at M = 1 they read 1.2-1.6 TB/s of INT4
// weights on an H200 (24-33% of HBM3e; benchmarks/results/kernels), where issue 16's 2.5x of
// bf16 needs about 2.1 TB/s. This kernel keeps QuantLinear's own packing (no relayout), loads
// 16 bytes (32 codes) a thread with streaming loads, and turns a code into a float with two
// integer ops: the code placed in the top four mantissa bits of 1.0f is exactly 1 + q / 16, so
//   sum_j x_j q_j = 16 (sum_j x_j (1 + q_j / 16) - sum_j x_j)
// and a group's term is scale * (16 a - (16 + zero) xs) with a = sum x (1 + q / 16), xs = sum x.
//
// Layouts (QuantLinear's):
//   x      [m, k] bf16, row-major, m <= 8
//   w      [n, k / 2] uint8, two codes a byte, the even column in the low nibble
//   scale  [n, k / group] float32; zero the same, float32 (QuantLinear's uint8 codes as floats)
//   out    [m, n] bf16
// A warp owns kRows weight rows and walks their K in 32-code chunks, one per lane; a chunk never
// straddles a group (group % 32 == 0). Each code is converted once for all token rows. Layers
// with too few rows to fill the GPU split K over gridDim.y: each split writes its own float
// slab of the workspace, and a second kernel sums the slabs in order and rounds to bf16 once
// (deterministic: a graph replay equals an eager call bit for bit).

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common.cuh"

namespace {

constexpr int kChunk = 32;  // codes one lane loads at once: 16 bytes
constexpr int kWarps = 4;   // warps a block
constexpr int kRows = 4;    // weight rows a warp: each x chunk converted once for all of them

// 1 + q / 16 for the code in nibble `i` (bits 4i..4i+3) of `word`
template <int i>
__device__ __forceinline__ float one_plus_q16(uint32_t word) {
  constexpr int shift = 19 - 4 * i;  // the nibble to bits 19..22, the mantissa's top four
  uint32_t bits;
  if constexpr (shift >= 0) {
    bits = word << shift;
  } else {
    bits = word >> -shift;
  }
  return __uint_as_float((bits & 0x00780000u) | 0x3F800000u);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Two codes' floats (1 + q / 16) for each of R rows: nibbles 2h and 2h + 1 of word[r]
template <int h, int R>
__device__ __forceinline__ void code_pair(const uint32_t (&word)[R], float (&q0)[R], float (&q1)[R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    q0[r] = one_plus_q16<2 * h>(word[r]);
    q1[r] = one_plus_q16<2 * h + 1>(word[r]);
  }
}

// For columns 8v + 2h, 8v + 2h + 1 of the chunk: every token row's x pair times the R rows' code
// pair. Each code is converted once, whatever M.
template <int h, int M, int R>
__device__ __forceinline__ void pair_step(const uint32_t (&word)[R], const uint4 (&xv)[M], int m,
                                          float (&a)[M][R], float (&xs)[M]) {
  float q0[R], q1[R];
  code_pair<h, R>(word, q0, q1);
#pragma unroll
  for (int i = 0; i < M; ++i) {
    if (i >= m) break;
    const uint32_t pair = h == 0 ? xv[i].x : h == 1 ? xv[i].y : h == 2 ? xv[i].z : xv[i].w;
    const float x0 = __uint_as_float(pair << 16);  // the even column: the low bf16
    const float x1 = __uint_as_float(pair & 0xFFFF0000u);
    xs[i] += x0 + x1;
#pragma unroll
    for (int r = 0; r < R; ++r) a[i][r] = fmaf(x0, q0[r], fmaf(x1, q1[r], a[i][r]));
  }
}

// partial: null (one split: bf16 straight to out), else this split's float slab [m, n] of the
// workspace [splits, m, n], summed in split order by round_splits (deterministic, no atomics)
template <int M>
__global__ void __launch_bounds__(kWarps * 32)
    gemv_kernel(const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w,
                const float* __restrict__ scale, const float* __restrict__ zero,
                __nv_bfloat16* __restrict__ out, float* __restrict__ partial, int m, int n, int k,
                int group, int chunks_per_split) {
  const int lane = threadIdx.x % 32;
  const int row0 = (blockIdx.x * kWarps + threadIdx.x / 32) * kRows;
  if (row0 >= n) return;  // warp-uniform: before any shuffle
  const int groups = k / group;
  const int chunks = k / kChunk;
  const int begin = blockIdx.y * chunks_per_split;
  const int end = min(chunks, begin + chunks_per_split);
  const int row_bytes = k / 2;

  float acc[M][kRows];
#pragma unroll
  for (int i = 0; i < M; ++i)
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[i][r] = 0.f;

  for (int c = begin + lane; c < end; c += 32) {
    uint4 wq[kRows];
    float s16[kRows], sz[kRows];  // 16 scale and scale (16 + zero) of the chunk's group
    const int g = c * kChunk / group;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = min(row0 + r, n - 1);  // rows past n repeat the last; never stored
      wq[r] = __ldcs(reinterpret_cast<const uint4*>(w + size_t(row) * row_bytes) + c);
      const float s = __ldg(scale + size_t(row) * groups + g);
      s16[r] = 16.f * s;
      sz[r] = s * (16.f + __ldg(zero + size_t(row) * groups + g));
    }
    float a[M][kRows];
    float xs[M];
#pragma unroll
    for (int i = 0; i < M; ++i) {
      xs[i] = 0.f;
#pragma unroll
      for (int r = 0; r < kRows; ++r) a[i][r] = 0.f;
    }
#pragma unroll
    for (int v = 0; v < 4; ++v) {  // 4 x 8 columns: word v of each row, x's 16 bytes v
      uint4 xv[M];
#pragma unroll
      for (int i = 0; i < M; ++i)
        if (i < m) xv[i] = __ldg(reinterpret_cast<const uint4*>(x + size_t(i) * k) + c * 4 + v);
      uint32_t word[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        word[r] = v == 0 ? wq[r].x : v == 1 ? wq[r].y : v == 2 ? wq[r].z : wq[r].w;
      pair_step<0, M, kRows>(word, xv, m, a, xs);
      pair_step<1, M, kRows>(word, xv, m, a, xs);
      pair_step<2, M, kRows>(word, xv, m, a, xs);
      pair_step<3, M, kRows>(word, xv, m, a, xs);
    }
#pragma unroll
    for (int i = 0; i < M; ++i)
#pragma unroll
      for (int r = 0; r < kRows; ++r) acc[i][r] += s16[r] * a[i][r] - sz[r] * xs[i];
  }

  float* slab = partial == nullptr ? nullptr : partial + size_t(blockIdx.y) * m * n;
#pragma unroll
  for (int i = 0; i < M; ++i) {
    if (i >= m) break;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float y = warp_sum(acc[i][r]);
      if (lane == 0 && row0 + r < n) {
        if (slab != nullptr) {
          slab[size_t(i) * n + row0 + r] = y;
        } else {
          out[size_t(i) * n + row0 + r] = __float2bfloat16(y);
        }
      }
    }
  }
}

__global__ void round_splits(const float* __restrict__ partial, __nv_bfloat16* __restrict__ out,
                             int count, int splits) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= count) return;
  float y = 0.f;
  for (int s = 0; s < splits; ++s) y += partial[size_t(s) * count + i];  // fixed order
  out[i] = __float2bfloat16(y);
}

template <int M>
int launch(const void* x, const void* w, const void* scale, const void* zero, void* out, int m,
           int n, int k, int group, int splits, void* workspace, cudaStream_t stream) {
  const int chunks = k / kChunk;
  const int per_split = (chunks + splits - 1) / splits;
  float* partial = splits > 1 ? static_cast<float*>(workspace) : nullptr;
  const dim3 grid((n + kWarps * kRows - 1) / (kWarps * kRows), splits);
  gemv_kernel<M><<<grid, kWarps * 32, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(x), static_cast<const uint8_t*>(w),
      static_cast<const float*>(scale), static_cast<const float*>(zero),
      static_cast<__nv_bfloat16*>(out), partial, m, n, k, group, per_split);
  if (partial != nullptr) {
    const int count = m * n;
    round_splits<<<(count + 255) / 256, 256, 0, stream>>>(
        partial, static_cast<__nv_bfloat16*>(out), count, splits);
  }
  return 0;
}

}  // namespace

extern "C" {

const char* fc_w4a16_gemv_error() { return fc::g_error; }

int fc_w4a16_gemv_max_m() { return 8; }

// rows of weight a block covers (the host sizes splits by it)
int fc_w4a16_gemv_rows_per_block() { return kWarps * kRows; }

// bytes of workspace a call needs: a float slab [m, n] per split when K is split
size_t fc_w4a16_gemv_workspace(int m, int n, int splits) {
  return splits > 1 ? size_t(splits) * m * n * sizeof(float) : 0;
}

// 0 on success; otherwise fc_w4a16_gemv_error() says why
int fc_w4a16_gemv(const void* x, const void* w, const void* scale, const void* zero, void* out,
                  int m, int n, int k, int group, int splits, void* workspace,
                  size_t workspace_bytes, void* stream) {
  if (m < 1 || m > 8) return fc::fail("the GEMV takes 1 to 8 token rows");
  if (k % kChunk != 0 || group % kChunk != 0 || k % group != 0)
    return fc::fail("K and the group size must be multiples of 32, the group dividing K");
  if (splits < 1 || splits > k / kChunk) return fc::fail("splits must be 1 to K / 32");
  if (fc_w4a16_gemv_workspace(m, n, splits) > workspace_bytes)
    return fc::fail("workspace too small");
  auto s = static_cast<cudaStream_t>(stream);
  int status = m <= 1   ? launch<1>(x, w, scale, zero, out, m, n, k, group, splits, workspace, s)
               : m <= 2 ? launch<2>(x, w, scale, zero, out, m, n, k, group, splits, workspace, s)
               : m <= 4 ? launch<4>(x, w, scale, zero, out, m, n, k, group, splits, workspace, s)
                        : launch<8>(x, w, scale, zero, out, m, n, k, group, splits, workspace, s);
  return fc::finish(status);
}

}  // extern "C"
