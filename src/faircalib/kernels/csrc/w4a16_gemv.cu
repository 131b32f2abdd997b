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
// Layouts (QuantLinear's; no relayout):
//   x      [m, k] bf16, row-major, m <= 8
//   w      [n, k / 2] uint8, two codes a byte, the even column in the low nibble
//   scale  [n, k / group] bf16 (a bf16 model's own); zero the same, uint8 codes: 3 bytes a
//          group where float32 pairs took 8 (11-12% of what a g128 layer reads)
//   out    [m, n] bf16
// K and the group are multiples of 128. The warps of a block (4 or 8) take consecutive parts
// of the block's K and sum in shared memory in a fixed order; layers with too few row tiles to fill
// the GPU also split K over gridDim.y, each split writing its own float slab of the workspace,
// summed in order by a second kernel. Deterministic: a graph replay equals an eager call.
//
// Two ways to feed a warp (the math is the same, and so are the bits of the result):
//   registers (stages = 0): the next step's codes are loaded into registers while this step's
//     mma run: one step (2 KB a warp) in flight;
//   a cp.async ring (stages = S): each lane copies its own codes and activations S - 1 steps
//     ahead into a shared-memory ring and reads back only what it copied (no barrier), the
//     scales S - 1 steps ahead into registers. A warp then keeps (S - 1) x 2 KB in flight with
//     fewer registers. Why: at 121 registers a thread the register path holds 16 warps an SM
//     and at most 32 KB in flight, where HBM's bandwidth x latency wants more.

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "common.cuh"

namespace {

constexpr int kVersion = 5;  // 4 + the cp.async ring (3: the L2 prefetch, 2: float32 scales)
constexpr int kStep = 128;   // K columns a warp takes at once: 4 lanes (t) x 32 codes
constexpr int kMaxWarps = 8;  // warps a block (4 or 8), each on its own part of the block's K
constexpr int kTileRows = 16;
constexpr uint32_t kOnes = 0x3F803F80u;  // two bf16 ones

// The bf16 pair (128 + nibble e, 128 + nibble e + 4) of a word: one LOP3 after the shift
template <int e>
__device__ __forceinline__ uint32_t pair(uint32_t word) {
  return ((word >> (4 * e)) & 0x000F000Fu) | 0x43004300u;
}

__device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                    uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// 16 code bytes, streamed past L1. With kPrefetch the L2 fetches the whole 256-byte block
// around them: a warp's next three steps read the rest of it, so each DRAM request brings four
// steps' codes where 64 bytes a row brought one.
template <bool kPrefetch>
__device__ __forceinline__ uint4 load_codes(const uint8_t* p) {
  if constexpr (kPrefetch) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
  } else {
    return __ldcs(reinterpret_cast<const uint4*>(p));
  }
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// One step's operands of a lane: its rows' 16 code bytes, token g's 32 activations, and each
// row's scale and scale (128 + zero) for the step's group
template <int kTiles>
struct Step {
  uint4 codes[kTiles][2];  // [tile][row g, row g + 8]
  uint4 x[4];
  float scale[kTiles][2];
  float shift[kTiles][2];
};

template <int kTiles, bool kPrefetch>
__device__ __forceinline__ void load(Step<kTiles>& s, const uint8_t* const (&rows)[kTiles][2],
                                     const __nv_bfloat16* const (&scale_rows)[kTiles][2],
                                     const uint8_t* const (&zero_rows)[kTiles][2],
                                     const __nv_bfloat16* x_row, bool has_token, int step,
                                     int t, int group) {
  const int column = step * kStep + 32 * t;
  const int g = step * kStep / group;
#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      s.codes[tile][h] = load_codes<kPrefetch>(rows[tile][h] + column / 2);
      const float sc = __bfloat162float(__ldg(scale_rows[tile][h] + g));
      s.scale[tile][h] = sc;
      s.shift[tile][h] = sc * (128.f + float(__ldg(zero_rows[tile][h] + g)));
    }
#pragma unroll
  for (int i = 0; i < 4; ++i)
    s.x[i] = has_token ? __ldg(reinterpret_cast<const uint4*>(x_row + column) + i)
                       : make_uint4(0, 0, 0, 0);
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
      acc[tile][c] += s.scale[tile][h] * sum[tile][c] - s.shift[tile][h] * xs[c % 2];
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

// the register path: two steps in flight, the next one's loads issued before this one's math
template <int kTiles, bool kPrefetch>
__global__ void __launch_bounds__(kMaxWarps * 32)
    gemv_kernel(const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w,
                const __nv_bfloat16* __restrict__ scale, const uint8_t* __restrict__ zero,
                __nv_bfloat16* __restrict__ out, float* __restrict__ partial, int m, int n, int k,
                int group, int steps_per_split) {
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

  const uint8_t* rows[kTiles][2];
  const __nv_bfloat16* scale_rows[kTiles][2];
  const uint8_t* zero_rows[kTiles][2];
#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = min(row_base + tile * kTileRows + g + 8 * h, n - 1);  // past n: never stored
      rows[tile][h] = w + size_t(row) * (k / 2);
      scale_rows[tile][h] = scale + size_t(row) * groups;
      zero_rows[tile][h] = zero + size_t(row) * groups;
    }
  const bool has_token = g < m;
  const __nv_bfloat16* x_row = x + size_t(has_token ? g : 0) * k;

  float acc[kTiles][4];
#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[tile][c] = 0.f;

  // two steps in flight: the next step's loads are issued before this one's math
  Step<kTiles> current, next;
  if (begin < end)
    load<kTiles, kPrefetch>(current, rows, scale_rows, zero_rows, x_row, has_token, begin, t, group);
  for (int step = begin; step < end; ++step) {
    if (step + 1 < end)
      load<kTiles, kPrefetch>(next, rows, scale_rows, zero_rows, x_row, has_token, step + 1, t,
                              group);
    compute(current, acc);
    current = next;
  }

#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
    for (int c = 0; c < 4; ++c) sums[warp][tile * 4 + c][lane] = acc[tile][c];
  __syncthreads();
  write_block<kTiles>(sums, partial, out, row_base, m, n, warps);
}


// ---- the cp.async ring (stages = S) ----

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 code bytes into shared memory past L1; kPrefetch: as load_codes
template <bool kPrefetch>
__device__ __forceinline__ void copy_codes(void* dst, const uint8_t* src) {
  if constexpr (kPrefetch) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;\n" ::"r"(shared_address(dst)),
                 "l"(src)
                 : "memory");
  } else {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(dst)),
                 "l"(src)
                 : "memory");
  }
}

// 16 activation bytes, kept in L1: every warp of the SM reads the same ones
__device__ __forceinline__ void copy_x(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(dst)), "l"(src)
               : "memory");
}

__device__ __forceinline__ void commit_copies() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// until at most `pending` of this thread's groups are still in flight
template <int pending>
__device__ __forceinline__ void wait_copies() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
}

// shared 16-byte chunks a stage of one warp takes: the codes [tile][row g, g + 8][lane], then
// the activations of the m tokens [word group i][token][t]
template <int kTiles>
__host__ __device__ constexpr int stage_chunks(int m) {
  return kTiles * 2 * 32 + 16 * m;
}

// the same sums as gemv_kernel, its operands arriving through a per-warp cp.async ring of
// kStages steps (dynamic shared memory: the ring of every warp, then the block's sums)
template <int kTiles, int kStages, bool kPrefetch>
__global__ void __launch_bounds__(kMaxWarps * 32)
    gemv_ring_kernel(const __nv_bfloat16* __restrict__ x, const uint8_t* __restrict__ w,
                     const __nv_bfloat16* __restrict__ scale, const uint8_t* __restrict__ zero,
                     __nv_bfloat16* __restrict__ out, float* __restrict__ partial, int m, int n,
                     int k, int group, int steps_per_split) {
  extern __shared__ uint4 shared[];
  const int warps = blockDim.x / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int row_base = blockIdx.x * kTiles * kTileRows;
  const int groups = k / group;
  const int chunks = stage_chunks<kTiles>(m);
  uint4* ring = shared + size_t(warp) * kStages * chunks;
  float(*sums)[kTiles * 4][32] =
      reinterpret_cast<float(*)[kTiles * 4][32]>(shared + size_t(warps) * kStages * chunks);

  const int split_begin = blockIdx.y * steps_per_split;
  const int split_end = min(k / kStep, split_begin + steps_per_split);
  const int per_warp = (max(0, split_end - split_begin) + warps - 1) / warps;
  const int begin = split_begin + warp * per_warp;
  const int end = min(split_end, begin + per_warp);

  // 32-bit offsets of this lane's rows (the host refuses weights of 4 GiB or more): fewer
  // registers than a pointer per row and array
  uint32_t code_at[kTiles][2], group_at[kTiles][2];
#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = min(row_base + tile * kTileRows + g + 8 * h, n - 1);  // past n: never stored
      code_at[tile][h] = uint32_t(row) * uint32_t(k / 2);
      group_at[tile][h] = uint32_t(row) * uint32_t(groups);
    }
  const bool has_token = g < m;
  const __nv_bfloat16* x_row = x + size_t(has_token ? g : 0) * k;
  const unsigned short* scale_bits_of = reinterpret_cast<const unsigned short*>(scale);

  // the copies of step `step` into ring slot `slot`; a lane copies only what it reads back
  const auto issue = [&](int step, int slot) {
    uint4* stage = ring + slot * chunks;
    const int column = step * kStep + 32 * t;
#pragma unroll
    for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        copy_codes<kPrefetch>(stage + (tile * 2 + h) * 32 + lane, w + code_at[tile][h] + column / 2);
    if (has_token) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
        copy_x(stage + kTiles * 64 + (i * m + g) * 4 + t, x_row + column + 8 * i);
    }
  };
  // the scales and zero points as raw bits, one step ahead: after a row's first step they come
  // from L1 (the codes bypass it), and their first use follows the step's mma
  unsigned short scale_bits[2][kTiles][2];
  uint8_t zero_bits[2][kTiles][2];
  const auto load_scales = [&](int step, unsigned short (&sc)[kTiles][2],
                               uint8_t (&zr)[kTiles][2]) {
    const int gi = step * kStep / group;
#pragma unroll
    for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        sc[tile][h] = __ldg(scale_bits_of + group_at[tile][h] + gi);
        zr[tile][h] = __ldg(zero + group_at[tile][h] + gi);
      }
  };

  float acc[kTiles][4];
#pragma unroll
  for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[tile][c] = 0.f;

#pragma unroll
  for (int j = 0; j < kStages - 1; ++j) {
    if (begin + j < end) issue(begin + j, j);
    commit_copies();  // empty groups too: every step waits on the same count
  }
  if (begin < end) load_scales(begin, scale_bits[0], zero_bits[0]);
  // unrolled by kStages (even) so that every ring slot and scale register is a constant
  static_assert(kStages % 2 == 0, "the scales alternate between two register sets");
  for (int base = begin; base < end; base += kStages) {
#pragma unroll
    for (int j = 0; j < kStages; ++j) {
      const int step = base + j;
      if (step < end) {
        constexpr int kAhead = kStages - 1;
        if (step + kAhead < end) issue(step + kAhead, (j + kAhead) % kStages);  // read a step ago
        commit_copies();
        if (step + 1 < end) load_scales(step + 1, scale_bits[(j + 1) % 2], zero_bits[(j + 1) % 2]);
        wait_copies<kAhead>();  // this step's group has landed
        const uint4* stage = ring + j * chunks;
        Step<kTiles> s;
#pragma unroll
        for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            s.codes[tile][h] = stage[(tile * 2 + h) * 32 + lane];
            const float sc = __bfloat162float(__ushort_as_bfloat16(scale_bits[j % 2][tile][h]));
            s.scale[tile][h] = sc;
            s.shift[tile][h] = sc * (128.f + float(zero_bits[j % 2][tile][h]));
          }
#pragma unroll
        for (int i = 0; i < 4; ++i)
          s.x[i] = has_token ? stage[kTiles * 64 + (i * m + g) * 4 + t] : make_uint4(0, 0, 0, 0);
        compute(s, acc);
      }
    }
  }
  wait_copies<0>();

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

// shared-memory bytes of a ring launch: every warp's ring, then the block's sums
template <int kTiles>
size_t ring_bytes(int m, int warps, int stages) {
  return size_t(warps) * stages * stage_chunks<kTiles>(m) * sizeof(uint4) +
         size_t(warps) * kTiles * 4 * 32 * sizeof(float);
}

// Lets the ring kernel of (kTiles, kStages, kPrefetch) take all the shared memory a block may
// opt into, once per device and instance (a template of its own: the instances share one
// function type), before any graph capture (the first call of a size runs eagerly). Returns
// that opt-in limit.
template <int kTiles, int kStages, bool kPrefetch>
int allow_shared() {
  constexpr int kMaxDevices = 64;
  static int limits[kMaxDevices] = {};
  int device = 0;
  cudaGetDevice(&device);
  if (device < kMaxDevices && limits[device] != 0) return limits[device];
  int limit = 0;
  cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  cudaFuncSetAttribute(gemv_ring_kernel<kTiles, kStages, kPrefetch>,
                       cudaFuncAttributeMaxDynamicSharedMemorySize, limit);
  if (device < kMaxDevices) limits[device] = limit;
  return limit;
}

// stages: 0 for the register path, else the depth of the cp.async ring
template <int kTiles, int kStages, bool kPrefetch>
int launch(const void* x, const void* w, const void* scale, const void* zero, void* out, int m,
           int n, int k, int group, int warps, int splits, void* workspace, cudaStream_t stream) {
  const int steps = k / kStep;
  const int per_split = (steps + splits - 1) / splits;
  float* partial = splits > 1 ? static_cast<float*>(workspace) : nullptr;
  const int rows_per_block = kTiles * kTileRows;
  const dim3 grid((n + rows_per_block - 1) / rows_per_block, splits);
  const auto xp = static_cast<const __nv_bfloat16*>(x);
  const auto wp = static_cast<const uint8_t*>(w);
  const auto sp = static_cast<const __nv_bfloat16*>(scale);
  const auto zp = static_cast<const uint8_t*>(zero);
  const auto op = static_cast<__nv_bfloat16*>(out);
  if constexpr (kStages == 0) {
    gemv_kernel<kTiles, kPrefetch>
        <<<grid, warps * 32, 0, stream>>>(xp, wp, sp, zp, op, partial, m, n, k, group, per_split);
  } else {
    const auto kernel = gemv_ring_kernel<kTiles, kStages, kPrefetch>;
    const size_t bytes = ring_bytes<kTiles>(m, warps, kStages);
    if (bytes > size_t(allow_shared<kTiles, kStages, kPrefetch>()))
      return fc::fail("the ring needs more shared memory than a block may have: fewer stages");
    kernel<<<grid, warps * 32, bytes, stream>>>(xp, wp, sp, zp, op, partial, m, n, k, group,
                                                per_split);
  }
  if (partial != nullptr) {
    const int count = m * n;
    round_splits<<<(count + 255) / 256, 256, 0, stream>>>(partial, op, count, splits);
  }
  return 0;
}

template <int kTiles, int kStages, bool kPrefetch>
struct Config {
  static constexpr int tiles = kTiles;
  static constexpr int stages = kStages;
  static constexpr bool prefetch = kPrefetch;
};

// the template instance of (tiles, stages, prefetch); -1 for a combination not built
template <int kTiles, bool kPrefetch, class Run>
int dispatch_stages(int stages, Run run) {
  switch (stages) {
    case 0: return run(Config<kTiles, 0, kPrefetch>{});
    case 4: return run(Config<kTiles, 4, kPrefetch>{});
    case 6: return run(Config<kTiles, 6, kPrefetch>{});
    default: return -1;
  }
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

// tiles: 16-row tiles a warp takes (1 or 2); warps: a block's (4 or 8); l2_prefetch: 0 or 1
// (load_codes); stages: 0 (registers) or the cp.async ring's depth (4 or 6); 0 on success,
// otherwise fc_w4a16_gemv_error() says why
int fc_w4a16_gemv(const void* x, const void* w, const void* scale, const void* zero, void* out,
                  int m, int n, int k, int group, int tiles, int warps, int l2_prefetch,
                  int stages, int splits, void* workspace, size_t workspace_bytes,
                  void* stream) {
  if (m < 1 || m > 8) return fc::fail("the GEMV takes 1 to 8 token rows");
  if (k % kStep != 0 || group % kStep != 0 || k % group != 0)
    return fc::fail("K and the group size must be multiples of 128, the group dividing K");
  if (splits < 1 || splits > k / kStep) return fc::fail("splits must be 1 to K / 128");
  if (tiles != 1 && tiles != 2) return fc::fail("tiles must be 1 or 2");
  if (warps != 4 && warps != 8) return fc::fail("warps must be 4 or 8");
  if (stages != 0 && stages != 4 && stages != 6) return fc::fail("stages must be 0, 4 or 6");
  if (size_t(n) * (k / 2) >= (size_t(1) << 32))
    return fc::fail("the GEMV takes weights under 4 GiB (32-bit offsets)");
  if (fc_w4a16_gemv_workspace(m, n, splits) > workspace_bytes)
    return fc::fail("workspace too small");
  auto s = static_cast<cudaStream_t>(stream);
  const auto run = [&](auto config) {
    using C = decltype(config);
    return launch<C::tiles, C::stages, C::prefetch>(x, w, scale, zero, out, m, n, k, group, warps,
                                                    splits, workspace, s);
  };
  const int status =
      tiles == 1 ? (l2_prefetch ? dispatch_stages<1, true>(stages, run)
                                : dispatch_stages<1, false>(stages, run))
                 : (l2_prefetch ? dispatch_stages<2, true>(stages, run)
                                : dispatch_stages<2, false>(stages, run));
  return fc::finish(status);
}

}  // extern "C"
