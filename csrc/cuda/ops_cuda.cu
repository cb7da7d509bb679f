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

#include "fsdfm/philox.h"
#include "fsdfm/row_math.h"
#include "ops_common.h"

namespace fsdfm {
namespace {

constexpr int kThreads = 256;               // threads per block = groups per row
constexpr int kWarps = kThreads / 32;
constexpr int kRun = kThreads / 32;         // group weights summed by one lane of warp 0
constexpr int kUnroll = 4;                  // 16-byte loads in flight per thread
constexpr unsigned kFullMask = 0xffffffffu;

static_assert(kThreads % 32 == 0 && kThreads >= 8, "head and tail need one thread per element");

// Element storage: raw bits, converted to float in registers. The 16-bit types are only tags.
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using Bits = uint32_t;
  static constexpr int kVec = 4;
  __device__ static float to_float(Bits b) { return __uint_as_float(b); }
  __device__ static Bits from_float(float f) { return __float_as_uint(f); }
};

template <>
struct Elem<c10::Half> {
  using Bits = uint16_t;
  static constexpr int kVec = 8;
  __device__ static float to_float(Bits b) { return __half2float(__ushort_as_half(b)); }
  __device__ static Bits from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

template <>
struct Elem<c10::BFloat16> {
  using Bits = uint16_t;
  static constexpr int kVec = 8;
  // bfloat16 is the upper half of a float32: widening is exact and needs no conversion unit.
  __device__ static float to_float(Bits b) { return __uint_as_float(static_cast<uint32_t>(b) << 16); }
  __device__ static Bits from_float(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};

// The kVec elements of a 16-byte unit, lowest address first (little-endian words).
template <typename T>
__device__ __forceinline__ void unpack(const uint4& v, float (&out)[Elem<T>::kVec]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  if constexpr (Elem<T>::kVec == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = Elem<T>::to_float(w[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = Elem<T>::to_float(static_cast<uint16_t>(w[i] & 0xffffu));
      out[2 * i + 1] = Elem<T>::to_float(static_cast<uint16_t>(w[i] >> 16));
    }
  }
}

template <typename T>
__device__ __forceinline__ uint4 pack(const float (&in)[Elem<T>::kVec]) {
  uint32_t w[4];
  if constexpr (Elem<T>::kVec == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = Elem<T>::from_float(in[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[i] = static_cast<uint32_t>(Elem<T>::from_float(in[2 * i])) |
             (static_cast<uint32_t>(Elem<T>::from_float(in[2 * i + 1])) << 16);
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Head / body / tail split of one row of V elements at `base`. Tensors are element-aligned,
// so the distance to the next 16-byte boundary is a whole number of elements.
template <typename T>
struct RowSplit {
  using Bits = typename Elem<T>::Bits;
  static constexpr int kVec = Elem<T>::kVec;
  int head;        // scalar elements before the first aligned address (< kVec)
  int units;       // aligned 16-byte units
  int tail_start;  // first element of the scalar tail
  int tail;        // scalar elements after the body (< kVec)

  __device__ RowSplit(const void* base, int V) {
    const unsigned mis = static_cast<unsigned>(reinterpret_cast<uintptr_t>(base) & 15u);
    const int to_boundary = mis == 0 ? 0 : static_cast<int>((16u - mis) / sizeof(Bits));
    head = to_boundary < V ? to_boundary : V;
    units = (V - head) / kVec;
    tail_start = head + units * kVec;
    tail = V - tail_start;
  }
};

// A read-only logits / probs row with the split of its own address.
template <typename T>
struct InRow : RowSplit<T> {
  using typename RowSplit<T>::Bits;
  const Bits* p;

  __device__ InRow(const Bits* row, int V) : RowSplit<T>(row, V), p(row) {}
  __device__ float scalar(int x) const { return Elem<T>::to_float(__ldg(p + x)); }
  __device__ uint4 unit(int k) const {
    return __ldg(reinterpret_cast<const uint4*>(p + this->head) + k);
  }
};

// Calls f(first, values) for every unit of elements owned by thread t, in the group order of
// the draw: the head element (values: float[1]), body units in increasing k (float[kVec], the
// elements first, ..., first + kVec - 1), the tail element (float[1]).
template <typename T, typename F>
__device__ __forceinline__ void for_each_unit(const InRow<T>& row, int t, F&& f) {
  constexpr int kVec = Elem<T>::kVec;
  if (t < row.head) {
    const float one[1] = {row.scalar(t)};
    f(t, one);
  }
  int k = t;
  // Issue kUnroll independent loads before using any: memory-level parallelism per thread.
  for (; k + (kUnroll - 1) * kThreads < row.units; k += kUnroll * kThreads) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = row.unit(k + u * kThreads);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float s[kVec];
      unpack<T>(v[u], s);
      f(row.head + (k + u * kThreads) * kVec, s);
    }
  }
  for (; k < row.units; k += kThreads) {
    float s[kVec];
    unpack<T>(row.unit(k), s);
    f(row.head + k * kVec, s);
  }
  if (t < row.tail) {
    const float one[1] = {row.scalar(row.tail_start + t)};
    f(row.tail_start + t, one);
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, d));
  return v;
}

// Butterfly sum: each step adds the same two operands in every lane pair (addition commutes),
// so all lanes end with the bit-identical total.
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(kFullMask, v, d);
  return v;
}

__device__ __forceinline__ double warp_inclusive_scan(double v, int lane) {
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const double n = __shfl_up_sync(kFullMask, v, d);
    if (lane >= d) v += n;
  }
  return v;
}

// Maximum over the block of one value per thread; every thread gets it. Also ORs `flag`.
__device__ __forceinline__ float block_max(float v, bool flag, bool& any_flag, float* s_warp) {
  v = warp_max(v);
  if ((threadIdx.x & 31) == 0) s_warp[threadIdx.x >> 5] = v;
  any_flag = __syncthreads_or(flag) != 0;  // also the barrier that publishes s_warp
  float m = s_warp[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) m = fmaxf(m, s_warp[w]);
  return m;
}

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
  float inv_temperature;
  float barrier;
  at::PhiloxCudaState philox;
  int64_t* out;
};

// ---- Stages of draw_kernel. Every stage that can end a row early decides on block-uniform
// values only, so that whole blocks (or, after the statistics, whole warp 0) leave together.

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

// A finite barrier needs the row maximum before the allowed set is known: a first read of the
// row for the maximum, then thr = m - barrier. False for a row that gives no distribution.
template <typename T>
__device__ __forceinline__ bool barrier_threshold(const InRow<T>& row, float inv_temp,
                                                  float barrier, float* s_warp, float& thr) {
  float mt = kNegInf;
  for_each_unit(row, threadIdx.x, [&](int, const auto& v) {
#pragma unroll
    for (const float x : v) mt = max_nan(mt, x * inv_temp);
  });
  bool any_bad;
  const float m = block_max(mt, !(mt == mt), any_bad, s_warp);
  thr = reach_threshold(m, barrier);
  return row_is_valid(m, any_bad);
}

// Row statistics, per thread: its tokens folded into an OnlineSoftmax, a unit at a time (the
// one full read of the row when barrier = +inf).
template <bool kThreshold, typename T>
__device__ __forceinline__ OnlineSoftmax thread_statistics(const InRow<T>& row, float inv_temp,
                                                           int excluded, float thr) {
  OnlineSoftmax st;
  for_each_unit(row, threadIdx.x, [&](int first, const auto& v) {
    constexpr int n = sizeof(v) / sizeof(v[0]);
    float s[n];
#pragma unroll
    for (int i = 0; i < n; ++i) s[i] = v[i] * inv_temp;
    st.add<kThreshold>(s, first, excluded, thr);
  });
  return st;
}

// The thread partials of one row (shared memory, one entry per group = thread) combined by
// warp 0. Lane l holds the groups l*kRun .. l*kRun + kRun - 1.
struct Groups {
  const float* max;      // [kThreads] each group's maximum m_g
  const float* total;    // [kThreads] sum of e^(s - m_g) over the group
  const float* allowed;  // [kThreads] the same over its allowed tokens
  float m;               // the row maximum
  double lane_w;         // this lane's allowed weight (float64, relative to m)
  double incl_w;         // inclusive scan of lane_w over the lanes
  RowMass mass;          // the row's totals relative to m

  // Group weight w_g = allowed_g * e^(m_g - m) in float64 (deterministic: the draw recomputes
  // the same values).
  __device__ double weight(int g) const {
    return static_cast<double>(allowed[g]) * rescale(max[g], m);
  }
};

__device__ __forceinline__ Groups combine_groups(const float* s_max, const float* s_total,
                                                 const float* s_allowed, int lane) {
  Groups g{s_max, s_total, s_allowed, kNegInf, 0.0, 0.0, RowMass{}};
#pragma unroll
  for (int i = 0; i < kRun; ++i) g.m = fmaxf(g.m, s_max[lane * kRun + i]);
  g.m = warp_max(g.m);
  double lane_z = 0.0;
#pragma unroll
  for (int i = 0; i < kRun; ++i) {
    const int k = lane * kRun + i;
    g.lane_w += g.weight(k);
    lane_z += static_cast<double>(s_total[k]) * rescale(s_max[k], g.m);
  }
  g.mass.total = warp_sum(lane_z);
  g.incl_w = warp_inclusive_scan(g.lane_w, lane);
  g.mass.allowed = __shfl_sync(kFullMask, g.incl_w, 31);
  return g;
}

// Level 1 of the draw: the group. InverseCdf semantics (first group whose running sum exceeds
// u * S_A, else the last positive one) with the running sums from a warp scan: the crossing lane
// is the first whose inclusive sum exceeds the target; it then walks its own kRun weights from
// its exclusive prefix. Requiring a positive lane sum keeps a lane whose scan value crossed only
// by rounding (with zero weight) from being chosen. Needs mass.allowed > 0 (lanes with positive
// sums exist).
__device__ __forceinline__ int choose_group(const Groups& g, double u, int lane) {
  double excl = __shfl_up_sync(kFullMask, g.incl_w, 1);
  if (lane == 0) excl = 0.0;
  InverseCdf pick(u, g.mass.allowed);
  const unsigned hit = __ballot_sync(kFullMask, g.incl_w > pick.target && g.lane_w > 0.0);
  const unsigned positive = __ballot_sync(kFullMask, g.lane_w > 0.0);
  const int src = hit != 0 ? __ffs(hit) - 1 : 31 - __clz(positive);
  int chosen = -1;
  if (lane == src) {
    pick.acc = excl;
#pragma unroll
    for (int i = 0; i < kRun; ++i) pick.offer(lane * kRun + i, g.weight(lane * kRun + i));
    chosen = static_cast<int>(pick.result());  // >= 0: this lane has a positive weight
  }
  return __shfl_sync(kFullMask, chosen, src);
}

// Level 2 of the draw: the token inside group j = thread j's element set, in its fixed order:
// head element (item 0 if j < head), body units j + T*i, tail element. Warp 0 does it
// cooperatively (lane l takes items l, l + 32, ...), since a serial walk by one thread would
// cost one dependent L2 round trip per unit (tens of microseconds for a GPT-2 row). Weights are
// taken relative to the group's own maximum mj rather than m: the same proportions, but no
// group with positive mass can see all its weights flush to zero.
template <typename T>
__device__ __forceinline__ int choose_token(const InRow<T>& row, int j, float mj, float inv_temp,
                                            int excluded, float thr, double u, int lane) {
  constexpr int kVec = Elem<T>::kVec;
  const int has_head = j < row.head ? 1 : 0;
  const int body = j < row.units ? (row.units - 1 - j) / kThreads + 1 : 0;
  const int items = has_head + body + (j < row.tail ? 1 : 0);
  // Weights of item q (one scalar or one unit); `first` is its first token id, unused slots 0.
  const auto item_weights = [&](int q, float (&w)[kVec], int& first) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) w[i] = 0.0f;
    float s[kVec];
    int count = 1;
    if (q < has_head) {
      first = j;
      s[0] = row.scalar(first);
    } else if (q - has_head < body) {
      const int k = j + (q - has_head) * kThreads;
      first = row.head + k * kVec;
      unpack<T>(row.unit(k), s);
      count = kVec;
    } else {
      first = row.tail_start + j;
      s[0] = row.scalar(first);
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      if (i < count) {
        const float si = s[i] * inv_temp;
        w[i] = is_allowed(first + i, si, excluded, thr) ? exp_nonpos(si - mj) : 0.0f;
      }
    }
  };

  // Pass A: the group's total W_j (float64), needed up front for the target u * W_j.
  double lane_total = 0.0;
  for (int q = lane; q < items; q += 32) {
    float w[kVec];
    int first;
    item_weights(q, w, first);
#pragma unroll
    for (int i = 0; i < kVec; ++i) lane_total += w[i];
  }
  const double group_total = warp_sum(lane_total);

  // Pass B: 32 items per step, scanned, with the running sum carried between steps. The
  // crossing lane recomputes its item's weights (bit-identical, from L1) for the walk rather
  // than keeping them live across the scan: that keeps the kernel within 64 registers.
  int fallback = static_cast<int>(kInvalidToken);  // last positive weight seen so far
  double carry = 0.0;
  for (int base = 0; base < items; base += 32) {
    const int q = base + lane;
    double lane_sum = 0.0;
    int last_positive = -1;
    if (q < items) {
      float w[kVec];
      int first;
      item_weights(q, w, first);
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        lane_sum += w[i];
        if (w[i] > 0.0f) last_positive = first + i;
      }
    }
    const double incl = warp_inclusive_scan(lane_sum, lane) + carry;
    double excl = __shfl_up_sync(kFullMask, incl, 1);
    if (lane == 0) excl = carry;
    const unsigned hit = __ballot_sync(kFullMask, incl > u * group_total && lane_sum > 0.0);
    if (hit != 0) {
      const int src = __ffs(hit) - 1;
      int chosen = -1;
      if (lane == src) {
        float w[kVec];
        int first;
        item_weights(q, w, first);
        InverseCdf pick(u, group_total);
        pick.acc = excl;
#pragma unroll
        for (int i = 0; i < kVec; ++i) pick.offer(first + i, w[i]);
        chosen = static_cast<int>(pick.result());  // >= 0: lane_sum > 0
      }
      return __shfl_sync(kFullMask, chosen, src);
    }
    const unsigned positive = __ballot_sync(kFullMask, lane_sum > 0.0);
    if (positive != 0) fallback = __shfl_sync(kFullMask, last_positive, 31 - __clz(positive));
    carry = __shfl_sync(kFullMask, incl, 31);
  }
  // No crossing: rounding left the running sum short of the target, so InverseCdf takes the
  // last positive weight. (Should the group hold no positive weight at all, which its positive
  // mass rules out, the row reports kInvalidToken rather than an arbitrary token.)
  return fallback;
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

  const int t = threadIdx.x;
  const int64_t r = blockIdx.x;
  const int64_t b = r / a.L;
  const InRow<T> row(static_cast<const Bits*>(a.logits) + b * a.stride_b + (r - b * a.L) * a.stride_l,
                     a.V);
  const auto finish = [&](int64_t token) {
    if (t == 0) a.out[r] = token;
  };

  int excluded;
  if (!excluded_token(a, r, excluded)) return finish(kInvalidToken);
  const float inv_temp = a.inv_temperature;
  float thr = kNegInf;  // barrier = +inf: every token is reachable, one read of the row
  const bool finite_barrier = a.barrier < INFINITY;
  if (finite_barrier && !barrier_threshold(row, inv_temp, a.barrier, s_warp, thr)) {
    return finish(kInvalidToken);
  }
  const OnlineSoftmax st = finite_barrier ? thread_statistics<true>(row, inv_temp, excluded, thr)
                                          : thread_statistics<false>(row, inv_temp, excluded, thr);
  s_max[t] = st.m;
  s_total[t] = st.total;
  s_allowed[t] = st.allowed;
  const bool bad = __syncthreads_or(st.bad) != 0;
  if (t >= 32) return;

  // ---- Warp 0 from here on.
  const int lane = t;
  const Groups groups = combine_groups(s_max, s_total, s_allowed, lane);
  if (!row_is_valid(groups.m, bad)) return finish(kInvalidToken);
  const auto seeds = at::cuda::philox::unpack(a.philox);
  const RowUniforms u = row_uniforms(std::get<0>(seeds), std::get<1>(seeds), static_cast<uint64_t>(r));
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

// Calls f(Tag<T>{}) with the element type of a float32 / float16 / bfloat16 tensor.
template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
void dispatch_float(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(Tag<float>{});
      break;
    case at::kHalf:
      f(Tag<c10::Half>{});
      break;
    case at::kBFloat16:
      f(Tag<c10::BFloat16>{});
      break;
    default:
      TORCH_CHECK(false, "fsdfm: unsupported dtype ", dtype);  // rows_of admits only these
  }
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
}

// One block per row: the grid's x dimension bounds the number of rows.
void check_grid(const RowLayout& rows) {
  TORCH_CHECK_VALUE(rows.rows() <= std::numeric_limits<int32_t>::max(), "B * L = ", rows.rows(),
                    " rows exceed the CUDA grid limit of 2^31 - 1");
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
  p.inv_temperature = static_cast<float>(1.0 / temperature);
  p.barrier = static_cast<float>(barrier);
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
                          double temperature, std::optional<at::Generator> generator) {
  check_cuda(logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  return draw_rows(jump_args(logits, x_t, rate_scale, h, barrier, temperature), barrier,
                   temperature, generator);
}

at::Tensor sample_categorical_cuda(const at::Tensor& logits,
                                   const std::optional<at::Tensor>& exclude,
                                   int64_t exclude_token, double barrier, double temperature,
                                   std::optional<at::Generator> generator) {
  check_cuda(logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  return draw_rows(sample_args(logits, exclude, exclude_token, barrier, temperature), barrier,
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
