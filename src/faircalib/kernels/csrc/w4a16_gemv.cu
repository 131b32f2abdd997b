// INT4 group-wise weights x bf16 activations for a few token rows (M <= 8): a memory-bound
// GEMV on the tensor cores, reading each weight byte once.
//
// Why not torch's int4 kernel, our Triton GEMV or a GEMV on the CUDA cores: at M = 1 they
// read INT4 weights at 1.2-1.7 TB/s on an H200 (benchmarks/results/kernels, cuda-gemv-v1),
// where issue 16's 2.5x of bf16 needs about 2.3 TB/s. A CUDA-core GEMV spends about three
// instructions a code (unpack, convert, FMA per token row): it is issue-bound before HBM is,
// and its time grows with M (the first version of this file, cuda-gemv-v1). Here a code costs
// about one instruction, whatever M <= 8: the tokens are the N = 8 of an mma.sync m16n8k16.
//
// The algebra. A nibble q OR-ed into 0x4300 is the bf16 128 + q exactly, and one LOP3 turns
// the nibbles e and e + 4 of a 32-bit word into such a pair. The mma sums x (128 + q) over the
// step's 128 columns in float32 (products of two 8-bit mantissas are exact), a second mma with
// an all-ones A sums x over the same columns (xs), and, a step lying inside one group,
//   sum x (q - zero) scale = scale (sum x (128 + q)) - scale (128 + zero) xs.
// The pairs (e, e + 4) permute K inside the mma; the activations are permuted alike with one
// byte-permute per register, so the product is unchanged.
//
// Fragments (PTX m16n8k16, lane = 4 g + t): A holds weight rows g and g + 8 of a 16-row tile,
// B holds token g's activations, C[row][token] rows g, g + 8 and tokens 2t, 2t + 1. Per step a
// lane loads 32 codes (16 bytes) of each of its rows at columns 32 t ... 32 t + 31 and token g's
// 32 activations there (64 bytes): word v of the codes is mma 2v (its pairs (0, 4) and (1, 5))
// and mma 2v + 1 (pairs (2, 6) and (3, 7)).
//
// Layouts (the codes as QuantLinear packs them; no relayout):
//   x      [m, k] bf16, row-major, m <= 8
//   w      [n, k / 2] uint8, two codes a byte, the even column in the low nibble
//   meta   [n, k / group] uint32: the group's scale as bf16 in the high half, 128 + its zero
//          point as bf16 in the low half (exact for zero points 0-127): one load a row and
//          group, 4 bytes where float32 pairs took 8 (6% of what a g128 layer reads)
//   out    [m, n] bf16
// K and the group are multiples of 128. The warps of a block (4, 8 or 16) take consecutive
// parts of the block's K and sum in shared memory in a fixed order; layers with too few row tiles
// to fill the GPU also split K over gridDim.y, each split writing its own float slab of the
// workspace, summed in order by a second kernel. Deterministic: a graph replay equals an eager
// call.
//
// Instructions and latency are what held version 5 back (Nsight Compute,
// benchmarks/results/gemv-ncu: at 430 instructions a step the schedulers issued half the cycles
// and HBM ran at 36%). So: the next step's operands are loaded into the other of two register
// buffers, the loop unrolled by two so that no buffer is ever copied (a copy waits for the load
// it moves); each pair is one LOP3 (both constants given to PTX's lop3); the loads walk running
// pointers, with the group counted rather than divided out: 288 instructions a step
// (cuobjdump), 127 registers a thread, so an SM holds 16 warps (cuda_gemv.warps_for).

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common.cuh"

namespace {

constexpr int kVersion = 9;  // 8: immediate offsets; 7: 16 warps; 6: meta words
constexpr int kStep = 128;   // K columns a warp takes at once: 4 lanes (t) x 32 codes
constexpr int kMaxWarps = 16;  // warps a block (4, 8 or 16), each on its own part of its K
constexpr int kTileRows = 16;
constexpr uint32_t kOnes = 0x3F803F80u;  // two bf16 ones

// The bf16 pair (128 + nibble e, 128 + nibble e + 4) of a word: a shift and one LOP3, PTX's
// lop3 taking (a & 0x000F000F) | 0x43004300 whole (C++'s & then | compiles to two)
template <int e>
__device__ __forceinline__ uint32_t pair(uint32_t word) {
  uint32_t out;
  asm("lop3.b32 %0, %1, %2, %3, %4;\n"
      : "=r"(out)
      : "r"(word >> (4 * e)), "n"(0x000F000F), "n"(0x43004300), "n"((0xF0 & 0xCC) | 0xAA));
  return out;
}

__device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                    uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// One step's operands of a lane: its rows' 16 code bytes and group words, token g's 32
// activations
template <int kTiles>
struct Step {
  uint4 codes[kTiles][2];  // [tile][row g, row g + 8]
  uint32_t meta[kTiles][2];
  uint4 x[4];
};

// Where a lane reads next: running pointers, one step further after each load. (Version 8
// loaded step + j at immediate offsets from pointers moved once a pair of steps: 247
// instructions a step against 288, yet ptxas then issued the next step's loads halfway through
// this step's mma and the layers ran 0.81-0.99x as fast: benchmarks/results/cuda-gemv-v8.)
template <int kTiles>
struct Cursor {
  const uint8_t* codes[kTiles][2];
  const uint32_t* meta[kTiles][2];
  const uint4* x;
  int in_group;         // steps of the current group already loaded
  int steps_per_group;  // group / kStep
};

template <int kTiles>
__device__ __forceinline__ void load(Step<kTiles>& s, Cursor<kTiles>& at) {
#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      // streamed past L1 (the 256-byte L2 prefetch of version 4 lost once 16 warps a block
      // ran the deep layers: benchmarks/results/cuda-gemv-warps16)
      s.codes[tile][h] = __ldcs(reinterpret_cast<const uint4*>(at.codes[tile][h]));
      s.meta[tile][h] = __ldg(at.meta[tile][h]);
      at.codes[tile][h] += kStep / 2;
    }
#pragma unroll
  for (int i = 0; i < 4; ++i) s.x[i] = __ldg(at.x + i);
  at.x += kStep / 8;  // 128 bf16 = 16 uint4
  if (++at.in_group == at.steps_per_group) {  // the next step starts a group
    at.in_group = 0;
#pragma unroll
    for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
      for (int h = 0; h < 2; ++h) ++at.meta[tile][h];
  }
}

// acc[tile] += the step's contribution to rows (g, g + 8) x tokens (2t, 2t + 1)
template <int kTiles>
__device__ __forceinline__ void compute(const Step<kTiles>& s, float (&acc)[kTiles][4]) {
  float xs[4] = {0.f, 0.f, 0.f, 0.f};
  float sum[kTiles][4];
#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
    for (int c = 0; c < 4; ++c) sum[tile][c] = 0.f;
#pragma unroll
  for (int v = 0; v < 4; ++v) {
    const uint32_t x01 = s.x[v].x, x23 = s.x[v].y, x45 = s.x[v].z, x67 = s.x[v].w;
    // mma 2v: columns (0, 4) and (1, 5) of the word; mma 2v + 1: (2, 6) and (3, 7)
    const uint32_t b[2][2] = {{__byte_perm(x01, x45, 0x5410), __byte_perm(x01, x45, 0x7632)},
                              {__byte_perm(x23, x67, 0x5410), __byte_perm(x23, x67, 0x7632)}};
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      mma(xs, kOnes, kOnes, kOnes, kOnes, b[half][0], b[half][1]);
#pragma unroll
      for (int tile = 0; tile < kTiles; ++tile) {
        const uint32_t w_g = word_of(s.codes[tile][0], v), w_g8 = word_of(s.codes[tile][1], v);
        if (half == 0) {
          mma(sum[tile], pair<0>(w_g), pair<0>(w_g8), pair<1>(w_g), pair<1>(w_g8), b[0][0],
              b[0][1]);
        } else {
          mma(sum[tile], pair<2>(w_g), pair<2>(w_g8), pair<3>(w_g), pair<3>(w_g8), b[1][0],
              b[1][1]);
        }
      }
    }
  }
#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int h = c / 2;  // C rows: c 0, 1 row g; c 2, 3 row g + 8 (tokens 2t, 2t + 1)
      const uint32_t word = s.meta[tile][h];
      const float scale = __uint_as_float(word & 0xFFFF0000u);  // bf16 -> float: the high half
      const float shift = scale * __uint_as_float(word << 16);  // scale (128 + zero)
      acc[tile][c] += scale * sum[tile][c] - shift * xs[c % 2];
    }
}

// The block's result from its warps' sums [warp][tile * 4 + c][lane], added in warp order.
// partial: null (one split: bf16 straight to out), else this split's float slab [m, n] of the
// workspace [splits, m, n], summed in split order by round_splits (deterministic, no atomics)
template <int kTiles>
__device__ __forceinline__ void write_block(const float (*sums)[kTiles * 4][32],
                                            float* __restrict__ partial,
                                            __nv_bfloat16* __restrict__ out, int row_base, int m,
                                            int n, int warps) {
  float* slab = partial == nullptr ? nullptr : partial + size_t(blockIdx.y) * m * n;
  for (int i = threadIdx.x; i < kTiles * 4 * 32; i += blockDim.x) {
    const int tile = i / 128, c = i / 32 % 4, from = i % 32;
    const int row = row_base + tile * kTileRows + from / 4 + 8 * (c / 2);
    const int token = 2 * (from % 4) + c % 2;
    if (row >= n || token >= m) continue;
    float y = 0.f;
    for (int v = 0; v < warps; ++v) y += sums[v][tile * 4 + c][from];  // fixed order
    if (slab != nullptr) {
      slab[size_t(token) * n + row] = y;
    } else {
      out[size_t(token) * n + row] = __float2bfloat16(y);
    }
  }
}

template <int kTiles>
__global__ void __launch_bounds__(kMaxWarps * 32)
    gemv_kernel(const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w,
                const uint32_t* __restrict__ meta, __nv_bfloat16* __restrict__ out,
                float* __restrict__ partial, int m, int n, int k, int group,
                int steps_per_split) {
  __shared__ float sums[kMaxWarps][kTiles * 4][32];
  const int warps = blockDim.x / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int row_base = blockIdx.x * kTiles * kTileRows;
  const int groups = k / group;

  // this warp's consecutive steps of the split
  const int split_begin = blockIdx.y * steps_per_split;
  const int split_end = min(k / kStep, split_begin + steps_per_split);
  const int per_warp = (max(0, split_end - split_begin) + warps - 1) / warps;
  const int begin = split_begin + warp * per_warp;
  const int end = min(split_end, begin + per_warp);

  Cursor<kTiles> at;
  const int column = begin * kStep + 32 * t;
  at.steps_per_group = group / kStep;
  at.in_group = begin % at.steps_per_group;
#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = min(row_base + tile * kTileRows + g + 8 * h, n - 1);  // past n: never stored
      at.codes[tile][h] = w + size_t(row) * (k / 2) + column / 2;
      at.meta[tile][h] = meta + size_t(row) * groups + begin * kStep / group;
    }
  // lanes of tokens g >= m read token m - 1 again: their C columns are never stored, and
  // loading something spares the zeroing and the predicates
  at.x = reinterpret_cast<const uint4*>(x + size_t(min(g, m - 1)) * k + column);

  float acc[kTiles][4];
#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[tile][c] = 0.f;

  // the next step loaded while this one computes, into the other buffer: unrolled by two so
  // that neither buffer is ever copied
  Step<kTiles> a, b;
  if (begin < end) load(a, at);
  for (int step = begin; step < end; step += 2) {
    if (step + 1 < end) load(b, at);
    compute(a, acc);
    if (step + 1 < end) {
      if (step + 2 < end) load(a, at);
      compute(b, acc);
    }
  }

#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
    for (int c = 0; c < 4; ++c) sums[warp][tile * 4 + c][lane] = acc[tile][c];
  __syncthreads();
  write_block<kTiles>(sums, partial, out, row_base, m, n, warps);
}

__global__ void round_splits(const float* __restrict__ partial, __nv_bfloat16* __restrict__ out,
                             int count, int splits) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= count) return;
  float y = 0.f;
  for (int s = 0; s < splits; ++s) y += partial[size_t(s) * count + i];  // fixed order
  out[i] = __float2bfloat16(y);
}

template <int kTiles>
int launch(const void* x, const void* w, const void* meta, void* out, int m, int n, int k,
           int group, int warps, int splits, void* workspace, cudaStream_t stream) {
  const int steps = k / kStep;
  const int per_split = (steps + splits - 1) / splits;
  float* partial = splits > 1 ? static_cast<float*>(workspace) : nullptr;
  const int rows_per_block = kTiles * kTileRows;
  const dim3 grid((n + rows_per_block - 1) / rows_per_block, splits);
  const auto op = static_cast<__nv_bfloat16*>(out);
  gemv_kernel<kTiles><<<grid, warps * 32, 0, stream>>>(
      static_cast<const __nv_bfloat16*>(x), static_cast<const uint8_t*>(w),
      static_cast<const uint32_t*>(meta), op, partial, m, n, k, group, per_split);
  if (partial != nullptr) {
    const int count = m * n;
    round_splits<<<(count + 255) / 256, 256, 0, stream>>>(partial, op, count, splits);
  }
  return 0;
}

}  // namespace

extern "C" {

const char* fc_w4a16_gemv_error() { return fc::g_error; }

int fc_w4a16_gemv_version() { return kVersion; }

int fc_w4a16_gemv_max_m() { return 8; }

// bytes of workspace a call needs: a float slab [m, n] per split when K is split
size_t fc_w4a16_gemv_workspace(int m, int n, int splits) {
  return splits > 1 ? size_t(splits) * m * n * sizeof(float) : 0;
}

// meta: [n, k / group] uint32 (the layout above); tiles: 16-row tiles a warp takes (1 or 2);
// warps: a block's (4, 8 or 16); 0 on success, otherwise fc_w4a16_gemv_error() says why
int fc_w4a16_gemv(const void* x, const void* w, const void* meta, void* out, int m, int n, int k,
                  int group, int tiles, int warps, int splits, void* workspace,
                  size_t workspace_bytes, void* stream) {
  if (m < 1 || m > 8) return fc::fail("the GEMV takes 1 to 8 token rows");
  if (k % kStep != 0 || group % kStep != 0 || k % group != 0)
    return fc::fail("K and the group size must be multiples of 128, the group dividing K");
  if (splits < 1 || splits > k / kStep) return fc::fail("splits must be 1 to K / 128");
  if (tiles != 1 && tiles != 2) return fc::fail("tiles must be 1 or 2");
  if (warps != 4 && warps != 8 && warps != 16) return fc::fail("warps must be 4, 8 or 16");
  if (fc_w4a16_gemv_workspace(m, n, splits) > workspace_bytes)
    return fc::fail("workspace too small");
  auto s = static_cast<cudaStream_t>(stream);
  const int status =
      tiles == 1
          ? launch<1>(x, w, meta, out, m, n, k, group, warps, splits, workspace, s)
          : launch<2>(x, w, meta, out, m, n, k, group, warps, splits, workspace, s);
  return fc::finish(status);
}

}  // extern "C"
