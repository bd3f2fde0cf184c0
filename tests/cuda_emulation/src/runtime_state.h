// CUDA emulation: state shared by the runtime API and the launcher (internal).
#pragma once

#include <cstddef>
#include <string>

namespace mkemu::detail {

// The modelled device: an sm_90 part (H100/H200 limits).
constexpr size_t kDefaultDynamicSmem = 48 * 1024;  // without cudaFuncSetAttribute
constexpr size_t kMaxDynamicSmem = 227 * 1024;     // sharedMemPerBlockOptin
constexpr int kMaxThreadsPerBlock = 1024;

// Records err (a cudaError_t) as the calling thread's last error; detail is what
// cudaGetErrorString(err) returns for it afterwards (so check_cuda messages say what went wrong).
void set_last_error(int err, const std::string& detail);
// The device's per-block shared memory limit: kMaxDynamicSmem, or env MKEMU_SMEM_OPTIN (bytes) to
// model a smaller part (e.g. 101376 for sm_86/89).
size_t device_smem_optin();
// The dynamic shared memory a launch of `kernel` may use (cudaFuncAttributeMaxDynamicSharedMemorySize).
size_t max_dynamic_smem(const void* kernel);

}  // namespace mkemu::detail
