// Counter-based random numbers for the sampling kernels (torch-free, host + device).
//
// Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3",
// SC'11): a bijection of a 128-bit counter keyed by a 64-bit seed. Each logits row draws its
// uniforms from its own counters, so the result depends only on (seed, offset, row): not on the
// thread count, the launch shape or the order in which rows are processed.
//
// Counter layout follows the (seed, subsequence, offset) convention of torch's CUDA generator:
// words 0-1 hold offset/4 + j (j-th block of four 32-bit outputs), words 2-3 hold the row index
// as the subsequence. On CUDA a call reserves `kRowWords` 32-bit outputs per row from the torch
// generator's Philox state, so its counters never overlap those of any other consumer of that
// generator. The CPU generator (mt19937) has no Philox state: there each call draws a fresh
// 64-bit key from it and uses offset 0.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FSDFM_HD __host__ __device__ __forceinline__
#else
#define FSDFM_HD inline
#endif

namespace fsdfm {

// 32-bit outputs reserved per row and per call: two Philox blocks (three 53-bit uniforms).
constexpr uint64_t kRowWords = 8;

struct Philox4 {
  uint32_t w[4];
};

FSDFM_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Ten rounds of the Philox4x32 S-box with the round constants and key schedule of the paper.
FSDFM_HD Philox4 philox4x32_10(Philox4 c, uint64_t seed) {
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(0xD2511F53u, c.w[0], hi0, lo0);
    mulhilo32(0xCD9E8D57u, c.w[2], hi1, lo1);
    c = Philox4{{hi1 ^ c.w[1] ^ k0, lo1, hi0 ^ c.w[3] ^ k1, lo0}};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

// A uniform double in the open interval (0, 1) from 64 random bits: (2k + 1) 2^-53 for k uniform
// on [0, 2^52), every value an exact double (with 53 bits, (k + 1/2) 2^-53 would round to 1.0 at
// the top). The smallest value is 2^-53 and the largest 1 - 2^-53, so an inverse-CDF draw reaches
// a token whose probability is 1e-15 at its true rate; a float32 uniform (resolution 2^-24)
// would lose every token below about 6e-8.
FSDFM_HD double uniform53(uint32_t hi, uint32_t lo) {
  const uint64_t bits = (static_cast<uint64_t>(hi) << 32) | lo;
  return (static_cast<double>(bits >> 12) + 0.5) * (1.0 / 4503599627370496.0);
}

// The three uniforms one row uses in one call: the stay/jump decision, the choice of a group
// of tokens, and the choice of a token inside that group (see row_math.h).
struct RowUniforms {
  double jump;
  double group;
  double within;
};

// Three uniforms from counter blocks `block` and `block + 1` of subsequence `row`.
FSDFM_HD void three_uniforms(uint64_t seed, uint64_t block, uint64_t row, double (&u)[3]) {
  const Philox4 c0{{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                    static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32)}};
  const Philox4 c1{{static_cast<uint32_t>(block + 1), static_cast<uint32_t>((block + 1) >> 32),
                    static_cast<uint32_t>(row), static_cast<uint32_t>(row >> 32)}};
  const Philox4 a = philox4x32_10(c0, seed);
  const Philox4 b = philox4x32_10(c1, seed);
  u[0] = uniform53(a.w[0], a.w[1]);
  u[1] = uniform53(a.w[2], a.w[3]);
  u[2] = uniform53(b.w[0], b.w[1]);
}

// `offset` is the generator's offset in 32-bit outputs (a multiple of 4, as torch hands it out).
FSDFM_HD RowUniforms row_uniforms(uint64_t seed, uint64_t offset, uint64_t row) {
  double u[3];
  three_uniforms(seed, offset / 4, row, u);
  return RowUniforms{u[0], u[1], u[2]};
}

// The uniforms of tile k of a row in the fused head (row_math.h, HeadRow): the choice of a group
// and of a token inside the tile, and the merge with the tiles before it. They come from counter
// blocks 2 + 2k and 3 + 2k of the row, after the two of row_uniforms (whose `jump` decides the
// row's stay-or-jump), so a call reserves head_words(tiles) 32-bit outputs per row.
struct TileUniforms {
  double group;
  double within;
  double merge;
};

FSDFM_HD constexpr uint64_t head_words(uint64_t tiles) { return 4 * (2 + 2 * tiles); }

FSDFM_HD TileUniforms tile_uniforms(uint64_t seed, uint64_t offset, uint64_t row, uint64_t tile) {
  double u[3];
  three_uniforms(seed, offset / 4 + 2 + 2 * tile, row, u);
  return TileUniforms{u[0], u[1], u[2]};
}

}  // namespace fsdfm
