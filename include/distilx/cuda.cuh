// distilx umbrella header for CUDA users: the CUDA backend (error checks, device memory,
// cuBLAS products, op overloads for the cuda tag) followed by the whole library, so that
// Student<T, cuda>, AdamW<T, cuda> and clip_grad_norm on Buffer<T, cuda> resolve to device code.
// Compile with nvcc (see docs/build_options.md); CPU-only users include distilx/distilx.hpp.
#pragma once

// 1. Backend primitives.
#include "distilx/backend/cuda/check.cuh"
#include "distilx/backend/cuda/memory.cuh"
#include "distilx/backend/cuda/blas.cuh"
#include "distilx/backend/cuda/hooks.cuh"

// 2. CUDA overloads of the ops. ORDER MATTERS: these must come before any header that calls
//    ops (cells, blocks, models, loss, optim, distill, teacher). Those call `ops::name(Backend{}, ...)`
//    qualified, and a qualified name in a template binds to the overloads declared before the
//    template's definition, not at its instantiation (no ADL), so a cuda overload declared later
//    would never be found. Further CUDA op headers (e.g. loss ops) belong here too.
#include "distilx/backend/cuda/ops.cuh"
#include "distilx/backend/cuda/loss_ops.cuh"     // vocabulary loss rows, alignment rows
#include "distilx/backend/cuda/teacher_ops.cuh"  // RoPE, fused causal attention

// CUDA cell specialisations (MLSTMCell<T, cuda> / SLSTMCell<T, cuda>) come after the ops, since
// they include the CPU cell headers, and before any block or student is instantiated.
#include "distilx/backend/cuda/mlstm.cuh"
#include "distilx/backend/cuda/slstm.cuh"

// 3. The library itself (cells, blocks, student, I/O, loss, optimizer, distiller).
#include "distilx/distilx.hpp"
