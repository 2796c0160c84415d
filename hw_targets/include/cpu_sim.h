// cpu_sim.h: the meaning of the plain-C kernels' intrinsics on the CPU, with their cost.
//
// The "on-chip" level of the cpu target is the per-core L2 cache, modelled as an arena of
// QM_LOCAL_BYTES that tiles are packed into (cache blocking made explicit and checked).
// Pipes: dram (every move between DRAM and the local arena, loads and stores alike: they
// share the bandwidth) and fma (the SIMD FMA units). Constants
// QM_* come from hw_targets/cpu/target.py (the harness defines them before this header).
#pragma once

#include "qmsim.h"

namespace cpu {

enum Pipe { DRAM = 0, FMA = 1 };

inline qmsim::Arena& local() {
  static qmsim::Arena arena("L2", QM_LOCAL_BYTES, QM_LOCAL_ALIGN);
  return arena;
}

inline long long move_cycles(long long bytes) {
  return qmsim::ceil_div(bytes, QM_CORE_BYTES_PER_CYCLE);
}

}  // namespace cpu

// Allocates from the core's local arena (freed when the core's work ends).
inline float* qm_local_alloc(long count, const char* what) {
  return static_cast<float*>(cpu::local().alloc(sizeof(float) * count, what));
}

// dst[r * cols + c] = src[r * ld + c]: a 2-D copy from global memory into a local tile.
inline void qm_load(float* dst, const float* src, int rows, int cols, long ld) {
  cpu::local().check(dst, sizeof(float) * rows * cols, "qm_load");
  for (int r = 0; r < rows; ++r) {
    qmsim::gm_check(src + r * ld, sizeof(float) * cols, "qm_load");
    std::memcpy(dst + static_cast<long>(r) * cols, src + r * ld, sizeof(float) * cols);
  }
  qmsim::charge(cpu::DRAM, cpu::move_cycles(4LL * rows * cols));
}

// c[rows x cols] += a[rows x kk] @ b[kk x cols], all local; the SIMD unit works on
// QM_LANES columns at a time, so a partial vector costs a whole one.
inline void qm_fma(float* c, const float* a, const float* b, int rows, int cols, int kk) {
  cpu::local().check(c, sizeof(float) * rows * cols, "qm_fma C");
  cpu::local().check(a, sizeof(float) * rows * kk, "qm_fma A");
  cpu::local().check(b, sizeof(float) * kk * cols, "qm_fma B");
  for (int r = 0; r < rows; ++r) {
    for (int p = 0; p < kk; ++p) {
      const float av = a[r * kk + p];
      const float* brow = b + static_cast<long>(p) * cols;
      float* crow = c + static_cast<long>(r) * cols;
      for (int q = 0; q < cols; ++q) crow[q] += av * brow[q];
    }
  }
  const long long padded = 1LL * rows * ((cols + QM_LANES - 1) / QM_LANES * QM_LANES) * kk;
  qmsim::charge(cpu::FMA, qmsim::ceil_div(padded, QM_MACS_PER_CYCLE));
}

inline void qm_zero(float* c, int count) {
  cpu::local().check(c, sizeof(float) * count, "qm_zero");
  std::memset(c, 0, sizeof(float) * count);
}

// Adds bias[r] to row r (row = 1) or bias[q] to column q (row = 0); reads the bias from
// global memory through the dram pipe.
inline void qm_bias(float* c, const float* bias, int rows, int cols, int row) {
  cpu::local().check(c, sizeof(float) * rows * cols, "qm_bias");
  const int len = row ? rows : cols;
  qmsim::gm_check(bias, sizeof(float) * len, "qm_bias");
  for (int r = 0; r < rows; ++r)
    for (int q = 0; q < cols; ++q) c[r * cols + q] += row ? bias[r] : bias[q];
  qmsim::charge(cpu::DRAM, cpu::move_cycles(4LL * len));
}

// dst[r * ld + c] = src[r * cols + c]: a 2-D copy of a local tile to global memory.
inline void qm_store(float* dst, const float* src, int rows, int cols, long ld) {
  cpu::local().check(src, sizeof(float) * rows * cols, "qm_store");
  for (int r = 0; r < rows; ++r) {
    qmsim::gm_check(dst + r * ld, sizeof(float) * cols, "qm_store");
    std::memcpy(dst + r * ld, src + static_cast<long>(r) * cols, sizeof(float) * cols);
  }
  qmsim::charge(cpu::DRAM, cpu::move_cycles(4LL * rows * cols));
}

// One row of an im2col matrix: dst[oh * wo + ow] = plane[ih * w + iw] for the kernel tap
// (kh, kw), zero where the tap falls in the padding. Charged as a full row moved in.
inline void qm_im2col_row(float* dst, const float* plane, int h, int w, int ho, int wo, int kh,
                          int kw, int sh, int sw, int ph, int pw, int dh, int dw) {
  cpu::local().check(dst, sizeof(float) * ho * wo, "qm_im2col_row");
  qmsim::gm_check(plane, sizeof(float) * h * w, "qm_im2col_row");
  for (int oh = 0; oh < ho; ++oh) {
    const int ih = oh * sh - ph + kh * dh;
    for (int ow = 0; ow < wo; ++ow) {
      const int iw = ow * sw - pw + kw * dw;
      dst[oh * wo + ow] = (ih >= 0 && ih < h && iw >= 0 && iw < w) ? plane[ih * w + iw] : 0.0f;
    }
  }
  qmsim::charge(cpu::DRAM, cpu::move_cycles(4LL * ho * wo));
}

inline void qm_end_stage() { qmsim::end_stage(); }
