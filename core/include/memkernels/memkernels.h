// memkernels.h — everything public, in one include.
#pragma once

#include "memkernels/tensor.h"
#include "memkernels/runtime.h"
#include "memkernels/attention.h"
#include "memkernels/paged_kv_cache.h"
#include "memkernels/quant.h"
#include "memkernels/sparse.h"
#include "memkernels/weight_store.h"
