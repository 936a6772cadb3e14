// The varlen-K tile walk as plain arithmetic (no CUDA headers needed, so the host tests check it):
// tile number `linear` is expert-major, and within an expert a grouped raster over (m tiles,
// n tiles): kGroupRows consecutive m tiles walk every n tile before the next group (the last
// group may be shorter). A persistent block locates each of its tiles twice (its copies run
// ahead of its wgmma), and with 4-k-tile tiles five 32-bit divisions per tile were a long
// dependent chain on every tile; here every divisor is fixed for the launch (FastDivisor).
#pragma once

#include "cuda/fast_divisor.hpp"

namespace scattermoe::cuda {

struct VarlenKTiling {
  static constexpr int kGroupRows = 8;
  int m_tiles = 1;
  int n_tiles = 1;
  FastDivisor per_expert;  // m_tiles * n_tiles
  FastDivisor per_group;   // kGroupRows * n_tiles
  FastDivisor tail_rows;   // m tiles of the last group when it is short (m_tiles % kGroupRows)

  struct Tile {
    int e;
    int m_tile;
    int n_tile;
  };

  VarlenKTiling() = default;
  // m_tiles, n_tiles >= 1 with E * m_tiles * n_tiles below 2^31.
  SCATTERMOE_HOST_DEVICE VarlenKTiling(int m, int n)
      : m_tiles(m),
        n_tiles(n),
        per_expert(static_cast<std::int64_t>(m) * n),
        per_group(static_cast<std::int64_t>(kGroupRows) * n),
        tail_rows(m % kGroupRows ? m % kGroupRows : kGroupRows) {}

  SCATTERMOE_HOST_DEVICE Tile operator()(int linear) const {
    const int e = static_cast<int>(per_expert(static_cast<std::uint32_t>(linear)));
    const int in_expert = linear - e * m_tiles * n_tiles;
    const int group = static_cast<int>(per_group(static_cast<std::uint32_t>(in_expert)));
    const int in_group = in_expert - group * kGroupRows * n_tiles;
    const int first = group * kGroupRows;
    const bool full = m_tiles - first >= kGroupRows;
    const int rows_here = full ? kGroupRows : m_tiles - first;
    const int n_tile = full ? in_group / kGroupRows : static_cast<int>(tail_rows(static_cast<std::uint32_t>(in_group)));
    return Tile{e, first + in_group - n_tile * rows_here, n_tile};
  }
};

}  // namespace scattermoe::cuda
