// INT8 x INT8 GEMM with per-token x per-channel scales on Hopper, through CUTLASS's
// warp-specialized TMA + wgmma kernels, the scales applied in the epilogue (an epilogue visitor
// tree: out = acc * a_scale[m] * w_scale[n], rounded to bf16 once).
//
// Built and loaded like w4a16_sm90.cu (faircalib.kernels.cutlass_w4: one library per source,
// plain C ABI over raw device pointers). Layouts:
//   a        [m, k] int8, row-major (the per-token quantized activations)
//   a_scale  [m] float32
//   w        [n, k] int8, row-major (K-major: what wgmma wants of B)
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
#include "cutlass/util/packed_stride.hpp"

using namespace cute;

namespace {

using Out = cutlass::bfloat16_t;
using LayoutA = cutlass::layout::RowMajor;
using LayoutW = cutlass::layout::ColumnMajor;  // B [k, n] column-major is w [n, k] row-major
using LayoutOut = cutlass::layout::RowMajor;

template <class TileShape>
using ScaleEpilogue = cutlass::epilogue::fusion::Sm90EVT<
    cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, Out, float,
                                           cutlass::FloatRoundStyle::round_to_nearest>,
    // a_scale, one per row m
    cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float,
                                                Stride<Int<1>, Int<0>, Int<0>>>,
    cutlass::epilogue::fusion::Sm90EVT<
        cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float,
                                               cutlass::FloatRoundStyle::round_to_nearest>,
        // w_scale, one per column n
        cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float,
                                                    Stride<Int<0>, Int<1>, Int<0>>>,
        cutlass::epilogue::fusion::Sm90AccFetch>>;

// Scheduler: void (persistent, one output tile per CTA) or cutlass::gemm::StreamKScheduler.
template <int TileM, int TileN, int ClusterM, class Schedule, class EpiSchedule,
          class Scheduler = void>
struct Gemm {
  using TileShape = Shape<Int<TileM>, Int<TileN>, _128>;
  using Cluster = Shape<Int<ClusterM>, _1, _1>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float,
      void, LayoutOut, 8, Out, LayoutOut, 8, EpiSchedule, ScaleEpilogue<TileShape>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      int8_t, LayoutA, 16, int8_t, LayoutW, 16, int32_t, TileShape, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      Schedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop,
                                                      Epilogue, Scheduler>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Device::Arguments arguments(const void* a, const void* a_scale, const void* w,
                                              const void* w_scale, void* out, int m, int n,
                                              int k) {
    auto stride_a = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, make_shape(m, k, 1));
    auto stride_w = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, make_shape(n, k, 1));
    auto stride_out = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, make_shape(m, n, 1));
    typename Device::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, 1},
        {static_cast<const int8_t*>(a), stride_a, static_cast<const int8_t*>(w), stride_w},
        {{}, nullptr, stride_out, static_cast<Out*>(out), stride_out},
        fc::hardware()};
    // the visitor tree's arguments: {a_scale, {w_scale, acc, multiply}, multiply}
    args.epilogue.thread = {
        {static_cast<const float*>(a_scale)},
        {{static_cast<const float*>(w_scale)}, {}, {}},
        {}};
    return args;
  }

  static size_t workspace(int m, int n, int k) {
    return Device::get_workspace_size(arguments(nullptr, nullptr, nullptr, nullptr, nullptr, m, n, k));
  }

  static int run(const void* a, const void* a_scale, const void* w, const void* w_scale,
                 void* out, int m, int n, int k, void* workspace, size_t workspace_bytes,
                 cudaStream_t stream) {
    return fc::launch<Device>(arguments(a, a_scale, w, w_scale, out, m, n, k), workspace,
                              workspace_bytes, stream,
                              "CUTLASS cannot run this shape (K and N must be multiples of 16 and 8)");
  }
};

using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Pingpong = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PingpongEpi = cutlass::epilogue::TmaWarpSpecialized;

// By index: the tile (M x N, K 128), the cluster along M, the schedule.
using Config0 = Gemm<128, 128, 1, Coop, CoopEpi>;
using Config1 = Gemm<128, 256, 1, Coop, CoopEpi>;
using Config2 = Gemm<128, 256, 2, Coop, CoopEpi>;
using Config3 = Gemm<64, 128, 1, Pingpong, PingpongEpi>;
using Config4 = Gemm<64, 256, 1, Pingpong, PingpongEpi>;
// Stream-K for layers of few output tiles (Dream's 3584 x 512 K / V: 4 tiles across N).
using StreamK = cutlass::gemm::StreamKScheduler;
using Config5 = Gemm<128, 128, 1, Coop, CoopEpi, StreamK>;
using Config6 = Gemm<128, 256, 1, Coop, CoopEpi, StreamK>;
constexpr int kConfigs = 7;
const char* kConfigNames[kConfigs] = {
    "128x128 cooperative", "128x256 cooperative",          "128x256 cooperative, cluster 2x1",
    "64x128 pingpong",     "64x256 pingpong",               "128x128 cooperative, stream-K",
    "128x256 cooperative, stream-K"};

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
    default: return -1;
  }
}

}  // namespace

extern "C" {

int fc_w8a8_sm90_configs() { return kConfigs; }

const char* fc_w8a8_sm90_config_name(int config) {
  return config >= 0 && config < kConfigs ? kConfigNames[config] : "";
}

const char* fc_w8a8_sm90_error() { return fc::g_error; }

size_t fc_w8a8_sm90_workspace(int config, int m, int n, int k) {
  size_t bytes = size_t(-1);
  dispatch(config, [&](auto g) {
    bytes = decltype(g)::workspace(m, n, k);
    return 0;
  });
  return bytes;
}

// 0 on success; otherwise fc_w8a8_sm90_error() says why
int fc_w8a8_sm90_gemm(int config, const void* a, const void* a_scale, const void* w,
                      const void* w_scale, void* out, int m, int n, int k, void* workspace,
                      size_t workspace_bytes, void* stream) {
  return fc::finish(dispatch(config, [&](auto g) {
    return decltype(g)::run(a, a_scale, w, w_scale, out, m, n, k, workspace, workspace_bytes,
                            static_cast<cudaStream_t>(stream));
  }));
}

}  // extern "C"
