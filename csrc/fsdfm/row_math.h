// The maths of one sampling step for one position (one logits row), torch-free, host + device.
//
// SPEC 2.7: a step needs, per row, only the row maximum m, the normaliser Z = sum_x e^(s_x - m)
// (s = logits / temperature), the mass of the allowed destinations
//     A = { x : x != excluded, s_x >= m - barrier }          (SPEC 2.3, energy barrier)
// and one categorical draw over A. For the FS-DFM / Euler step (SPEC 2.1, 2.4) with current
// token z = excluded:
//     lambda  = max(rate_scale, 0) * P(A),   P(A) = sum_{x in A} e^(s_x - m) / Z
//     P(stay) = exp(-h * lambda),            P(x | jump) = p(x) / P(A) for x in A.
// The draw is an exact inverse-CDF in two levels: the row is split into groups (blocks of
// consecutive tokens on the CPU, one thread's tokens on the GPU); a first uniform picks a group
// with probability proportional to its allowed mass, a second picks a token inside it. Group
// masses are combined and scanned in float64, so the draw has float64 resolution (see uniform53).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "philox.h"

// Loops over a unit's compile-time N tokens: unrolled by nvcc (the host compiler unrolls or
// vectorises them by itself).
#if defined(__CUDACC__)
#define FSDFM_UNROLL _Pragma("unroll")
#else
#define FSDFM_UNROLL
#endif

namespace fsdfm {

// Written in place of a token for a row whose inputs are invalid (NaN or +inf logits, a row of
// -inf logits, a token id out of range, nothing left to draw from); the Python layer turns it
// into an exception that names the argument.
constexpr int64_t kInvalidToken = -1;

constexpr float kNegInf = -INFINITY;

// e^y for y <= 0 (e^-inf = 0), as the normaliser needs it.
// Host: Cody-Waite reduction y = n ln2 + r, |r| <= ln2/2, and a degree-7 Taylor polynomial
// (truncation error |r|^8/8! < 6e-9, below float32 rounding), written without branches so
// that the compiler vectorises the loops that call it. Below -87 the result would be subnormal
// (relative mass < 1e-37, far below the float64 resolution of the draw) and is flushed to 0.
// Device: the hardware exponential (__expf, about 2 ulp), since the kernel is bandwidth-bound.
FSDFM_HD float exp_nonpos(float y) {
#if defined(__CUDA_ARCH__)
  return __expf(y);
#else
  // Written so that NaN takes the clamp too: the float-to-int conversion below must see a number.
  const float yc = y >= -87.0f ? y : -87.0f;
  // Adding 1.5 * 2^23 rounds to the nearest integer in the low mantissa bits.
  const float shifter = 12582912.0f;
  const float nf = (yc * 1.44269504088896341f + shifter) - shifter;
  const float r = (yc - nf * 0.693145751953125f) - nf * 1.428606765330187e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(nf) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  // NaN and anything below -87 fail the comparison and give 0.
  return y >= -87.0f ? p * scale : 0.0f;
#endif
}

// max(a, b), NaN when either is NaN (fmaxf and `a > b ? a : b` both drop a NaN operand).
FSDFM_HD float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float d;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
#else
  return (a > b || a != a) ? a : b;
#endif
}

// Whether token x with scaled logit s is an allowed destination (the set A above): not the
// excluded token, and reachable under the threshold thr = reach_threshold(m, barrier). The
// masses and the draw must use this one predicate, or a group can carry mass and no token.
FSDFM_HD bool is_allowed(int64_t x, float s, int64_t excluded, float thr) {
  return x != excluded && s >= thr;
}

// Running softmax statistics over a stream of scaled logits, with a running maximum m (the
// one-pass form: earlier sums are rescaled when the maximum grows). `total` sums e^(s - m) over
// every token, `allowed` over the allowed destinations (is_allowed). `bad` records NaN. Without
// kThreshold, thr must be -inf (no barrier): the threshold test is then skipped.
//
// Logits arrive in units of N consecutive tokens (one 16-byte load on the GPU). A unit's own
// maximum comes first, so the sums are rescaled at most once per unit and each token costs one
// exponential and one add: a per-token update, which rescales on every new maximum and branches
// per token, ran at about 36 instructions per bfloat16 logit and kept jump_step at 43% of the
// H200's copy bandwidth.
struct OnlineSoftmax {
  float m = kNegInf;
  float total = 0.0f;
  float allowed = 0.0f;
  bool bad = false;

  // s[i] is the scaled logit of token first + i.
  template <bool kThreshold, int N>
  FSDFM_HD void add(const float (&s)[N], int64_t first, int64_t excluded, float thr) {
    float um = s[0];
    FSDFM_UNROLL
    for (int i = 1; i < N; ++i) um = max_nan(um, s[i]);
    if (!(um == um)) {
      bad = true;
      return;
    }
    if (um > m) {
      const float c = exp_nonpos(m - um);  // m = -inf gives 0: the sums were empty
      total *= c;
      allowed *= c;
      m = um;
    }
    if (!(m > kNegInf)) return;  // every token so far is -inf: nothing to add
    float sum = 0.0f;
    float sum_allowed = 0.0f;
    FSDFM_UNROLL
    for (int i = 0; i < N; ++i) {
      const float e = exp_nonpos(s[i] - m);
      sum += e;
      if constexpr (kThreshold) sum_allowed += s[i] >= thr ? e : 0.0f;
    }
    if constexpr (!kThreshold) sum_allowed = sum;
    if (excluded >= first && excluded - first < N) {
      // The unit without the excluded token, recomputed rather than subtracted: when that
      // token dominates, the subtraction would cancel catastrophically.
      sum_allowed = 0.0f;
      FSDFM_UNROLL
      for (int i = 0; i < N; ++i) {
        if (is_allowed(first + i, s[i], excluded, thr)) sum_allowed += exp_nonpos(s[i] - m);
      }
    }
    total += sum;
    allowed += sum_allowed;
  }
};

// Float64 totals of a whole row, relative to the row maximum m.
struct RowMass {
  double total = 0.0;
  double allowed = 0.0;
};

// The factor that brings partial sums taken relative to `part_max` to the row maximum `m`.
FSDFM_HD double rescale(float part_max, float m) {
  return part_max > kNegInf ? static_cast<double>(exp_nonpos(part_max - m)) : 0.0;
}

// Whether a row's statistics describe a proper distribution: no NaN, a finite maximum.
FSDFM_HD bool row_is_valid(float m, bool bad) {
  return !bad && m > kNegInf && m < INFINITY;
}

// Lowest scaled logit of a reachable token: p(x) >= max_y p(y) e^-barrier  <=>  s_x >= m - barrier.
// barrier = +inf gives -inf, so that every token (even one with a -inf logit) counts as
// reachable, as in the reference; such a token has zero mass and is never drawn.
FSDFM_HD float reach_threshold(float m, float barrier) {
  return barrier < INFINITY ? m - barrier : kNegInf;
}

// P(jump) = 1 - exp(-h lambda), lambda = max(rate_scale, 0) * allowed / total. The max() is
// the clipping of negative rates (SPEC 2.3); a non-positive or NaN h*lambda never jumps.
FSDFM_HD double jump_probability(const RowMass& mass, float rate_scale, float h) {
  if (!(mass.allowed > 0.0) || !(rate_scale > 0.0f) || !(h > 0.0f)) return 0.0;
  const double hl = static_cast<double>(h) * static_cast<double>(rate_scale) *
                    (mass.allowed / mass.total);
  return -expm1(-hl);
}

// Exact inverse-CDF selection over a stream of non-negative weights offered in a fixed order:
// picks the first index whose running (float64) sum exceeds u * sum(weights). `sum` must be the
// sum of the weights that will be offered; should rounding leave the running sum short of the
// target, the last index with positive weight is taken.
struct InverseCdf {
  double target;
  double acc = 0.0;
  int64_t pick = -1;
  int64_t last = -1;

  FSDFM_HD InverseCdf(double u, double sum) : target(u * sum) {}

  // Returns true once the pick is made (the caller may stop offering).
  FSDFM_HD bool offer(int64_t index, double weight) {
    if (pick >= 0 || !(weight > 0.0)) return pick >= 0;
    last = index;
    acc += weight;
    if (acc > target) pick = index;
    return pick >= 0;
  }

  FSDFM_HD int64_t result() const { return pick >= 0 ? pick : last; }
};

// ---- Sampling controls: top-k and top-p as a floor on the scaled logits; min-p is the barrier
// (p >= min_p * max p  <=>  s >= m + ln min_p, barrier = -ln min_p); temperature 0 the argmax.
//
// top-k and top-p keep the tokens whose scaled logit s is at least a per-row floor f:
//   top-k: f = the k-th largest s (every token tied with it is kept, as transformers'
//          TopKLogitsWarper keeps them);
//   top-p: f = the largest value such that the tokens with s >= f carry at least top_p of the
//          mass of the tokens top-k kept: the smallest set of most probable tokens that reaches
//          top_p (transformers' TopPLogitsWarper), ties at its edge included.
// Both are found without sorting the row (selection on the CPU, bisection over order_key on the
// GPU). The floor joins the barrier's threshold, thr = max(m - barrier, f), so the allowed set,
// the rates and the draw all follow from the one predicate is_allowed: like the barrier
// (SPEC 2.3), a control removes destinations and lambda shrinks with them. The collapse draws
// from p restricted to the kept tokens, which is transformers' filtered law. In a jump the
// floor is taken over the whole destination law p (the current token included, then excluded
// from A); in a draw that excludes a token (the mask), over p without it.
struct Controls {
  int64_t top_k = 0;   // 0: off
  double top_p = 1.0;  // 1: off

  // Whether the controls can remove anything from a row of n candidate tokens.
  FSDFM_HD bool active(int64_t n) const { return (top_k > 0 && top_k < n) || top_p < 1.0; }
};

// Order-preserving map of floats to unsigned keys: a < b <=> order_key(a) < order_key(b) for
// non-NaN floats, -0 and +0 sharing one key (a threshold must compare as the float comparison
// s >= thr that it stands for). key_value inverts it (-0 comes back as +0).
FSDFM_HD uint32_t order_key(float s) {
  uint32_t bits;
  std::memcpy(&bits, &s, sizeof(bits));
  if (bits == 0x80000000u) bits = 0u;
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

FSDFM_HD float key_value(uint32_t key) {
  const uint32_t bits = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  float s;
  std::memcpy(&s, &bits, sizeof(s));
  return s;
}

// Whether (v, x) beats the running argmax (best, arg): larger, or equal with a lower id. arg =
// kInvalidToken stands for "none yet"; a -inf logit never wins, so a row with nothing finite
// left keeps kInvalidToken.
FSDFM_HD bool beats(float v, int64_t x, float best, int64_t arg) {
  return x >= 0 && (v > best || (v == best && arg >= 0 && x < arg && v > kNegInf));
}

// temperature = 0 is the T -> 0 limit of p: all mass on the row's argmax a (the lowest id among
// ties). A jump moves to a with lambda = max(rate_scale, 0) unless a is the current token (then
// nothing is allowed and the token stays); the collapse takes a (kInvalidToken when nothing is
// left).
FSDFM_HD int64_t greedy_result(bool jump, int64_t argmax, int64_t current, float rate_scale,
                               float h, double u_jump) {
  if (!jump) return argmax;
  if (argmax == current || argmax < 0) return current;
  return u_jump < jump_probability(RowMass{1.0, 1.0}, rate_scale, h) ? argmax : current;
}

// ---- The fused head: one row's draw over vocabulary tiles that are computed one at a time.
//
// A tile's logits are made (a slice of the output product), reduced to the tile's statistics
// and one draw from its allowed tokens, and folded into the row's running state; the tile is then
// dropped, so no [N, V] logits exist. For tiles k = 1, 2, ... with allowed masses a_k (relative
// to a common maximum) and S_k = a_1 + ... + a_k, the running winner becomes tile k's draw with
// probability a_k / S_k. Tile k's token x (probability w_x / a_k within the tile) is then the
// final winner with probability (w_x / a_k) (a_k / S_k) prod_{j > k} (S_{j-1} / S_j) =
// w_x / S_K: the exact categorical law over the allowed tokens, whatever the tiling.
struct HeadRow {
  float m = kNegInf;     // running maximum of the scaled logits
  double total = 0.0;    // sum of e^(s - m) over every token so far
  double allowed = 0.0;  // the same over the allowed destinations
  int64_t token = kInvalidToken;  // the running winner among the allowed tokens so far
  bool bad = false;      // a NaN was seen

  // Fold a tile: its maximum tm, its masses relative to tm, its draw (ignored when its allowed
  // mass is 0) and the uniform u of the merge.
  FSDFM_HD void fold(float tm, RowMass tile, int64_t tile_token, bool tile_bad, double u) {
    bad = bad || tile_bad;
    if (!(tm > kNegInf)) return;  // a tile of -inf logits adds nothing
    if (tm > m) {
      const double c = rescale(m, tm);
      total *= c;
      allowed *= c;
      m = tm;
    } else {
      const double c = rescale(tm, m);
      tile.total *= c;
      tile.allowed *= c;
    }
    total += tile.total;
    if (tile.allowed > 0.0) {
      allowed += tile.allowed;
      if (u * allowed < tile.allowed) token = tile_token;
    }
  }

  // The row's result: for jump_step (jump = true) x_t or the winner, with P(jump) =
  // 1 - exp(-h lambda) as for the unfused op; for sample_categorical the winner. kInvalidToken
  // for a row that gives no distribution (NaN, +inf, all -inf, nothing allowed to draw).
  FSDFM_HD int64_t result(bool jump, int64_t current, float rate_scale, float h,
                          double u_jump) const {
    if (!row_is_valid(m, bad)) return kInvalidToken;
    const RowMass mass{total, allowed};
    if (jump) return u_jump < jump_probability(mass, rate_scale, h) ? token : current;
    return allowed > 0.0 ? token : kInvalidToken;
  }
};

}  // namespace fsdfm
