// The stages of the CUDA row kernels, shared by the ops (ops_cuda.cu) and the fused head
// (head_cuda.cu): 16-byte row access, warp and block reductions, the row statistics and the
// two-level draw. One thread block of kThreads threads serves one row; see ops_cuda.cu for the
// mapping and its measurements.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <limits>

#include "fsdfm/philox.h"
#include "fsdfm/row_math.h"
#include "ops_common.h"

namespace fsdfm {
namespace cuda {

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

// ---- Stages of a row's draw. Every stage that can end a row early decides on block-uniform
// values only, so that whole blocks (or, after the statistics, whole warp 0) leave together.

// A finite barrier (or a control) needs the row maximum before the allowed set is known: a first
// read of the row for the scaled maximum m. False for a row that gives no distribution.
template <typename T>
__device__ __forceinline__ bool row_maximum(const InRow<T>& row, float inv_temp, float* s_warp,
                                            float& m) {
  float mt = kNegInf;
  for_each_unit(row, threadIdx.x, [&](int, const auto& v) {
#pragma unroll
    for (const float x : v) mt = max_nan(mt, x * inv_temp);
  });
  bool any_bad;
  m = block_max(mt, !(mt == mt), any_bad, s_warp);
  return row_is_valid(m, any_bad);
}

// Weight of the tokens other than `skip` whose scaled logit has order_key >= key: their count,
// or (by_mass) their mass sum e^(s - m), in float64 and the same in every thread: each thread
// sums its own tokens in a fixed order, then warps and the block combine in a fixed order, so
// the result does not depend on scheduling. A block barrier; s_red holds kWarps doubles.
template <typename T>
__device__ __forceinline__ double block_weight_from(const InRow<T>& row, float inv_temp, float m,
                                                    int skip, uint32_t key, bool by_mass,
                                                    double* s_red) {
  double w = 0.0;
  for_each_unit(row, threadIdx.x, [&](int first, const auto& v) {
    constexpr int n = sizeof(v) / sizeof(v[0]);
#pragma unroll
    for (int i = 0; i < n; ++i) {
      const float s = v[i] * inv_temp;
      if (first + i != skip && order_key(s) >= key) {
        w += by_mass ? static_cast<double>(exp_nonpos(s - m)) : 1.0;
      }
    }
  });
  w = warp_sum(w);
  if ((threadIdx.x & 31) == 0) s_red[threadIdx.x >> 5] = w;
  __syncthreads();
  double total = 0.0;
#pragma unroll
  for (int i = 0; i < kWarps; ++i) total += s_red[i];
  __syncthreads();  // the next call rewrites s_red
  return total;
}

// The floor of the sampling controls (Controls, fsdfm/row_math.h) by bisection over order keys
// rather than a sort: the largest key whose tokens at or above it weigh at least the target
// (k tokens; top_p of the mass top-k kept). Each step is one pass over the row, served by L2
// after the first read, and at most 32 steps per control (a key has 32 bits); top-k stops as
// soon as a key keeps exactly k tokens. `n` is the number of candidate tokens (V without skip).
// Block-uniform: every decision is taken on block-wide sums.
template <typename T>
__device__ __forceinline__ float control_floor(const InRow<T>& row, float inv_temp, float m,
                                               int skip, int n, const Controls& c,
                                               double* s_red) {
  uint32_t lo = order_key(kNegInf);         // keeps every token
  const uint32_t none = order_key(m) + 1u;  // keeps none (m is finite here)
  if (c.top_k > 0 && c.top_k < n) {
    const double k = static_cast<double>(c.top_k);
    uint32_t hi = none;
    while (hi - lo > 1u) {
      const uint32_t mid = lo + (hi - lo) / 2u;
      const double w = block_weight_from(row, inv_temp, m, skip, mid, false, s_red);
      if (w >= k) {
        lo = mid;
        if (w == k) break;  // exactly the k largest: any key in between keeps the same set
      } else {
        hi = mid;
      }
    }
  }
  if (c.top_p < 1.0) {
    const double target = c.top_p * block_weight_from(row, inv_temp, m, skip, lo, true, s_red);
    uint32_t hi = none;
    while (target > 0.0 && hi - lo > 1u) {
      const uint32_t mid = lo + (hi - lo) / 2u;
      if (block_weight_from(row, inv_temp, m, skip, mid, true, s_red) >= target) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
  }
  return key_value(lo);
}

// Temperature 0: the row's argmax over the tokens other than `skip` (lowest id among ties, see
// beats), and whether the row is valid (maximum over every token finite, no NaN); every thread
// gets both. Warp shuffles pick each warp's winner under the total order of beats, so every
// lane agrees; the warp winners are then combined in a fixed order.
template <typename T>
__device__ __forceinline__ bool block_argmax(const InRow<T>& row, int skip, float* s_warp,
                                             float* s_best, int* s_arg, int64_t& argmax) {
  float m = kNegInf, best = kNegInf;
  int64_t arg = kInvalidToken;
  bool bad = false;
  for_each_unit(row, threadIdx.x, [&](int first, const auto& v) {
    constexpr int n = sizeof(v) / sizeof(v[0]);
#pragma unroll
    for (int i = 0; i < n; ++i) {
      bad |= !(v[i] == v[i]);
      m = fmaxf(m, v[i]);
      if (first + i != skip && beats(v[i], first + i, best, arg)) {
        best = v[i];
        arg = first + i;
      }
    }
  });
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) {
    const float other_best = __shfl_xor_sync(kFullMask, best, d);
    const int64_t other_arg = __shfl_xor_sync(kFullMask, static_cast<long long>(arg), d);
    if (beats(other_best, other_arg, best, arg)) {
      best = other_best;
      arg = other_arg;
    }
  }
  if ((threadIdx.x & 31) == 0) {
    s_best[threadIdx.x >> 5] = best;
    s_arg[threadIdx.x >> 5] = static_cast<int>(arg);
  }
  bool any_bad;
  const float row_max = block_max(m, bad, any_bad, s_warp);  // also publishes s_best / s_arg
  best = kNegInf;
  arg = kInvalidToken;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    if (beats(s_best[w], s_arg[w], best, arg)) {
      best = s_best[w];
      arg = s_arg[w];
    }
  }
  argmax = arg;
  return row_is_valid(row_max, any_bad);
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

// Row statistics of the whole block: each thread's partials published in shared memory, one
// entry per group (= thread). Returns whether any thread saw a NaN; the call is a block barrier.
template <typename T>
__device__ __forceinline__ bool block_statistics(const InRow<T>& row, float inv_temp,
                                                 int excluded, float thr, bool threshold,
                                                 float* s_max, float* s_total, float* s_allowed) {
  const OnlineSoftmax st = threshold ? thread_statistics<true>(row, inv_temp, excluded, thr)
                                     : thread_statistics<false>(row, inv_temp, excluded, thr);
  s_max[threadIdx.x] = st.m;
  s_total[threadIdx.x] = st.total;
  s_allowed[threadIdx.x] = st.allowed;
  return __syncthreads_or(st.bad) != 0;
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

// Calls f(Tag<T>{}) with the element type of a float32 / float16 / bfloat16 tensor.
template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
inline void dispatch_float(at::ScalarType dtype, F&& f) {
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

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
}

// One block per row: the grid's x dimension bounds the number of rows.
inline void check_grid(const RowLayout& rows) {
  TORCH_CHECK_VALUE(rows.rows() <= std::numeric_limits<int32_t>::max(), "B * L = ", rows.rows(),
                    " rows exceed the CUDA grid limit of 2^31 - 1");
}

}  // namespace cuda
}  // namespace fsdfm
