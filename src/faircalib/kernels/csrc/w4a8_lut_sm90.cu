// INT4 x FP8 GEMM on Hopper with the INT4 weight converted to e4m3 in registers through a
// per-group lookup table (CUTLASS's mixed-input mainloop, its scale-lookup-table mode), for
// W4A8 at large M without a per-call e4m3 temporary and without per-group float rescaling of
// the accumulator: each group's scale is folded into its table, so the K loop is a plain FP8
// GEMM, and the per-output and per-token scales are applied once, in the epilogue.
//
// The weight this computes with: w[n, k] = w_scale[n] * lut[g, n][v], v the signed INT4 value
// in [-8, 7] and g = k / group. A table holds the 8 negative levels, -8 r ... -1 r as e4m3
// (r = the group's scale relative to w_scale); the positive levels are their negations, read
// by flipping the sign bit, so a code stores v < 0 as its two's complement nibble, v > 0 as
// 8 - v and 0 as 0 (the kernel reads the low three bits as the table index, the top bit as
// the sign). The levels are exact where every k r is an e4m3 number (r a power of two).
//
// wgmma takes only its A operand from registers, so the weight is A: the kernel computes
// out^T = W @ x^T (problem n x m x k) and writes it column-major, which is out row-major.
//
// Layouts the caller provides:
//   x        [m, k] e4m3, row-major (the per-token quantized activations)
//   x_scale  [m] float32
//   w        [n, k] int4 codes as above, two per byte, element 0 in the low nibble, permuted as
//            fc_w4a8_lut_sm90_shuffled_offset says (the 16 values a thread feeds one wgmma
//            made contiguous)
//   lut      [k / group, n] x 8 e4m3 (N-major: CUTLASS wants the scales so)
//   w_scale  [n] float32
//   out      [m, n] bf16, row-major

#include <cstdint>

#include <cuda_runtime.h>

#include "common.cuh"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/util/mixed_dtype_utils.hpp"  // compute_memory_reordering_atom
#include "cutlass/util/packed_stride.hpp"

using namespace cute;

namespace {

using E4m3 = cutlass::float_e4m3_t;
using Quant = cutlass::int4b_t;
using Table = cutlass::Array<E4m3, 8>;  // an Array scale type selects the lookup-table mode
using Out = cutlass::bfloat16_t;
constexpr int kTileK = 128;  // one 128-byte row of e4m3

using LayoutX = cutlass::layout::ColumnMajor;  // x row-major is B column-major
using StrideX = cutlass::detail::TagToStrideB_t<LayoutX>;
using LayoutW = cutlass::layout::RowMajor;
using StrideW = cutlass::detail::TagToStrideA_t<LayoutW>;
using LayoutOut = cutlass::layout::ColumnMajor;  // out^T column-major is out row-major

using ShuffleAtom = decltype(cutlass::compute_memory_reordering_atom<E4m3>());
using LayoutWShuffled =
    decltype(tile_to_shape(ShuffleAtom{}, Layout<Shape<int, int, int>, StrideW>{}));

// out^T[n, m] = acc * w_scale[n] * x_scale[m]: w_scale per row of the swapped problem (a
// column broadcast), x_scale per column (a row broadcast), rounded to bf16 once.
template <class TileShape>
using ScaleEpilogue = cutlass::epilogue::fusion::Sm90EVT<
    cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, Out, float,
                                           cutlass::FloatRoundStyle::round_to_nearest>,
    cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float,
                                                Stride<Int<0>, Int<1>, Int<0>>>,
    cutlass::epilogue::fusion::Sm90EVT<
        cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float,
                                               cutlass::FloatRoundStyle::round_to_nearest>,
        cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float,
                                                    Stride<Int<1>, Int<0>, Int<0>>>,
        cutlass::epilogue::fusion::Sm90AccFetch>>;

template <int TileN, int TileM, class Schedule, class EpiSchedule, class Scheduler = void>
struct Gemm {
  using TileShape = Shape<Int<TileN>, Int<TileM>, Int<kTileK>>;
  using Cluster = Shape<_1, _1, _1>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutOut, 8, Out,
      LayoutOut, 8, EpiSchedule, ScaleEpilogue<TileShape>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cute::tuple<Quant, Table>,
      LayoutWShuffled, 32, E4m3, LayoutX, 16, float, TileShape, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      Schedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop,
                                                      Epilogue, Scheduler>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Device::Arguments arguments(const void* x, const void* x_scale, const void* w,
                                              const void* lut, const void* w_scale, void* out,
                                              int m, int n, int k, int group) {
    auto stride_x = cutlass::make_cute_packed_stride(StrideX{}, make_shape(m, k, 1));
    auto stride_lut = cutlass::make_cute_packed_stride(typename Mainloop::StrideScale{},
                                                       make_shape(n, k / group, 1));
    auto stride_out = cutlass::make_cute_packed_stride(typename Kernel::StrideD{},
                                                       make_shape(n, m, 1));
    typename Device::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {n, m, k, 1},
        {static_cast<const Quant*>(w), tile_to_shape(ShuffleAtom{}, make_shape(n, k, 1)),
         static_cast<const E4m3*>(x), stride_x, static_cast<const Table*>(lut), stride_lut,
         group},
        {{}, nullptr, stride_out, static_cast<Out*>(out), stride_out},
        fc::hardware()};
    // the visitor tree's arguments: {x_scale, {w_scale, acc, multiply}, multiply}
    args.epilogue.thread = {
        {static_cast<const float*>(x_scale)}, {{static_cast<const float*>(w_scale)}, {}, {}}, {}};
    return args;
  }

  static size_t workspace(int m, int n, int k, int group) {
    return Device::get_workspace_size(
        arguments(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, m, n, k, group));
  }

  static int run(const void* x, const void* x_scale, const void* w, const void* lut,
                 const void* w_scale, void* out, int m, int n, int k, int group,
                 void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    return fc::launch<Device>(arguments(x, x_scale, w, lut, w_scale, out, m, n, k, group),
                              workspace, workspace_bytes, stream,
                              "CUTLASS cannot run this shape (alignment, or the group size)");
  }
};

using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Pingpong = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PingpongEpi = cutlass::epilogue::TmaWarpSpecialized;
using StreamK = cutlass::gemm::StreamKScheduler;

// By index: (weight rows per tile) x (token rows per tile), K 128, the schedule.
using Config0 = Gemm<128, 128, Coop, CoopEpi>;
using Config1 = Gemm<128, 256, Coop, CoopEpi>;
using Config2 = Gemm<64, 128, Pingpong, PingpongEpi>;
using Config3 = Gemm<64, 256, Pingpong, PingpongEpi>;
using Config4 = Gemm<128, 128, Coop, CoopEpi, StreamK>;
using Config5 = Gemm<128, 256, Coop, CoopEpi, StreamK>;
// Few token rows (cached block decoding: M = 32 x batch): narrower token tiles, so a
// memory-bound call spreads its weight over more CTAs and wastes fewer MMA rows.
using Config6 = Gemm<128, 64, Coop, CoopEpi>;
using Config7 = Gemm<128, 32, Coop, CoopEpi>;
using Config8 = Gemm<128, 64, Coop, CoopEpi, StreamK>;
constexpr int kConfigs = 9;
const char* kConfigNames[kConfigs] = {
    "128x128 cooperative", "128x256 cooperative", "64x128 ping-pong",
    "64x256 ping-pong",    "128x128 stream-K",    "128x256 stream-K",
    "128x64 cooperative",  "128x32 cooperative",  "128x64 stream-K"};

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
    default: return -1;
  }
}

}  // namespace

extern "C" {

int fc_w4a8_lut_sm90_configs() { return kConfigs; }

const char* fc_w4a8_lut_sm90_config_name(int config) {
  return config >= 0 && config < kConfigs ? kConfigNames[config] : "";
}

const char* fc_w4a8_lut_sm90_error() { return fc::g_error; }

size_t fc_w4a8_lut_sm90_workspace(int config, int m, int n, int k, int group) {
  size_t bytes = size_t(-1);
  dispatch(config, [&](auto g) {
    bytes = decltype(g)::workspace(m, n, k, group);
    return 0;
  });
  return bytes;
}

// 0 on success; otherwise fc_w4a8_lut_sm90_error() says why
int fc_w4a8_lut_sm90_gemm(int config, const void* x, const void* x_scale, const void* w,
                          const void* lut, const void* w_scale, void* out, int m, int n, int k,
                          int group, void* workspace, size_t workspace_bytes, void* stream) {
  if (group <= 0 || k % group != 0 || group % kTileK != 0)
    return fc::fail("the group size must divide K and be a multiple of 128");
  return fc::finish(dispatch(config, [&](auto g) {
    return decltype(g)::run(x, x_scale, w, lut, w_scale, out, m, n, k, group, workspace,
                            workspace_bytes, static_cast<cudaStream_t>(stream));
  }));
}

// Where element (i, j) of an [n, k] weight goes in the shuffled layout, evaluated on the host.
int64_t fc_w4a8_lut_sm90_shuffled_offset(int n, int k, int i, int j) {
  auto layout = tile_to_shape(ShuffleAtom{}, make_shape(n, k, 1));
  return int64_t(layout(i, j, 0));
}

}  // extern "C"
