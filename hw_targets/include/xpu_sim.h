// xpu_sim.h: the meaning of the XPU C/C++ names the kunlunxin kernels use, on the CPU.
//
// A Kunlun 2 (R200) style device: QM_CLUSTERS clusters of QM_CORES_PER_CLUSTER cores;
// each core owns QM_LM_BYTES of local memory (LM), a bounds-checked arena here. The
// harness runs the cores one after the other (`kernel<<<QM_CLUSTERS,
// QM_CORES_PER_CLUSTER>>>` becomes a loop that calls xpu::enter before each core).
//
// Cost (constants QM_* come from hw_targets/kunlunxin/target.py; its cost model predicts
// exactly what is charged here):
//   dma     every GM2LM / LM2GM (and _ASYNC) call, both directions sharing the core's
//           engine and its GDDR6 share: QM_DMA_LATENCY + ceil(bytes / per-core DMA rate)
//   simd    every 512-bit vector arithmetic instruction (svmac, vvadd, svadd, fp16->fp32
//           widening): QM_SIMD_OP_CYCLES; vector loads/stores to LM and scalar code
//           are free (they issue beside the vector pipe)
// The per-core DMA rate is the chip's GDDR6 bandwidth split evenly over the cores that
// have work (the launch sets xpu::active_cores()), capped at one core's DMA engine
// (QM_CORE_DMA_BYTES_PER_KCYCLE); rates are bytes per 1000 cycles so that the clock may
// be any value.
// `mfence()` waits for the stage's DMAs: a double-buffered stage ends there.
#pragma once

#include "qmsim.h"

using float16 = qmsim::half;

#define __global__
#define __device__
#define __local__

// The emitted kernels use the 512-bit vector types (float32x16_t, float16x32_t); a target
// described with other vectors costs them in the model but cannot be simulated here.
static_assert(QM_SIMD_BITS == 512, "xpu_sim.h simulates the 512-bit SIMD of QM_SIMD_BITS");

namespace xpu {

enum Pipe { DMA = 0, SIMD = 1 };

struct Ids {
  int cluster = 0;
  int core = 0;
};

inline Ids& ids() {
  static Ids current;
  return current;
}

// Which core of which cluster runs next (the launch loop sets it).
inline void enter(int cluster, int core) { ids() = Ids{cluster, core}; }

inline qmsim::Arena& lm() {
  static qmsim::Arena arena("LM", QM_LM_BYTES, QM_LM_ALIGN);
  return arena;
}

// Cores that have work in the running kernel: they share the GDDR6 bandwidth.
inline long long& active_cores() {
  static long long active = QM_CORES;
  return active;
}

// Bytes per 1000 cycles of one core's DMA: its share of GDDR6, at most its engine's rate.
inline long long dma_rate() {
  return std::max(1LL, std::min<long long>(QM_CORE_DMA_BYTES_PER_KCYCLE,
                                           QM_GM_BYTES_PER_KCYCLE / active_cores()));
}

inline long long dma_cycles(long long bytes) {
  return QM_DMA_LATENCY + qmsim::ceil_div(bytes * 1000LL, dma_rate());
}

}  // namespace xpu

inline int core_id() { return xpu::ids().core; }
inline int core_num() { return QM_CORES_PER_CLUSTER; }
inline int cluster_id() { return xpu::ids().cluster; }
inline int cluster_num() { return QM_CLUSTERS; }

// Places a `__local__ T name[count]` array in the core's LM. On the device the compiler
// lays LM out statically; here the layout is an arena of the declared size, so a tile
// that does not fit faults with the name of the array.
template <class T>
inline T* lm_malloc(long count, const char* what) {
  return static_cast<T*>(xpu::lm().alloc(sizeof(T) * count, what));
}

// ---------------------------------------------------------------- DMA
inline void GM2LM(const void* gm, void* lm, int bytes) {
  qmsim::gm_check(gm, bytes, "GM2LM");
  xpu::lm().check(lm, bytes, "GM2LM");
  std::memcpy(lm, gm, bytes);
  qmsim::charge(xpu::DMA, xpu::dma_cycles(bytes));
}

inline void LM2GM(const void* lm, void* gm, int bytes) {
  xpu::lm().check(lm, bytes, "LM2GM");
  qmsim::gm_check(gm, bytes, "LM2GM");
  std::memcpy(gm, lm, bytes);
  qmsim::charge(xpu::DMA, xpu::dma_cycles(bytes));
}

// The asynchronous variants complete at once here; their overlap with the vector pipe
// is what the stage accounting (max over pipes) stands for.
inline void GM2LM_ASYNC(const void* gm, void* lm, int bytes) { GM2LM(gm, lm, bytes); }
inline void LM2GM_ASYNC(const void* lm, void* gm, int bytes) { LM2GM(lm, gm, bytes); }

inline void mfence() { qmsim::end_stage(); }

// ---------------------------------------------------------------- 512-bit SIMD
struct float32x16_t {
  float v[16];
};

struct float16x32_t {
  float16 v[32];
};

inline float32x16_t vload_lm_float32x16(const float* lm) {
  xpu::lm().check(lm, sizeof(float32x16_t), "vload_lm_float32x16");
  float32x16_t r;
  std::memcpy(r.v, lm, sizeof r.v);
  return r;
}

inline void vstore_lm_float32x16(float* lm, float32x16_t x) {
  xpu::lm().check(lm, sizeof(float32x16_t), "vstore_lm_float32x16");
  std::memcpy(lm, x.v, sizeof x.v);
}

inline float16x32_t vload_lm_float16x32(const float16* lm) {
  xpu::lm().check(lm, sizeof(float16x32_t), "vload_lm_float16x32");
  float16x32_t r;
  std::memcpy(r.v, lm, sizeof r.v);
  return r;
}

inline float32x16_t vset_zero() {
  float32x16_t r;
  for (float& x : r.v) x = 0.0f;
  return r;
}

// Lanes 0..15 (l) or 16..31 (h) of an fp16 vector, widened to fp32 (exact).
inline float32x16_t vfp162float_l(float16x32_t x) {
  float32x16_t r;
  for (int i = 0; i < 16; ++i) r.v[i] = static_cast<float>(x.v[i]);
  qmsim::charge(xpu::SIMD, QM_SIMD_OP_CYCLES);
  return r;
}

inline float32x16_t vfp162float_h(float16x32_t x) {
  float32x16_t r;
  for (int i = 0; i < 16; ++i) r.v[i] = static_cast<float>(x.v[16 + i]);
  qmsim::charge(xpu::SIMD, QM_SIMD_OP_CYCLES);
  return r;
}

// acc + a * b, lane by lane (scalar a times vector b, accumulated in fp32).
inline float32x16_t svmac_float32x16(float a, float32x16_t b, float32x16_t acc) {
  for (int i = 0; i < 16; ++i) acc.v[i] += a * b.v[i];
  qmsim::charge(xpu::SIMD, QM_SIMD_OP_CYCLES);
  return acc;
}

inline float32x16_t vvadd_float32x16(float32x16_t a, float32x16_t b) {
  for (int i = 0; i < 16; ++i) a.v[i] += b.v[i];
  qmsim::charge(xpu::SIMD, QM_SIMD_OP_CYCLES);
  return a;
}

inline float32x16_t svadd_float32x16(float a, float32x16_t b) {
  for (int i = 0; i < 16; ++i) b.v[i] += a;
  qmsim::charge(xpu::SIMD, QM_SIMD_OP_CYCLES);
  return b;
}
