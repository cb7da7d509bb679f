// Unit test of the torch-free sampling core (fsdfm/philox.h, fsdfm/row_math.h) on the host.
// Plain C++, no framework, so that it builds anywhere the headers do; see CMakeLists.txt.
// Every CHECK that fails prints file:line, the expression and the values involved; the program
// ends with "N passed, M failed" and exits non-zero if anything failed.
#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "fsdfm/philox.h"
#include "fsdfm/row_math.h"

namespace {

int g_passed = 0;
int g_failed = 0;

std::string show(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08" PRIx32, v);
  return buf;
}
std::string show(uint64_t v) { return std::to_string(v); }
std::string show(int64_t v) { return std::to_string(v); }
std::string show(int v) { return std::to_string(v); }
// %.17g round-trips a double; %a shows the exact bits, which is what the ulp-level checks need.
std::string show(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.17g (%a)", v, v);
  return buf;
}
std::string show(float v) { return show(static_cast<double>(v)); }

void report(bool ok, const char* file, int line, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAIL %s:%d: %s\n", file, line, what.c_str());
  }
}

template <typename A, typename B>
void check_eq(const A& a, const B& b, const char* ea, const char* eb, const char* file,
              int line) {
  report(a == b, file, line,
         std::string(ea) + " == " + eb + "  [" + show(a) + " vs " + show(b) + "]");
}

// |a - b| <= rel * |b|; a NaN on either side fails.
void check_rel(double a, double b, double rel, const char* ea, const char* eb, const char* file,
               int line) {
  const double err = std::fabs(a - b);
  const bool ok = err <= rel * std::fabs(b);
  report(ok, file, line,
         std::string(ea) + " ~= " + eb + "  [" + show(a) + " vs " + show(b) +
             ", relative error " + show(b != 0.0 ? err / std::fabs(b) : err) + " > " +
             show(rel) + "]");
}

}  // namespace

#define CHECK(cond) report(static_cast<bool>(cond), __FILE__, __LINE__, #cond)
// CHECK with values worth seeing on failure, formatted by the caller.
#define CHECK_MSG(cond, msg) \
  report(static_cast<bool>(cond), __FILE__, __LINE__, std::string(#cond) + "  [" + (msg) + "]")
#define CHECK_EQ(a, b) check_eq((a), (b), #a, #b, __FILE__, __LINE__)
#define CHECK_REL(a, b, rel) check_rel((a), (b), (rel), #a, #b, __FILE__, __LINE__)

namespace {

using fsdfm::InverseCdf;
using fsdfm::OnlineSoftmax;
using fsdfm::Philox4;
using fsdfm::RowMass;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr float kInfF = std::numeric_limits<float>::infinity();
constexpr float kNanF = std::numeric_limits<float>::quiet_NaN();

// --- 1. Philox4x32-10 -------------------------------------------------------------------------

// Known answers from Random123's kat_vectors (philox4x32 10: counter, key, expected output).
void test_philox_kat() {
  struct Kat {
    uint32_t ctr[4];
    uint32_t key[2];
    uint32_t out[4];
  };
  const Kat kats[] = {
      {{0x00000000u, 0x00000000u, 0x00000000u, 0x00000000u},
       {0x00000000u, 0x00000000u},
       {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
       {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
       {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Kat& k : kats) {
    // The seed carries the key words as key0 | key1 << 32.
    const uint64_t seed = static_cast<uint64_t>(k.key[0]) | (static_cast<uint64_t>(k.key[1]) << 32);
    const Philox4 out =
        fsdfm::philox4x32_10(Philox4{{k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3]}}, seed);
    for (int i = 0; i < 4; ++i) CHECK_EQ(out.w[i], k.out[i]);
  }
}

// --- 2. uniform53 -----------------------------------------------------------------------------

void test_uniform53() {
  const double lo = fsdfm::uniform53(0u, 0u);
  const double hi = fsdfm::uniform53(0xffffffffu, 0xffffffffu);
  // The documented extremes: (2k + 1) 2^-53 with k = 0 is 2^-53, with k = 2^52 - 1 it is
  // 1 - 2^-53, the largest double below 1 (the interval is open).
  CHECK_EQ(lo, 0x1p-53);
  CHECK(hi < 1.0);
  CHECK_EQ(hi, 1.0 - 0x1p-53);
  CHECK(lo > 0.0);

  // Strictly inside (0, 1) and monotone in the bits, over sorted random words plus the ends
  // of both halves of the range (the upper half [0.5, 1) has the coarser double spacing).
  std::mt19937_64 rng(12345);
  std::vector<uint64_t> bits = {0u,
                                1u,
                                uint64_t{1} << 12,
                                (uint64_t{1} << 63) - 1,
                                uint64_t{1} << 63,
                                (uint64_t{1} << 63) + (uint64_t{1} << 12),
                                ~uint64_t{0} - (uint64_t{1} << 12),
                                ~uint64_t{0}};
  for (int i = 0; i < 20000; ++i) bits.push_back(rng());
  std::sort(bits.begin(), bits.end());
  bool inside = true;
  bool monotone = true;
  double prev = 0.0;
  double worst_inside = 0.5;
  for (const uint64_t b : bits) {
    const double u = fsdfm::uniform53(static_cast<uint32_t>(b >> 32), static_cast<uint32_t>(b));
    if (!(u > 0.0 && u < 1.0)) {
      inside = false;
      worst_inside = u;
    }
    if (u < prev) monotone = false;
    prev = u;
  }
  CHECK_MSG(inside, "value outside (0, 1): " + show(worst_inside));
  CHECK(monotone);
  // One step of the 52 used bits (2^12 in the 64-bit word) is one step of 2^-52; the 12
  // discarded low bits change nothing.
  CHECK_EQ(fsdfm::uniform53(0u, 1u << 12) - lo, 0x1p-52);
  CHECK_EQ(fsdfm::uniform53(0u, (1u << 12) - 1), lo);
}

// --- 3. row_uniforms --------------------------------------------------------------------------

// Chi-square statistic of `values` against the uniform distribution on (0, 1), 100 bins.
double chi_square_100(const std::vector<double>& values) {
  std::vector<double> counts(100, 0.0);
  for (const double v : values) counts[std::min(99, static_cast<int>(v * 100.0))] += 1.0;
  const double expected = static_cast<double>(values.size()) / 100.0;
  double chi2 = 0.0;
  for (const double c : counts) chi2 += (c - expected) * (c - expected) / expected;
  return chi2;
}

void test_row_uniforms() {
  const uint64_t seed = 0x0123456789abcdefULL;
  const fsdfm::RowUniforms a = fsdfm::row_uniforms(seed, 16, 7);
  const fsdfm::RowUniforms b = fsdfm::row_uniforms(seed, 16, 7);
  CHECK_EQ(a.jump, b.jump);
  CHECK_EQ(a.group, b.group);
  CHECK_EQ(a.within, b.within);
  CHECK(a.jump != a.group && a.jump != a.within && a.group != a.within);

  // Other rows, offsets and seeds give other draws, including rows and offsets that differ
  // only in the upper 32 bits of the counter words.
  const fsdfm::RowUniforms next_row = fsdfm::row_uniforms(seed, 16, 8);
  const fsdfm::RowUniforms next_call = fsdfm::row_uniforms(seed, 16 + fsdfm::kRowWords, 7);
  const fsdfm::RowUniforms high_row = fsdfm::row_uniforms(seed, 16, 7 + (uint64_t{1} << 32));
  const fsdfm::RowUniforms high_offset =
      fsdfm::row_uniforms(seed, 16 + (uint64_t{4} << 32), 7);
  const fsdfm::RowUniforms other_seed = fsdfm::row_uniforms(seed ^ 1, 16, 7);
  CHECK(next_row.jump != a.jump && next_row.group != a.group && next_row.within != a.within);
  CHECK(next_call.jump != a.jump && next_call.group != a.group && next_call.within != a.within);
  CHECK(high_row.jump != a.jump && high_row.within != a.within);
  CHECK(high_offset.jump != a.jump && high_offset.within != a.within);
  CHECK(other_seed.jump != a.jump && other_seed.within != a.within);

  // Counter layout: words 0-1 = offset/4 (+1 for the second block), words 2-3 = row. A call
  // uses two blocks, which is why it reserves kRowWords = 8 outputs: the next block belongs
  // to the call at offset + 4.
  const Philox4 blk0 = fsdfm::philox4x32_10(Philox4{{4u, 0u, 7u, 0u}}, seed);
  const Philox4 blk1 = fsdfm::philox4x32_10(Philox4{{5u, 0u, 7u, 0u}}, seed);
  CHECK_EQ(a.jump, fsdfm::uniform53(blk0.w[0], blk0.w[1]));
  CHECK_EQ(a.group, fsdfm::uniform53(blk0.w[2], blk0.w[3]));
  CHECK_EQ(a.within, fsdfm::uniform53(blk1.w[0], blk1.w[1]));
  CHECK_EQ(fsdfm::row_uniforms(seed, 20, 7).jump, a.within);
  CHECK_EQ(fsdfm::kRowWords, uint64_t{8});

  // Uniformity over 100k rows of one call: chi-square with 99 degrees of freedom below its
  // 0.999 quantile (148.2), and the mean within 4 standard errors of 1/2.
  constexpr int kRows = 100000;
  std::vector<double> jump(kRows), group(kRows), within(kRows);
  for (int r = 0; r < kRows; ++r) {
    const fsdfm::RowUniforms u = fsdfm::row_uniforms(seed, 1024, static_cast<uint64_t>(r));
    jump[r] = u.jump;
    group[r] = u.group;
    within[r] = u.within;
  }
  const double sigma = std::sqrt(1.0 / 12.0 / kRows);
  for (const std::vector<double>* v : {&jump, &group, &within}) {
    const double chi2 = chi_square_100(*v);
    double mean = 0.0;
    for (const double x : *v) mean += x;
    mean /= kRows;
    CHECK_MSG(chi2 < 148.2, "chi-square " + show(chi2));
    CHECK_MSG(std::fabs(mean - 0.5) < 4.0 * sigma, "mean " + show(mean));
  }
}

// --- 4. exp_nonpos ----------------------------------------------------------------------------

void test_exp_nonpos() {
  // Relative error against the double exponential of the same float argument, on a dense
  // grid of [-87, 0] and at random points.
  double max_err = 0.0;
  float worst = 0.0f;
  auto measure = [&](float y) {
    const double ref = std::exp(static_cast<double>(y));
    const double err = std::fabs(static_cast<double>(fsdfm::exp_nonpos(y)) - ref) / ref;
    if (!(err <= max_err)) {
      max_err = err;
      worst = y;
    }
  };
  constexpr int kGrid = 1000000;
  for (int i = 0; i <= kGrid; ++i) measure(static_cast<float>(-87.0 * i / kGrid));
  std::mt19937 rng(2024);
  std::uniform_real_distribution<float> dist(-87.0f, 0.0f);
  for (int i = 0; i < 100000; ++i) measure(dist(rng));
  std::printf("exp_nonpos: max relative error %.3g at y = %.9g\n", max_err, worst);
  CHECK_MSG(max_err < 4e-7, "max relative error " + show(max_err) + " at y = " + show(worst));

  const float one = fsdfm::exp_nonpos(0.0f);
  CHECK_MSG(std::fabs(one - 1.0f) <= std::numeric_limits<float>::epsilon(), show(one));
  CHECK_EQ(fsdfm::exp_nonpos(-0.0f), one);
  CHECK_EQ(fsdfm::exp_nonpos(-kInfF), 0.0f);
  CHECK_EQ(fsdfm::exp_nonpos(kNanF), 0.0f);
  CHECK_EQ(fsdfm::exp_nonpos(-100.0f), 0.0f);
  // The flush to 0 starts just below -87; at -87 itself the result is still a normal float.
  CHECK(fsdfm::exp_nonpos(-87.0f) >= std::numeric_limits<float>::min());
  CHECK_EQ(fsdfm::exp_nonpos(std::nextafter(-87.0f, -kInfF)), 0.0f);

  // Monotone non-decreasing on a fine grid, and ulp by ulp across every point where the
  // reduction's integer part n changes (y = (n + 1/2) ln 2), where a polynomial mismatch
  // between the two sides would show.
  bool monotone = true;
  float bad_at = 0.0f;
  float prev = 0.0f;
  for (int i = 0; i <= 8700000; ++i) {
    const float y = static_cast<float>(-87.0 + 1e-5 * i);
    const float e = fsdfm::exp_nonpos(y);
    if (e < prev) {
      monotone = false;
      bad_at = y;
    }
    prev = e;
  }
  for (int n = -126; n <= -1; ++n) {
    float y = static_cast<float>((n + 0.5) * 0.69314718055994531);
    for (int k = 0; k < 1000; ++k) y = std::nextafter(y, -kInfF);
    prev = fsdfm::exp_nonpos(y);
    for (int k = 0; k < 2000; ++k) {
      y = std::nextafter(y, kInfF);
      const float e = fsdfm::exp_nonpos(y);
      if (e < prev) {
        monotone = false;
        bad_at = y;
      }
      prev = e;
    }
  }
  CHECK_MSG(monotone, "decreases at y = " + show(bad_at));
}

// --- 5. OnlineSoftmax, rescale, row_is_valid ---------------------------------------------------

struct Reference {
  float m;
  double total;
  double allowed;
};

// Computed after the fact from the true maximum, in double. Allowed: not `excluded`, s >= thr.
Reference reference(const std::vector<float>& s, int64_t excluded, float thr) {
  Reference r{-kInfF, 0.0, 0.0};
  for (const float x : s) r.m = std::max(r.m, x);
  for (size_t i = 0; i < s.size(); ++i) {
    const double e = std::exp(static_cast<double>(s[i]) - static_cast<double>(r.m));
    r.total += e;
    r.allowed += static_cast<int64_t>(i) != excluded && s[i] >= thr ? e : 0.0;
  }
  return r;
}

// Feeds s[begin, end) as the GPU kernel does: a scalar head, units of 4, scalar tail.
template <bool kThreshold>
OnlineSoftmax stream(const std::vector<float>& s, size_t begin, size_t end, int64_t excluded,
                     float thr) {
  OnlineSoftmax st;
  size_t i = begin;
  const auto scalar = [&] {
    const float one[1] = {s[i]};
    st.add<kThreshold>(one, static_cast<int64_t>(i), excluded, thr);
    ++i;
  };
  if (i < end) scalar();
  for (; i + 4 <= end; i += 4) {
    const float unit[4] = {s[i], s[i + 1], s[i + 2], s[i + 3]};
    st.add<kThreshold>(unit, static_cast<int64_t>(i), excluded, thr);
  }
  while (i < end) scalar();
  return st;
}

// Merges two partial statistics with rescale(), as the kernels combine groups.
RowMass merge(const OnlineSoftmax& a, const OnlineSoftmax& b, float* m) {
  *m = std::max(a.m, b.m);
  const double ca = fsdfm::rescale(a.m, *m);
  const double cb = fsdfm::rescale(b.m, *m);
  return RowMass{a.total * ca + b.total * cb, a.allowed * ca + b.allowed * cb};
}

template <bool kThreshold>
void check_stream(const std::vector<float>& s, int64_t excluded, float thr) {
  const size_t n = s.size();
  const Reference ref = reference(s, excluded, thr);
  const OnlineSoftmax st = stream<kThreshold>(s, 0, n, excluded, thr);
  CHECK_EQ(st.m, ref.m);
  CHECK_REL(st.total, ref.total, 1e-5);
  CHECK_REL(st.allowed, ref.allowed, 1e-5);
  CHECK(!st.bad);
  CHECK(fsdfm::row_is_valid(st.m, st.bad));

  // Two halves (the second starting mid-unit) merged as the kernels merge groups.
  float m = 0.0f;
  const RowMass halves = merge(stream<kThreshold>(s, 0, n / 2 + 1, excluded, thr),
                               stream<kThreshold>(s, n / 2 + 1, n, excluded, thr), &m);
  CHECK_EQ(m, ref.m);
  CHECK_REL(halves.total, ref.total, 1e-5);
  CHECK_REL(halves.allowed, ref.allowed, 1e-5);
}

void test_online_softmax() {
  std::mt19937 rng(7);
  std::normal_distribution<float> logit(0.0f, 3.0f);

  // Increasing order makes the maximum change at nearly every unit, the worst case for the
  // rescaling; the shuffled order is the common case. The excluded token and the threshold
  // take their own paths (the excluded token's unit is summed again without it).
  for (const bool sorted : {true, false}) {
    constexpr size_t kN = 4099;  // not a multiple of the unit: a scalar tail
    std::vector<float> s(kN);
    for (size_t i = 0; i < kN; ++i) s[i] = i % 17 == 0 ? -kInfF : logit(rng);
    if (sorted) {
      std::sort(s.begin(), s.end());
    } else {
      std::shuffle(s.begin(), s.end(), rng);
    }
    for (const int64_t excluded : {int64_t{-1}, int64_t{0}, int64_t{2050}, int64_t{kN - 1}}) {
      check_stream<false>(s, excluded, -kInfF);
      check_stream<true>(s, excluded, -kInfF);
      check_stream<true>(s, excluded, 2.0f);
    }
  }

  // Nothing excluded and no threshold: allowed equals total; a threshold above every token
  // leaves nothing allowed.
  {
    const std::vector<float> s = {0.5f, -1.0f, 2.0f, -kInfF, 1.5f, 0.25f};
    const OnlineSoftmax all = stream<false>(s, 0, s.size(), -1, -kInfF);
    const OnlineSoftmax none = stream<true>(s, 0, s.size(), -1, kInfF);
    CHECK_EQ(all.allowed, all.total);
    CHECK_EQ(none.allowed, 0.0f);
    CHECK_EQ(none.total, all.total);
  }

  // An excluded token that dominates its unit: the others' mass survives (a subtraction
  // total - e_excluded would give 0 in float).
  {
    const std::vector<float> s = {30.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    const OnlineSoftmax st = stream<false>(s, 0, s.size(), 1, -kInfF);
    const Reference ref = reference(s, 1, -kInfF);
    CHECK_REL(st.allowed, ref.allowed, 1e-5);
    const OnlineSoftmax head = stream<false>(s, 0, s.size(), 0, -kInfF);
    CHECK_REL(head.allowed, reference(s, 0, -kInfF).allowed, 1e-5);
  }

  // A row of -inf: no maximum, empty sums, not a distribution; merging it changes nothing.
  {
    const std::vector<float> s(10, -kInfF);
    const OnlineSoftmax st = stream<false>(s, 0, s.size(), -1, -kInfF);
    CHECK_EQ(st.m, -kInfF);
    CHECK_EQ(st.total, 0.0f);
    CHECK_EQ(st.allowed, 0.0f);
    CHECK(!st.bad);
    CHECK(!fsdfm::row_is_valid(st.m, st.bad));
    CHECK_EQ(fsdfm::rescale(-kInfF, 3.0f), 0.0);
    CHECK_EQ(fsdfm::rescale(-kInfF, -kInfF), 0.0);

    const std::vector<float> t = {1.0f, 2.0f};
    const OnlineSoftmax other = stream<false>(t, 0, 2, -1, -kInfF);
    float m = 0.0f;
    const RowMass merged = merge(st, other, &m);
    CHECK_EQ(m, 2.0f);
    CHECK_EQ(merged.total, static_cast<double>(other.total));
  }

  // NaN anywhere (a scalar, the first or a later lane of a unit, after -inf only) marks the
  // row bad.
  for (const size_t at : {size_t{0}, size_t{1}, size_t{4}, size_t{6}, size_t{8}}) {
    std::vector<float> s = {-kInfF, -kInfF, 1.0f, -2.0f, 0.5f, 3.0f, -1.0f, 2.0f, 0.0f};
    s[at] = kNanF;
    for (const bool threshold : {false, true}) {
      const OnlineSoftmax st = threshold ? stream<true>(s, 0, s.size(), 3, -1.0f)
                                         : stream<false>(s, 0, s.size(), 3, -kInfF);
      CHECK_MSG(st.bad, "NaN at " + std::to_string(at));
      CHECK(!fsdfm::row_is_valid(st.m, st.bad));
    }
  }
  CHECK(fsdfm::max_nan(kNanF, 1.0f) != fsdfm::max_nan(kNanF, 1.0f));
  CHECK(fsdfm::max_nan(1.0f, kNanF) != fsdfm::max_nan(1.0f, kNanF));
  CHECK_EQ(fsdfm::max_nan(-kInfF, 1.0f), 1.0f);
  CHECK_EQ(fsdfm::max_nan(2.0f, 1.0f), 2.0f);

  // +inf: the maximum becomes +inf and the row is not a distribution, without a NaN flag.
  {
    const std::vector<float> s = {1.0f, kInfF, 0.5f, 0.25f, 0.0f, 2.0f};
    const OnlineSoftmax st = stream<false>(s, 0, s.size(), -1, -kInfF);
    CHECK_EQ(st.m, kInfF);
    CHECK(!st.bad);
    CHECK(!fsdfm::row_is_valid(st.m, st.bad));
  }

  CHECK(fsdfm::row_is_valid(0.0f, false));
  CHECK(!fsdfm::row_is_valid(0.0f, true));
  CHECK(!fsdfm::row_is_valid(kNanF, false));
  CHECK_REL(fsdfm::rescale(-1.0f, 1.0f), std::exp(-2.0), 4e-7);
  CHECK_EQ(fsdfm::rescale(1.0f, 1.0f), 1.0);
}

// --- 6. reach_threshold, jump_probability -----------------------------------------------------

void test_jump() {
  CHECK_EQ(fsdfm::reach_threshold(2.0f, kInfF), -kInfF);
  CHECK_EQ(fsdfm::reach_threshold(2.0f, 5.0f), -3.0f);
  CHECK_EQ(fsdfm::reach_threshold(-1.5f, 0.0f), -1.5f);

  // Against 1 - exp(-h lambda) in long double, lambda = rate_scale * allowed / total.
  struct Case {
    double total, allowed;
    float rate, h;
  };
  const Case cases[] = {{4.0, 1.0, 2.0f, 0.5f},   {1.0, 1.0, 1.0f, 1.0f},
                        {3.0, 2.5, 0.3f, 0.05f},  {10.0, 0.001, 1.0f, 1e-3f},
                        {1.5, 1.5, 3.0f, 1.0f},   {2.0, 1.0, 60.0f, 1.0f},
                        {7.0, 7.0, 1.0f, 1e-6f}};
  for (const Case& c : cases) {
    const long double hl = static_cast<long double>(c.h) * static_cast<long double>(c.rate) *
                           (static_cast<long double>(c.allowed) / c.total);
    const double expected = static_cast<double>(1.0L - std::exp(-hl));
    CHECK_REL(fsdfm::jump_probability(RowMass{c.total, c.allowed}, c.rate, c.h), expected, 1e-12);
  }

  // Tiny h lambda: 1 - exp(-x) would lose most digits to cancellation; the answer is the
  // series x - x^2/2 + x^3/6 to full precision.
  {
    const float h = 1e-12f;
    const double x = static_cast<double>(h);
    const double p = fsdfm::jump_probability(RowMass{1.0, 1.0}, 1.0f, h);
    CHECK(p > 0.0);
    CHECK_REL(p, x - x * x / 2.0 + x * x * x / 6.0, 1e-14);
  }

  // Large h lambda: certain jump, never above 1.
  for (const float rate : {50.0f, 1e3f, 1e30f}) {
    const double p = fsdfm::jump_probability(RowMass{1.0, 1.0}, rate, 1.0f);
    CHECK_MSG(p <= 1.0 && p >= 1.0 - 1e-15, "rate " + show(rate) + ": " + show(p));
  }

  // Clipped rates, non-positive or NaN h and an empty allowed set never jump: exactly 0.
  const RowMass mass{2.0, 1.0};
  CHECK_EQ(fsdfm::jump_probability(mass, 0.0f, 0.5f), 0.0);
  CHECK_EQ(fsdfm::jump_probability(mass, -1.0f, 0.5f), 0.0);
  CHECK_EQ(fsdfm::jump_probability(mass, kNanF, 0.5f), 0.0);
  CHECK_EQ(fsdfm::jump_probability(mass, 1.0f, 0.0f), 0.0);
  CHECK_EQ(fsdfm::jump_probability(mass, 1.0f, -0.5f), 0.0);
  CHECK_EQ(fsdfm::jump_probability(mass, 1.0f, kNanF), 0.0);
  CHECK_EQ(fsdfm::jump_probability(RowMass{2.0, 0.0}, 1.0f, 0.5f), 0.0);
}

// --- 7. InverseCdf ----------------------------------------------------------------------------

// Offers `w` in order; returns the result and whether a pick was made (not the fallback).
int64_t draw(const std::vector<double>& w, double u, double sum, bool* picked) {
  InverseCdf cdf(u, sum);
  for (size_t i = 0; i < w.size(); ++i) {
    if (cdf.offer(static_cast<int64_t>(i), w[i])) break;
  }
  *picked = cdf.pick >= 0;
  return cdf.result();
}

void test_inverse_cdf() {
  bool picked = false;

  // THE TAIL TEST: a token of probability 1e-14 is reachable by the largest uniform53. A
  // float32 uniform tops out at 1 - 2^-24 and could never select it.
  {
    const std::vector<double> w = {1.0, 1e-14};
    const double sum = w[0] + w[1];
    CHECK_EQ(draw(w, 0.5, sum, &picked), int64_t{0});
    CHECK(picked);
    const double top = fsdfm::uniform53(0xffffffffu, 0xffffffffu);
    CHECK_EQ(draw(w, top, sum, &picked), int64_t{1});
    // Selected by the running sum passing the target, not by the short-sum fallback.
    CHECK(picked);
    CHECK_EQ(draw(w, 1.0 - 0x1p-24, sum, &picked), int64_t{0});
    // The smallest uniform53 picks the first token.
    CHECK_EQ(draw(w, fsdfm::uniform53(0u, 0u), sum, &picked), int64_t{0});
  }

  // Exact frequencies: over the regular grid u_i = (i + 1/2) / N each category gets the
  // fraction w_k / sum up to the grid's discretisation; the zero weight is never picked.
  {
    const std::vector<double> w = {0.5, 1.25, 3.0, 0.0, 0.75, 2.0, 0.125};
    double sum = 0.0;
    for (const double x : w) sum += x;
    constexpr int kN = 1000000;
    std::vector<int> counts(w.size(), 0);
    bool always_picked = true;
    for (int i = 0; i < kN; ++i) {
      const int64_t k = draw(w, (i + 0.5) / kN, sum, &picked);
      always_picked = always_picked && picked;
      ++counts[static_cast<size_t>(k)];
    }
    CHECK(always_picked);
    CHECK_EQ(counts[3], 0);
    for (size_t k = 0; k < w.size(); ++k) {
      const double frac = static_cast<double>(counts[k]) / kN;
      CHECK_MSG(std::fabs(frac - w[k] / sum) <= 2.0 / kN,
                "category " + std::to_string(k) + ": " + show(frac) + " vs " + show(w[k] / sum));
    }
  }

  // Zero weights are skipped even when u points at them.
  {
    const std::vector<double> w = {0.0, 0.0, 1.0, 0.0};
    CHECK_EQ(draw(w, fsdfm::uniform53(0u, 0u), 1.0, &picked), int64_t{2});
    CHECK(picked);
  }

  // Once picked, later offers change nothing and report the pick.
  {
    InverseCdf cdf(0.1, 3.0);
    CHECK(cdf.offer(0, 1.0));
    CHECK(cdf.offer(1, 2.0));
    CHECK_EQ(cdf.result(), int64_t{0});
  }

  // Fallback: a sum larger than what is offered leaves the target unreached; the result is
  // the last index with positive weight (here not the last index offered).
  {
    const std::vector<double> w = {1.0, 2.0, 0.0};
    CHECK_EQ(draw(w, 0.99, 10.0, &picked), int64_t{1});
    CHECK(!picked);
    const std::vector<double> none = {0.0, 0.0};
    CHECK_EQ(draw(none, 0.5, 1.0, &picked), int64_t{-1});
  }
}

}  // namespace

// --- The fused head's merge over vocabulary tiles ---------------------------------------------

// Tiles with their own maxima (so the fold rescales both ways), one of -inf logits and one with
// no allowed mass: over a grid of the merge uniforms the final winner comes from tile k with
// frequency a_k / sum_j a_j (masses at a common maximum), exactly as a single draw over the row.
void test_head_fold() {
  struct Tile {
    float m;
    double total, allowed;
  };
  const std::vector<Tile> tiles = {
      {1.0f, 3.0, 2.0}, {-kInfF, 0.0, 0.0}, {2.5f, 1.5, 1.0}, {0.0f, 4.0, 0.0}, {-1.0f, 5.0, 5.0}};
  double weight[5], total_weight = 0.0, total_mass = 0.0;
  for (size_t k = 0; k < tiles.size(); ++k) {
    const double scale = tiles[k].m > -kInfF ? std::exp(static_cast<double>(tiles[k].m) - 2.5) : 0;
    weight[k] = tiles[k].allowed * scale;
    total_weight += weight[k];
    total_mass += tiles[k].total * scale;
  }
  constexpr int kGrid = 100;  // kGrid^3 combinations of the three merges that can change hands
  std::vector<int> counts(tiles.size(), 0);
  int unpicked = 0;
  fsdfm::HeadRow last;
  for (int i = 0; i < kGrid * kGrid * kGrid; ++i) {
    const double u[3] = {(i % kGrid + 0.5) / kGrid, (i / kGrid % kGrid + 0.5) / kGrid,
                         (i / kGrid / kGrid + 0.5) / kGrid};
    fsdfm::HeadRow row;
    int merge = 0;
    for (size_t k = 0; k < tiles.size(); ++k) {
      const double uk = tiles[k].allowed > 0.0 ? u[merge++ % 3] : 0.5;
      row.fold(tiles[k].m, RowMass{tiles[k].total, tiles[k].allowed}, static_cast<int64_t>(k),
               false, uk);
    }
    if (row.token < 0 || row.token >= static_cast<int64_t>(tiles.size())) {
      ++unpicked;
    } else {
      ++counts[static_cast<size_t>(row.token)];
    }
    last = row;
  }
  CHECK_EQ(unpicked, 0);
  for (size_t k = 0; k < tiles.size(); ++k) {
    const double frac = static_cast<double>(counts[k]) / (kGrid * kGrid * kGrid);
    CHECK_MSG(std::fabs(frac - weight[k] / total_weight) <= 2.0 / kGrid,
              "tile " + std::to_string(k) + ": " + show(frac) + " vs " +
                  show(weight[k] / total_weight));
  }
  CHECK_EQ(last.m, 2.5f);
  CHECK_REL(last.total, total_mass, 1e-6);
  CHECK_REL(last.allowed, total_weight, 1e-6);
  // The result: a row with nothing allowed cannot be sampled but stays at x_t in a jump.
  fsdfm::HeadRow empty;
  empty.fold(0.0f, RowMass{1.0, 0.0}, 7, false, 0.5);
  CHECK_EQ(empty.result(false, 3, 1.0f, 1.0f, 0.0), fsdfm::kInvalidToken);
  CHECK_EQ(empty.result(true, 3, 1.0f, 1.0f, 0.0), int64_t{3});
  fsdfm::HeadRow nan_row;
  nan_row.fold(0.0f, RowMass{1.0, 1.0}, 7, true, 0.5);
  CHECK_EQ(nan_row.result(false, 3, 1.0f, 1.0f, 0.0), fsdfm::kInvalidToken);
}

// The order keys of the controls' bisection sort floats as the floats sort (-0 and +0 one key),
// and key_value inverts them; the argmax order prefers the lowest id and never a -inf logit.
void test_controls_core() {
  using fsdfm::beats;
  using fsdfm::key_value;
  using fsdfm::order_key;
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> v = {-inf, -3e38f, -1.0f, -1e-45f, -0.0f, 0.0f, 1e-45f, 0.5f, 1.0f, 3e38f, inf};
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 10.0f);
  for (int i = 0; i < 2000; ++i) v.push_back(normal(rng));
  for (float a : v) {
    CHECK_EQ(key_value(order_key(a)), a == 0.0f ? 0.0f : a);
    for (int j = 0; j < 16; ++j) {
      const float b = v[(static_cast<size_t>(j) * 131 + 7) % v.size()];
      CHECK_EQ(a < b, order_key(a) < order_key(b));
      CHECK_EQ(a == b, order_key(a) == order_key(b));
    }
  }
  CHECK_EQ(order_key(-0.0f), order_key(0.0f));
  // A key between two floats' keys stands for the threshold "s >= key_value(key)".
  const uint32_t mid = order_key(1.0f) - 1u;
  CHECK(key_value(mid) < 1.0f && key_value(mid) > 0.99999f);

  CHECK(beats(1.0f, 3, -inf, fsdfm::kInvalidToken));
  CHECK(!beats(-inf, 3, -inf, fsdfm::kInvalidToken));  // a -inf logit never wins
  CHECK(beats(1.0f, 2, 1.0f, 5));                      // a tie goes to the lower id
  CHECK(!beats(1.0f, 5, 1.0f, 2));
  CHECK(!beats(0.5f, 0, 1.0f, 9));
  CHECK(!beats(1.0f, fsdfm::kInvalidToken, 0.5f, 9));  // "none" never wins

  // temperature 0: the argmax, or a jump to it at rate max(rate_scale, 0).
  CHECK_EQ(fsdfm::greedy_result(false, 4, -1, 0.0f, 0.0f, 0.9), int64_t{4});
  CHECK_EQ(fsdfm::greedy_result(true, 4, 4, 10.0f, 1.0f, 0.0), int64_t{4});
  const double p = 1.0 - std::exp(-0.5 * 2.0);
  CHECK_EQ(fsdfm::greedy_result(true, 4, 7, 2.0f, 0.5f, p * 0.999), int64_t{4});
  CHECK_EQ(fsdfm::greedy_result(true, 4, 7, 2.0f, 0.5f, p * 1.001), int64_t{7});
  CHECK_EQ(fsdfm::greedy_result(true, 4, 7, -2.0f, 0.5f, 0.0), int64_t{7});
  fsdfm::Controls c;
  CHECK(!c.active(10));
  c.top_k = 10;
  CHECK(!c.active(10));
  CHECK(c.active(11));
  c = fsdfm::Controls{0, 0.9};
  CHECK(c.active(1));
}

int main() {
  test_philox_kat();
  test_uniform53();
  test_row_uniforms();
  test_exp_nonpos();
  test_online_softmax();
  test_jump();
  test_inverse_cdf();
  test_head_fold();
  test_controls_core();
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
