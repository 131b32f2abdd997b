// INT4 group-wise weights x bf16 activations on Hopper, through CUTLASS's mixed-input GEMM
// (the narrow operand dequantized in registers, then register-sourced wgmma; the overlap of
// dequantization and MMA that Triton 3.6 does not give us on sm_90).
//
// Built at run time by faircalib.kernels.cutlass_w4 (nvcc, CUTLASS headers from the
// nvidia-cutlass wheel) and loaded with ctypes: a plain C ABI over raw device pointers, so the
// library does not link against torch and one build serves any torch version.
//
// The GEMM is out[m, n] = x[m, k] @ W[n, k]^T with W = scale * q + zero per group of `group`
// input channels (q signed int4). wgmma takes only its A operand from registers, so the weight
// is A: the kernel computes out^T = W @ x^T (problem n x m x k) and writes it column-major,
// which is out in row-major order.
//
// Layouts the caller provides:
//   x      [m, k] bf16, row-major
//   w      [n, k] int4, K-major, two per byte, element 0 in the low nibble; for the shuffled
//          configs permuted as fc_w4a16_sm90_shuffled_offset says (the values one thread
//          reads made contiguous)
//   scale  [k / group, n] bf16, row-major (CUTLASS wants the scales N-major)
//   zero   [k / group, n] bf16, the same layout
//   out    [m, n] bf16, row-major

#include <cstdint>

#include <cuda_runtime.h>

#include "common.cuh"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/util/mixed_dtype_utils.hpp"  // compute_memory_reordering_atom
#include "cutlass/util/packed_stride.hpp"

using namespace cute;

namespace {

using Mma = cutlass::bfloat16_t;
using Quant = cutlass::int4b_t;
using Accum = float;
constexpr int kTileK = 128 * 8 / cutlass::sizeof_bits<Mma>::value;  // 64: one 128-byte row

// The activations (the kernel's B) are K-major: x row-major is B column-major.
using LayoutX = cutlass::layout::ColumnMajor;
using StrideX = cutlass::detail::TagToStrideB_t<LayoutX>;
// The weight (the kernel's A) is K-major too.
using LayoutW = cutlass::layout::RowMajor;
using StrideW = cutlass::detail::TagToStrideA_t<LayoutW>;
// out^T column-major is out row-major.
using LayoutOut = cutlass::layout::ColumnMajor;

// The offline shuffle: the 16 int4 values a thread feeds one wgmma made contiguous, in the
// order [0, 2, 4, 6, 1, 3, 5, 7] that lets the int4 -> bf16 conversion unpack pairs at once.
using ValueShuffle = Layout<Shape<_2, _4>, Stride<_4, _1>>;
using ShuffleAtom = decltype(cutlass::compute_memory_reordering_atom<
                             Mma, Layout<Shape<_1, _1>>, ValueShuffle>());
constexpr int kShuffleRows = 16;  // the atom: 16 rows x 16 columns of the weight
static_assert(size<0>(ShuffleAtom{}) == kShuffleRows && size<1>(ShuffleAtom{}) == kShuffleRows);
using LayoutWShuffled =
    decltype(tile_to_shape(ShuffleAtom{}, Layout<Shape<int, int, int>, StrideW>{}));

// Scheduler: void (one output tile per CTA, persistent) or cutlass::gemm::StreamKScheduler (the
// K loop of too few tiles split over the SMs; its partial sums meet in the workspace).
template <int TileN, int TileM, bool Shuffled, class Schedule, class EpiSchedule,
          class Scheduler = void>
struct Gemm {
  using TileShape = Shape<Int<TileN>, Int<TileM>, Int<kTileK>>;
  using Cluster = Shape<_1, _1, _1>;
  using WLayoutArg = cute::conditional_t<Shuffled, LayoutWShuffled, LayoutW>;
  static constexpr bool kShuffled = Shuffled;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, Accum, Accum,
      void, LayoutOut, 8,  // no C operand: beta is always 0
      Mma, LayoutOut, 8, EpiSchedule>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      cute::tuple<Quant, Mma, Mma>, WLayoutArg, 32,  // weight, its scale and zero
      Mma, LayoutX, 8,
      Accum, TileShape, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      Schedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop,
                                                      Epilogue, Scheduler>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Device::Arguments arguments(const void* x, const void* w, const void* scale,
                                              const void* zero, void* out, int m, int n, int k,
                                              int group) {
    int groups = k / group;
    auto stride_x = cutlass::make_cute_packed_stride(StrideX{}, make_shape(m, k, 1));
    auto stride_s = cutlass::make_cute_packed_stride(typename Mainloop::StrideScale{},
                                                     make_shape(n, groups, 1));
    auto stride_out = cutlass::make_cute_packed_stride(typename Kernel::StrideD{},
                                                       make_shape(n, m, 1));
    auto w_layout = [&] {
      auto stride_w = cutlass::make_cute_packed_stride(StrideW{}, make_shape(n, k, 1));
      if constexpr (Shuffled) {
        return tile_to_shape(ShuffleAtom{}, make_shape(n, k, 1));
      } else {
        return stride_w;
      }
    }();
    return typename Device::Arguments{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {n, m, k, 1},
        {static_cast<const Quant*>(w), w_layout, static_cast<const Mma*>(x), stride_x,
         static_cast<const Mma*>(scale), stride_s, group, static_cast<const Mma*>(zero)},
        {{1.0f, 0.0f}, nullptr, stride_out, static_cast<Mma*>(out), stride_out},
        fc::hardware()};
  }

  static size_t workspace(int m, int n, int k, int group) {
    auto args = arguments(nullptr, nullptr, nullptr, nullptr, nullptr, m, n, k, group);
    return Device::get_workspace_size(args);
  }

  static int run(const void* x, const void* w, const void* scale, const void* zero, void* out,
                 int m, int n, int k, int group, void* workspace, size_t workspace_bytes,
                 cudaStream_t stream) {
    return fc::launch<Device>(arguments(x, w, scale, zero, out, m, n, k, group), workspace,
                              workspace_bytes, stream,
                              "CUTLASS cannot run this shape (alignment, or group not a multiple of 64)");
  }
};

using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;

// The configurations, by index: (weight rows per tile) x (token rows per tile), shuffled or not.
// Token tiles from 32 to 256 cover the cached steps (M = 32 x batch) up to a whole canvas.
using Config0 = Gemm<128, 128, true, Coop, CoopEpi>;
using Config1 = Gemm<128, 64, true, Coop, CoopEpi>;
using Config2 = Gemm<128, 32, true, Coop, CoopEpi>;
using Config3 = Gemm<128, 256, true, Coop, CoopEpi>;
using Config4 = Gemm<128, 128, false, Coop, CoopEpi>;
// Stream-K: deep layers with few output tiles (N = 4096 at M = 256 is 64 tiles of 128 x 128
// for 132 SMs; Dream's 3584 x 512 K / V, 4 tiles across N) split their K loop instead.
using StreamK = cutlass::gemm::StreamKScheduler;
using Config5 = Gemm<128, 128, true, Coop, CoopEpi, StreamK>;
using Config6 = Gemm<128, 256, true, Coop, CoopEpi, StreamK>;
using Config7 = Gemm<128, 64, true, Coop, CoopEpi, StreamK>;
// Ping-pong: two consumer warp groups on alternate 64-row tiles, so one converts and multiplies
// while the other runs its epilogue (the cooperative configs share each tile between both).
using Pingpong = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PingpongEpi = cutlass::epilogue::TmaWarpSpecialized;
using Config8 = Gemm<64, 64, true, Pingpong, PingpongEpi>;
using Config9 = Gemm<64, 128, true, Pingpong, PingpongEpi>;
using Config10 = Gemm<64, 256, true, Pingpong, PingpongEpi>;
constexpr int kConfigs = 11;
const char* kConfigNames[kConfigs] = {
    "128x128 shuffled",          "128x64 shuffled",           "128x32 shuffled",
    "128x256 shuffled",          "128x128",                   "128x128 shuffled, stream-K",
    "128x256 shuffled, stream-K", "128x64 shuffled, stream-K", "64x64 shuffled, ping-pong",
    "64x128 shuffled, ping-pong", "64x256 shuffled, ping-pong"};

template <class F>
int dispatch(int config, F&& f) {
  switch (config) {
    case 0: return f(Config0{});
    case 1: return f(Config1{});
    case 2: return f(Config2{});
    case 3: return f(Config3{});
    case 4: return f(Config4{});
    case 5: return f(Config5{});
    case 6: return f(Config6{});
    case 7: return f(Config7{});
    case 8: return f(Config8{});
    case 9: return f(Config9{});
    case 10: return f(Config10{});
    default: return -1;
  }
}

}  // namespace

extern "C" {

int fc_w4a16_sm90_configs() { return kConfigs; }

const char* fc_w4a16_sm90_config_name(int config) {
  return config >= 0 && config < kConfigs ? kConfigNames[config] : "";
}

int fc_w4a16_sm90_shuffled(int config) {
  return dispatch(config, [](auto g) { return int(decltype(g)::kShuffled); });
}

const char* fc_w4a16_sm90_error() { return fc::g_error; }

// bytes of workspace a call needs; (size_t)-1 for an unknown config
size_t fc_w4a16_sm90_workspace(int config, int m, int n, int k, int group) {
  size_t bytes = size_t(-1);
  dispatch(config, [&](auto g) {
    bytes = decltype(g)::workspace(m, n, k, group);
    return 0;
  });
  return bytes;
}

// 0 on success; otherwise fc_w4a16_sm90_error() says why
int fc_w4a16_sm90_gemm(int config, const void* x, const void* w, const void* scale,
                       const void* zero, void* out, int m, int n, int k, int group,
                       void* workspace, size_t workspace_bytes, void* stream) {
  if (k % group != 0 || group % kTileK != 0)
    return fc::fail("the group size must divide K and be a multiple of 64");
  if (n % kShuffleRows != 0) return fc::fail("N must be a multiple of 16 (the shuffle atom)");
  return fc::finish(dispatch(config, [&](auto g) {
    return decltype(g)::run(x, w, scale, zero, out, m, n, k, group, workspace, workspace_bytes,
                            static_cast<cudaStream_t>(stream));
  }));
}

// Where element (i, j) of an [n, k] weight goes in the shuffled layout: the layout the kernel
// reads, evaluated on the host. faircalib shuffles with torch (cutlass_w4.shuffle_offsets);
// the CUDA tests check that formula against this one.
int64_t fc_w4a16_sm90_shuffled_offset(int n, int k, int i, int j) {
  auto layout = tile_to_shape(ShuffleAtom{}, make_shape(n, k, 1));
  return int64_t(layout(i, j, 0));
}

}  // extern "C"
