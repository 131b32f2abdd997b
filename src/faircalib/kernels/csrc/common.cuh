// What the CUDA libraries in this folder share: the last error, the GPU's SM count for the
// persistent and stream-K tile schedulers, and the launch sequence of a CUTLASS device GEMM.
// Internal linkage (the unnamed namespace): each library keeps its own copy of this state, where
// inline variables of default visibility would be one symbol shared by every library loaded.
#pragma once

#include <cstddef>
#include <cstdio>

#include <cuda_runtime.h>

#include "cutlass/cutlass.h"
#include "cutlass/kernel_hardware_info.h"

namespace fc {
namespace {

char g_error[512] = "";

// Records why a call failed (read back through the library's *_error function); returns 1.
inline int fail(const char* what) {
  std::snprintf(g_error, sizeof(g_error), "%s", what);
  return 1;
}

// The current device and its SM count, queried once per device: without it CUTLASS queries the
// driver on every call, and the stream-K scheduler sizes its grid by it.
inline cutlass::KernelHardwareInfo hardware() {
  constexpr int kMaxDevices = 64;
  static int sm_counts[kMaxDevices] = {};
  int device = 0;
  cudaGetDevice(&device);
  cutlass::KernelHardwareInfo info;
  info.device_id = device;
  if (device >= kMaxDevices) {
    info.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  } else {
    if (sm_counts[device] == 0)
      sm_counts[device] = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
    info.sm_count = sm_counts[device];
  }
  return info;
}

// Checks, initializes (the workspace: stream-K's partial sums and flags) and launches a GEMM
// on `stream`; `cannot` is the message when CUTLASS refuses the shape.
template <class Device>
int launch(typename Device::Arguments const& args, void* workspace, size_t workspace_bytes,
           cudaStream_t stream, const char* cannot) {
  Device gemm;
  if (Device::get_workspace_size(args) > workspace_bytes) return fail("workspace too small");
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return fail(cannot);
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess)
    return fail("CUTLASS initialize failed");
  if (gemm.run(stream) != cutlass::Status::kSuccess) return fail("CUTLASS launch failed");
  return 0;
}

// A dispatch result as the C entry points return it: -1 (no such config) becomes an error, and
// a launch that CUDA rejected names CUDA's reason.
inline int finish(int status) {
  if (status < 0) return fail("unknown config");
  cudaError_t launched = cudaGetLastError();
  if (launched != cudaSuccess) return fail(cudaGetErrorString(launched));
  return status;
}

}  // namespace
}  // namespace fc
