// FP8 x FP8 GEMM with group-wise weight scales and per-token activation scales on Hopper, for
// W4A8 at large M: the INT4 codes minus their zero points (integers in [-15, 15], exact in
// e4m3) are unpacked to an e4m3 [n, k] temporary per call, then this GEMM applies each
// (output, 128-k group) scale to the float accumulator of that group's wgmmas, and the
// per-token scale once, in the epilogue.
//
// Why CUTLASS's block-scaled FP8 mainloop: a group scale must be applied between one group's
// MMAs and the next. Our Triton loop waits for each group's MMA before scaling it and runs at
// 17-27% of the 8-bit peak (benchmarks/results/kernels-w4a8-rescale). CUTLASS's mainloop waits
// too, but a producer warp keeps the operands streaming in through TMA meanwhile: its GEMM runs
// at 43-52% of the 8-bit peak on the H200, where per-channel FP8 reaches 53-73%, and its
// ping-pong schedule (each consumer warp group its own tile, scaling while the other
// multiplies) did not help: 128 x 128 tiles do not fit, 64 x 128 ones ran slower
// (benchmarks/results/cutlass-w4a8).
//
// Built and loaded like w8a8_sm90.cu (faircalib.kernels.cutlass_w4a8). Layouts:
//   a        [m, k] e4m3, row-major (the per-token quantized activations)
//   a_scale  [m] float32 (applied in the epilogue)
//   w        [n, k] e4m3, row-major (K-major: what wgmma wants of B)
//   w_scale  [n, k / 128] float32, row-major (one scale per output and 128-k group)
//   out      [m, n] bf16, row-major

#include <cstdint>
#include <cstdio>

#include <cuda_runtime.h>

#include "common.cuh"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/detail/blockwise_scale_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;

namespace {

using E4m3 = cutlass::float_e4m3_t;
using Out = cutlass::bfloat16_t;
using LayoutA = cutlass::layout::RowMajor;
using LayoutW = cutlass::layout::ColumnMajor;  // B [k, n] column-major is w [n, k] row-major
using LayoutOut = cutlass::layout::RowMajor;
constexpr int kGroup = 128;  // k per weight scale: the K tile

// The mainloop's scale factors: one per output and group for B (K-major, so w_scale
// [n, k / 128] row-major is its layout as stored) and, for A, one per tile of rows: 1.0, read
// from g_ones. The per-token scale is applied once, in the epilogue. Why: with a scale per row
// of A too, each group's promotion multiplies every accumulator element by two scales; with
// one per tile, CUTLASS folds that one into B's scales and the promotion is one FMA an element.
constexpr int kMaxGroups = 1024;  // K up to 131072
struct Ones {
  float v[kMaxGroups];
  constexpr Ones() : v() {
    for (int i = 0; i < kMaxGroups; ++i) v[i] = 1.0f;
  }
};
__device__ Ones g_ones;  // constant-initialized: one copy a device, no initialization call

// g_ones' address on the current device, looked up once a device; nullptr (and the reason in
// fc::g_error, the CUDA error cleared) if CUDA cannot give it. Calls of one device come from
// one Python thread at a time (the GIL is held around the ctypes call), so the cache needs no
// lock.
const float* ones() {
  constexpr int kMaxDevices = 64;
  static const float* found[kMaxDevices] = {};
  int device = 0;
  cudaGetDevice(&device);
  if (device < kMaxDevices && found[device] != nullptr) return found[device];
  void* ptr = nullptr;
  cudaError_t status = cudaGetSymbolAddress(&ptr, g_ones);
  if (status != cudaSuccess) {
    cudaGetLastError();  // cleared: the message below says it
    char what[256];
    std::snprintf(what, sizeof(what), "cannot find the library's scale factors on device %d: %s",
                  device, cudaGetErrorString(status));
    fc::fail(what);
    return nullptr;
  }
  if (device < kMaxDevices) found[device] = static_cast<const float*>(ptr);
  return static_cast<const float*>(ptr);
}

template <int TileM>
using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<TileM, 1, kGroup, cute::GMMA::Major::K,
                                                              cute::GMMA::Major::K>;

template <class TileShape>
using TokenScaleEpilogue = cutlass::epilogue::fusion::Sm90EVT<
    cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, Out, float,
                                           cutlass::FloatRoundStyle::round_to_nearest>,
    // a_scale, one per row m
    cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float,
                                                Stride<Int<1>, Int<0>, Int<0>>>,
    cutlass::epilogue::fusion::Sm90AccFetch>;

// Scheduler: void (persistent, one output tile per CTA) or cutlass::gemm::StreamKScheduler.
template <int TileM, int TileN, int ClusterM, class Schedule, class EpiSchedule,
          class Scheduler = void>
struct Gemm {
  using TileShape = Shape<Int<TileM>, Int<TileN>, Int<kGroup>>;
  using Cluster = Shape<Int<ClusterM>, _1, _1>;
  using Scales = ScaleConfig<TileM>;
  using LayoutSFA = decltype(Scales::deduce_layoutSFA());
  using LayoutSFB = decltype(Scales::deduce_layoutSFB());
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, LayoutOut, 8, Out,
      LayoutOut, 8, EpiSchedule, TokenScaleEpilogue<TileShape>>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, E4m3, cute::tuple<LayoutA, LayoutSFA>,
      16, E4m3, cute::tuple<LayoutW, LayoutSFB>, 16, float, TileShape, Cluster,
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
    // A's factors: g_ones' first k / 128 entries for every tile of rows (stride 0 along M)
    auto sfa_full = Scales::tile_atom_to_shape_SFA(make_shape(m, n, k, 1));
    LayoutSFA layout_sfa = make_layout(
        shape(sfa_full), make_stride(make_stride(_0{}, int32_t(0)), make_stride(_0{}, _1{}), 0));
    auto layout_sfb = Scales::tile_atom_to_shape_SFB(make_shape(m, n, k, 1));
    typename Device::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, 1},
        {static_cast<const E4m3*>(a), stride_a, static_cast<const E4m3*>(w), stride_w, ones(),
         layout_sfa, static_cast<const float*>(w_scale), layout_sfb},
        {{}, nullptr, stride_out, static_cast<Out*>(out), stride_out},
        fc::hardware()};
    // the visitor tree's arguments: {a_scale, acc, multiply}
    args.epilogue.thread = {{static_cast<const float*>(a_scale)}, {}, {}};
    return args;
  }

  static size_t workspace(int m, int n, int k) {
    return Device::get_workspace_size(arguments(nullptr, nullptr, nullptr, nullptr, nullptr, m, n, k));
  }

  static int run(const void* a, const void* a_scale, const void* w, const void* w_scale,
                 void* out, int m, int n, int k, void* workspace, size_t workspace_bytes,
                 cudaStream_t stream) {
    if (k / kGroup > kMaxGroups) return fc::fail("K is larger than 131072 (kMaxGroups groups)");
    if (ones() == nullptr) return 1;  // ones() recorded why
    return fc::launch<Device>(arguments(a, a_scale, w, w_scale, out, m, n, k), workspace,
                              workspace_bytes, stream,
                              "CUTLASS cannot run this shape (K % 128 == 0 and N % 8 == 0)");
  }
};

using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8Blockwise;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Pingpong = cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8Blockwise;
using PingpongEpi = cutlass::epilogue::TmaWarpSpecialized;
using StreamK = cutlass::gemm::StreamKScheduler;

// By index: the tile (M x N, K 128), the cluster along M (2: each weight tile is loaded once
// for two CTAs, TMA multicast), the schedule. Larger tiles do not fit: a consumer warp group
// holds its float accumulator and the current group's partial sum (128 x 128 ping-pong, one
// tile a warp group: 256 registers a thread; it ran 0.23-0.29x of bf16 on the H200,
// cutlass-w4a8/).
using Config0 = Gemm<128, 128, 1, Coop, CoopEpi>;
using Config1 = Gemm<64, 128, 1, Pingpong, PingpongEpi>;
using Config2 = Gemm<128, 128, 2, Coop, CoopEpi>;
using Config3 = Gemm<128, 128, 1, Coop, CoopEpi, StreamK>;
constexpr int kConfigs = 4;
const char* kConfigNames[kConfigs] = {"128x128 cooperative", "64x128 pingpong",
                                      "128x128 cooperative, cluster 2x1",
                                      "128x128 cooperative, stream-K"};

template <class F>
int dispatch(int config, F&& f) {
  switch (config) {
    case 0: return f(Config0{});
    case 1: return f(Config1{});
    case 2: return f(Config2{});
    case 3: return f(Config3{});
    default: return -1;
  }
}

}  // namespace

extern "C" {

int fc_w4a8_sm90_configs() { return kConfigs; }

const char* fc_w4a8_sm90_config_name(int config) {
  return config >= 0 && config < kConfigs ? kConfigNames[config] : "";
}

const char* fc_w4a8_sm90_error() { return fc::g_error; }

size_t fc_w4a8_sm90_workspace(int config, int m, int n, int k) {
  size_t bytes = size_t(-1);
  dispatch(config, [&](auto g) {
    bytes = decltype(g)::workspace(m, n, k);
    return 0;
  });
  return bytes;
}

// 0 on success; otherwise fc_w4a8_sm90_error() says why
int fc_w4a8_sm90_gemm(int config, const void* a, const void* a_scale, const void* w,
                      const void* w_scale, void* out, int m, int n, int k, void* workspace,
                      size_t workspace_bytes, void* stream) {
  return fc::finish(dispatch(config, [&](auto g) {
    return decltype(g)::run(a, a_scale, w, w_scale, out, m, n, k, workspace, workspace_bytes,
                            static_cast<cudaStream_t>(stream));
  }));
}

}  // extern "C"
