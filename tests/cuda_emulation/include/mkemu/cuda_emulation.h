// CUDA emulation build: what cuda/*.cu see instead of nvcc's device compilation.
// Included by cuda/cuda_common.cuh when MEMKERNELS_CUDA_EMULATION is defined; never part of the
// normal library or the wheel. The real cuda_runtime.h / cuda_fp16.h / cuda_bf16.h are used as
// they are (under a host compiler their half and bfloat16 types are correct host code); this layer
// supplies what only nvcc provides: the execution model, shared memory, intrinsics and PTX.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>

#include <cmath>

#include "mkemu/execution.h"
#include "mkemu/intrinsics.h"
#include "mkemu/streams.h"
#include "mkemu/tensor_core.h"
#include "mkemu/warp.h"

// The emulated device is an sm_90 part, and everything after this line is "device code": a body
// behind `#if __CUDA_ARCH__ >= 800` is compiled, so one left as inline asm fails to compile here
// instead of vanishing and leaving zeros. (Defined after the toolkit headers, whose host versions
// are the ones that compile under a host compiler.)
#define __CUDA_ARCH__ 900

// __shared__ inside a kernel: one copy per OS worker = per running block (see execution.h).
#undef __shared__
#define __shared__ static thread_local
// __constant__ data is ordinary global data here.
#undef __constant__
#define __constant__
#undef __launch_bounds__
#define __launch_bounds__(...)

// CUDA's built-in variables and barrier, as the kernels spell them (after the toolkit headers:
// driver_types.h has struct members named blockDim and gridDim).
#define threadIdx (::mkemu::t_current->thread_idx)
#define blockIdx (::mkemu::t_current->block_idx)
#define blockDim (::mkemu::t_current->block_dim)
#define gridDim (::mkemu::t_current->grid_dim)
#define __syncthreads() ::mkemu::syncthreads(::mkemu::Site{__FILE__, __LINE__})
#define __trap() ::mkemu::fail("__trap()", ::mkemu::Site{__FILE__, __LINE__})

// cuda_runtime.h declares this C++ overload (kernel pointer, no cast) only for nvcc.
template <typename... Params>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
