// CUDA kernels of the fsdfm ops (schemas in csrc/bindings.cpp, per-row maths in fsdfm/row_math.h).
//
// jump_step / sample_categorical: one thread block of kThreads = 256 threads per logits row.
//   Mapping. A row (strided rows allowed, last dimension contiguous) is split into an unaligned
//   scalar head (the elements before its first 16-byte-aligned address, < 16 bytes), an aligned
//   body read with 16-byte vector loads (4 floats or 8 halves / bfloat16s per unit) and a scalar
//   tail (< 16 bytes). Thread t owns head element t, body units t, t + T, t + 2T, ... and tail
//   element t; that fixed set is its "group" of the two-level draw. Consecutive threads read
//   consecutive 16-byte units, so every warp-wide load is a fully used 512-byte span.
//   Passes. With barrier = +inf (the default) a row is read ONCE: each thread folds its units
//   into an OnlineSoftmax (running maximum, total and allowed masses, a unit at a time); the
//   block combines the thread partials in float64. A finite barrier needs the row maximum before
//   the allowed set is known, so a first read computes the maximum only and a second read
//   (served mostly by L2: the row was just streamed) does the OnlineSoftmax with the threshold.
//   Draw. Exact inverse-CDF in two levels with float64 running sums: warp 0 picks a thread
//   (group) with probability proportional to its allowed mass, then a token inside that thread's
//   set; both levels use warp scans, so the draw after the streaming pass costs a handful of
//   warp steps and two reads of 1/T of the row, not a serial walk over the row.
//   Bytes per row: V * sizeof(dtype) read from DRAM (plus one L2-resident re-read with a finite
//   barrier), two re-reads of the chosen thread's V / T elements (L1 / L2), 8 bytes of token
//   read and 8 bytes written. No temporaries, no host synchronisation: the generator's Philox
//   state is taken capture-safely and unpacked in the kernel.
//
// probs_to_generator: one block per row as well, mapped on the (contiguous) output row so that
//   stores are 16-byte vectors; input units are vector loads when the input row has the same
//   alignment, coalesced scalar loads otherwise. barrier = +inf: one read and one write per
//   element. Finite barrier: a first read for the row maximum, then the read + write pass.
//
// Why 256 threads: a GPT-2 row (V = 50257) is 100-200 KB, i.e. about 25-50 vector units per
// thread, long enough to amortise the per-row reduction and draw; 256 threads with kUnroll = 4
// independent 16-byte loads each keep 16 KB in flight per block, several blocks per SM cover the
// DRAM latency-bandwidth product, and T / 32 = 8 group weights per lane of warp 0 keep the
// first-level scan short. The per-element work is the OnlineSoftmax unit update: the unit's
// maximum, then one exponential (MUFU.EX2) and one add per token. Measured on an H200 (B = 32,
// L = 1024, V = 50257; benchmarks/results/NVIDIA_H200): jump_step reads float32 rows at 94% and
// bfloat16 rows at 73% of the device's copy bandwidth (a per-token update: 78% and 43%).
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>

#include "cuda/draw_stages.cuh"

namespace fsdfm {
namespace {

using namespace cuda;  // NOLINT: the stages of the row kernels

struct DrawParams {
  DrawMode mode;
  const void* logits;
  int64_t L, stride_b, stride_l;  // row (b, l) starts at b * stride_b + l * stride_l elements
  int V;
  const int64_t* current;   // kJump: x_t [B, L], in [0, V)
  const int64_t* exclude;   // kSample: the excluded token per row [B, L], in [0, V); or null
  int exclude_token;        // kSample without `exclude`: one excluded id, or -1 for none
  const float* rate_scale;  // kJump: [B]
  const float* h;           // kJump: [B]
  float inv_temperature;     // 0 with greedy
  float barrier;
  Controls controls;         // top-k / top-p
  bool greedy;               // temperature 0: the argmax
  at::PhiloxCudaState philox;
  int64_t* out;
};

// The row's excluded destination: x_t (kJump) or the excluded token (kSample, -1 for none).
// False for an id outside [0, V): the row is then invalid.
__device__ __forceinline__ bool excluded_token(const DrawParams& a, int64_t r, int& excluded) {
  const int64_t* per_row = a.mode == DrawMode::kJump ? a.current : a.exclude;
  excluded = a.exclude_token;
  if (per_row == nullptr) return true;
  const int64_t e = __ldg(per_row + r);
  excluded = static_cast<int>(e);
  return e >= 0 && e < a.V;
}

// One row of jump_step (DrawMode::kJump) or sample_categorical (DrawMode::kSample): the row
// statistics, then warp 0 combines them, decides stay or jump (kJump) and draws in two levels.
template <typename T>
__global__ void __launch_bounds__(kThreads) draw_kernel(const DrawParams a) {
  using Bits = typename Elem<T>::Bits;
  __shared__ float s_max[kThreads];
  __shared__ float s_total[kThreads];
  __shared__ float s_allowed[kThreads];
  __shared__ float s_warp[kWarps];
  __shared__ double s_red[kWarps];
  __shared__ int s_arg[kWarps];

  const int t = threadIdx.x;
  const int64_t r = blockIdx.x;
  const int64_t b = r / a.L;
  const InRow<T> row(static_cast<const Bits*>(a.logits) + b * a.stride_b + (r - b * a.L) * a.stride_l,
                     a.V);
  const auto finish = [&](int64_t token) {
    if (t == 0) a.out[r] = token;
  };
  const auto uniforms = [&] {
    const auto seeds = at::cuda::philox::unpack(a.philox);
    return row_uniforms(std::get<0>(seeds), std::get<1>(seeds), static_cast<uint64_t>(r));
  };

  int excluded;
  if (!excluded_token(a, r, excluded)) return finish(kInvalidToken);
  // The token left out of the argmax and of the controls' floor: the draw's exclusion (the
  // mask), never x_t, which belongs to the destination law of a jump.
  const int skip = a.mode == DrawMode::kSample ? excluded : -1;
  if (a.greedy) {
    int64_t argmax;
    const bool valid = block_argmax(row, skip, s_warp, s_total, s_arg, argmax);
    if (t != 0) return;
    if (!valid) return finish(kInvalidToken);
    const bool jump = a.mode == DrawMode::kJump;
    return finish(greedy_result(jump, argmax, excluded, jump ? __ldg(a.rate_scale + b) : 0.0f,
                                jump ? __ldg(a.h + b) : 0.0f, uniforms().jump));
  }
  const float inv_temp = a.inv_temperature;
  float thr = kNegInf;  // barrier = +inf, no controls: every token allowed, one read of the row
  const bool controls = a.controls.active(a.V);
  const bool threshold = a.barrier < INFINITY || controls;
  if (threshold) {
    float m;
    if (!row_maximum(row, inv_temp, s_warp, m)) return finish(kInvalidToken);
    thr = reach_threshold(m, a.barrier);
    if (controls) {
      const int n = a.V - (skip >= 0 ? 1 : 0);
      thr = fmaxf(thr, control_floor(row, inv_temp, m, skip, n, a.controls, s_red));
    }
  }
  const bool bad = block_statistics(row, inv_temp, excluded, thr, threshold, s_max, s_total,
                                    s_allowed);
  if (t >= 32) return;

  // ---- Warp 0 from here on.
  const int lane = t;
  const Groups groups = combine_groups(s_max, s_total, s_allowed, lane);
  if (!row_is_valid(groups.m, bad)) return finish(kInvalidToken);
  const RowUniforms u = uniforms();
  if (a.mode == DrawMode::kJump) {
    const double p_jump = jump_probability(groups.mass, __ldg(a.rate_scale + b), __ldg(a.h + b));
    // Stay (always when nothing is allowed: p_jump = 0).
    if (!(u.jump < p_jump)) return finish(excluded);
  } else if (!(groups.mass.allowed > 0.0)) {
    return finish(kInvalidToken);  // nothing left to draw from
  }
  const int j = choose_group(groups, u.group, lane);
  finish(choose_token(row, j, s_max[j], inv_temp, excluded, thr, u.within, lane));
}

struct GeneratorParams {
  const void* probs;
  int64_t L, stride_b, stride_l;
  int V;
  const int64_t* x_t;
  const float* rate_scale;
  bool finite_barrier;
  float reach;  // e^-barrier (finite barrier only)
  void* out;    // contiguous [B, L, V]
};

// rates[x] = max(rate_scale, 0) * p(x) for reachable x != z, else 0; NaN rows on bad input.
template <typename T>
__global__ void __launch_bounds__(kThreads) generator_kernel(const GeneratorParams a) {
  using Bits = typename Elem<T>::Bits;
  constexpr int kVec = Elem<T>::kVec;
  __shared__ float s_warp[kWarps];

  const int t = threadIdx.x;
  const int64_t r = blockIdx.x;
  const int64_t b = r / a.L;
  const Bits* in = static_cast<const Bits*>(a.probs) + b * a.stride_b + (r - b * a.L) * a.stride_l;
  Bits* out = static_cast<Bits*>(a.out) + r * a.V;
  // Split by the output row's alignment, so that every body store is a full 16-byte vector;
  // the input shares it whenever its row starts at the same offset modulo 16 bytes.
  const RowSplit<T> dst(out, a.V);
  const bool vector_in =
      ((reinterpret_cast<uintptr_t>(in) - reinterpret_cast<uintptr_t>(out)) & 15u) == 0;

  const auto fill_nan = [&] {
    const Bits nan = Elem<T>::from_float(std::numeric_limits<float>::quiet_NaN());
    if (t < dst.head) out[t] = nan;
    float v[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) v[i] = std::numeric_limits<float>::quiet_NaN();
    const uint4 packed = pack<T>(v);
    for (int k = t; k < dst.units; k += kThreads) {
      reinterpret_cast<uint4*>(out + dst.head)[k] = packed;
    }
    if (t < dst.tail) out[dst.tail_start + t] = nan;
  };

  const int64_t z64 = __ldg(a.x_t + r);
  if (z64 < 0 || z64 >= a.V) {  // block-uniform
    fill_nan();
    return;
  }
  const int z = static_cast<int>(z64);

  float thr = kNegInf;
  if (a.finite_barrier) {
    float mt = kNegInf;
    bool bad = false;
    for_each_unit(InRow<T>(in, a.V), t, [&](int, const auto& v) {
#pragma unroll
      for (const float p : v) {
        bad |= !(p >= 0.0f);  // negative or NaN
        mt = fmaxf(mt, p);
      }
    });
    bool any_bad;
    const float pmax = block_max(mt, bad, any_bad, s_warp);
    if (any_bad) {
      fill_nan();
      return;
    }
    thr = pmax * a.reach;
  }

  const float rs = __ldg(a.rate_scale + b);
  const float scale = rs > 0.0f ? rs : 0.0f;  // clipping: negative (or NaN) scales give 0
  bool bad = false;
  const auto rate = [&](int x, float p) {
    bad |= !(p >= 0.0f);
    return (x != z && p >= thr) ? scale * p : 0.0f;
  };
  // Body units, with the input read as 16-byte vectors (same alignment as the output) or as
  // kVec scalars. The choice is hoisted out of the loop so that the kUnroll loads of an
  // iteration are issued together, ahead of the stores.
  const auto write_body = [&](auto vector_loads) {
    const auto load_unit = [&](int x0, float (&p)[kVec]) {
      if constexpr (decltype(vector_loads)::value) {
        unpack<T>(__ldg(reinterpret_cast<const uint4*>(in + x0)), p);
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) p[i] = Elem<T>::to_float(__ldg(in + x0 + i));
      }
    };
    const auto store_unit = [&](int k, float (&p)[kVec]) {
      const int x0 = dst.head + k * kVec;
#pragma unroll
      for (int i = 0; i < kVec; ++i) p[i] = rate(x0 + i, p[i]);
      reinterpret_cast<uint4*>(out + dst.head)[k] = pack<T>(p);
    };
    int k = t;
    for (; k + (kUnroll - 1) * kThreads < dst.units; k += kUnroll * kThreads) {
      float p[kUnroll][kVec];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) load_unit(dst.head + (k + u * kThreads) * kVec, p[u]);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) store_unit(k + u * kThreads, p[u]);
    }
    for (; k < dst.units; k += kThreads) {
      float p[kVec];
      load_unit(dst.head + k * kVec, p);
      store_unit(k, p);
    }
  };

  if (t < dst.head) out[t] = Elem<T>::from_float(rate(t, Elem<T>::to_float(__ldg(in + t))));
  if (vector_in) {
    write_body(std::true_type{});
  } else {
    write_body(std::false_type{});
  }
  if (t < dst.tail) {
    const int x = dst.tail_start + t;
    out[x] = Elem<T>::from_float(rate(x, Elem<T>::to_float(__ldg(in + x))));
  }
  // A NaN or negative probability found while writing: overwrite the row (the Python layer
  // validates first, so this second write is for robustness, not speed).
  if (__syncthreads_or(bad)) fill_nan();
}

at::Tensor draw_rows(const DrawArgs& args, double barrier, double temperature,
                     const std::optional<at::Generator>& generator) {
  const RowLayout& rows = args.rows;
  at::Tensor out = at::empty({rows.B, rows.L}, args.logits.options().dtype(at::kLong));
  if (rows.rows() == 0) return out;
  check_grid(rows);

  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator(args.logits.device().index()));
  at::PhiloxCudaState philox;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(kRowWords);
  }

  const auto pointer = [](const std::optional<at::Tensor>& t) -> const int64_t* {
    return t ? t->const_data_ptr<int64_t>() : nullptr;
  };
  DrawParams p;
  p.mode = args.mode;
  p.logits = args.logits.const_data_ptr();
  p.L = rows.L;
  p.stride_b = rows.stride_b;
  p.stride_l = rows.stride_l;
  p.V = static_cast<int>(rows.V);
  p.current = pointer(args.current);
  p.exclude = pointer(args.exclude);
  p.exclude_token = static_cast<int>(args.exclude_token);
  p.rate_scale = args.rate_scale ? args.rate_scale->const_data_ptr<float>() : nullptr;
  p.h = args.h ? args.h->const_data_ptr<float>() : nullptr;
  p.greedy = args.greedy;
  p.inv_temperature = args.greedy ? 0.0f : static_cast<float>(1.0 / temperature);
  p.barrier = static_cast<float>(barrier);
  p.controls = args.controls;
  p.philox = philox;
  p.out = out.mutable_data_ptr<int64_t>();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(args.logits.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    draw_kernel<T><<<static_cast<unsigned>(rows.rows()), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor jump_step_cuda(const at::Tensor& logits, const at::Tensor& x_t,
                          const at::Tensor& rate_scale, const at::Tensor& h, double barrier,
                          double temperature, int64_t top_k, double top_p,
                          std::optional<at::Generator> generator) {
  check_cuda(logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  return draw_rows(jump_args(logits, x_t, rate_scale, h, barrier, temperature, top_k, top_p),
                   barrier, temperature, generator);
}

at::Tensor sample_categorical_cuda(const at::Tensor& logits,
                                   const std::optional<at::Tensor>& exclude,
                                   int64_t exclude_token, double barrier, double temperature,
                                   int64_t top_k, double top_p,
                                   std::optional<at::Generator> generator) {
  check_cuda(logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  return draw_rows(
      sample_args(logits, exclude, exclude_token, barrier, temperature, top_k, top_p), barrier,
      temperature, generator);
}

at::Tensor probs_to_generator_cuda(const at::Tensor& probs_in, const at::Tensor& x_t_in,
                                   const at::Tensor& rate_scale_in, double barrier) {
  check_cuda(probs_in, "probs");
  const c10::cuda::CUDAGuard guard(probs_in.device());
  const GeneratorArgs a = generator_args(probs_in, x_t_in, rate_scale_in, barrier);
  const at::Tensor& probs = a.probs;
  const RowLayout& rows = a.rows;
  at::Tensor out = at::empty({rows.B, rows.L, rows.V}, probs.options());
  if (rows.rows() == 0) return out;
  check_grid(rows);

  GeneratorParams p;
  p.probs = probs.const_data_ptr();
  p.L = rows.L;
  p.stride_b = rows.stride_b;
  p.stride_l = rows.stride_l;
  p.V = static_cast<int>(rows.V);
  p.x_t = a.x_t.const_data_ptr<int64_t>();
  p.rate_scale = a.rate_scale.const_data_ptr<float>();
  // e^-barrier in float, as the CPU kernel computes it (std::exp of the float barrier).
  const float b = static_cast<float>(barrier);
  p.finite_barrier = b < INFINITY;
  p.reach = p.finite_barrier ? std::exp(-b) : 0.0f;
  p.out = out.mutable_data_ptr();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(probs.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    generator_kernel<T><<<static_cast<unsigned>(rows.rows()), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace fsdfm

TORCH_LIBRARY_IMPL(fsdfm, CUDA, m) {
  m.impl("probs_to_generator", &fsdfm::probs_to_generator_cuda);
  m.impl("jump_step", &fsdfm::jump_step_cuda);
  m.impl("sample_categorical", &fsdfm::sample_categorical_cuda);
}
