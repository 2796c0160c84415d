// xpu_sim.h: the meaning of the XPU C/C++ names the kunlunxin kernels use, on the CPU.
//
// A Kunlun 2 (R200, XPU2) device: QM_CLUSTERS clusters of QM_CORES_PER_CLUSTER cores;
// each core owns QM_LM_BYTES of local memory (LM). Kernels declare LM as fixed `__local__`
// arrays (here: arrays aligned to QM_LM_ALIGN; the launch checks that a kernel's arrays fit
// LM, as the XPU compiler does) and global pointers as `__global_ptr__`. The harness runs
// the cores one after the other (`kernel<<<QM_CLUSTERS, QM_CORES_PER_CLUSTER>>>` becomes a
// loop that calls xpu::enter before each core).
//
// Asynchronous engines (qmsim::Tracker): the core's DMA engine runs GM2LM_ASYNC and
// LM2GM_ASYNC; they complete for the core only at the next `mfence()`. The core (scalar
// unit and SIMD) is in order with itself: GM2LM/LM2GM are synchronous. A vector load of
// LM a DMA still writes, or a store to LM a DMA still reads, is a race (exit 3).
//
// Cost (constants QM_* come from hw_targets/kunlunxin/target.py; its cost model predicts
// exactly what is charged here):
//   dma     every GM2LM / LM2GM (and _ASYNC) call, both directions sharing the core's
//           engine and its GDDR6 share: QM_DMA_LATENCY + ceil(bytes / per-core DMA rate)
//   simd    every 512-bit vector arithmetic instruction (svmac, svmul, vvadd, svadd, fp16->fp32
//           widening): QM_SIMD_OP_CYCLES times the cores with work that share this core's
//           SIMD unit (QM_SIMD_SHARERS per unit, guide); vector loads/stores to LM and
//           scalar code are free (they issue beside the vector pipe)
// The per-core DMA rate is the chip's GDDR6 bandwidth split evenly over the cores that
// have work (the launch sets xpu::active_cores()), capped at one core's DMA engine
// (QM_CORE_DMA_BYTES_PER_KCYCLE); rates are bytes per 1000 cycles so that the clock may
// be any value.
// `mfence()` waits for the core's DMAs: a double-buffered stage ends there.
#pragma once

#include "qmsim.h"

using float16 = qmsim::half;

#define __global__
#define __device__
#define __global_ptr__
#define __local__ alignas(QM_LM_ALIGN)
// Variables that vector instructions access (guide §3.2.2: 64-byte aligned on Kunlun 2).
#define __simd__ alignas(64)

// The emitted kernels use the 512-bit vector types (float32x16_t, bfloat16x32_t); a target
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

inline int flat_core() { return ids().cluster * QM_CORES_PER_CLUSTER + ids().core; }

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

// Cores with work (the first active_cores() of the grid) sharing this core's SIMD unit.
// Busy cores on this core's SIMD unit. The GEMM kernels put tile slot r * G + g on core
// 4g + r (G = QM_CORES / QM_SIMD_SHARERS units), and the first active_cores() slots are busy;
// when the cores do not split into whole units, slot = core.
inline long long simd_sharers() {
  const long long s = QM_SIMD_SHARERS, units = QM_CORES / QM_SIMD_SHARERS;
  if (QM_CORES % QM_SIMD_SHARERS != 0) {
    const long long group = flat_core() / s * s;
    return std::max(1LL, std::min<long long>(s, active_cores() - group));
  }
  long long busy = 0;
  for (long long r = 0; r < s; ++r) busy += r * units + flat_core() / s < active_cores() ? 1 : 0;
  return std::max(1LL, busy);
}

inline void simd_op() { qmsim::charge(SIMD, QM_SIMD_OP_CYCLES * simd_sharers()); }

inline int dma_engine() { return qmsim::tracker().engine("DMA"); }
inline int core_engine() { return qmsim::tracker().engine("core"); }

// A kernel's `__local__` arrays must fit LM (the launch passes their total, as laid out).
inline void check_lm(long long bytes, const char* kernel) {
  if (bytes > QM_LM_BYTES) {
    qmsim::fault(std::string(kernel) + ": __local__ arrays need " + std::to_string(bytes) +
                 " bytes of LM, past its " + std::to_string(QM_LM_BYTES) + " bytes");
  }
}

// The core reads (or writes) LM: a race with a DMA still in flight is a fault.
inline void lm_access(const void* lm, long long bytes, bool write, const char* op) {
  if (reinterpret_cast<std::uintptr_t>(lm) % 4 != 0) qmsim::fault(std::string(op) + ": unaligned LM access");
  const qmsim::Span s = qmsim::span(lm, bytes, "LM");
  if (write) qmsim::tracker().access(core_engine(), s, {}, false);
  else qmsim::tracker().access(core_engine(), {}, {s}, false);
}

inline void vector_access(const void* lm, long long bytes, bool write, const char* op) {
  if (reinterpret_cast<std::uintptr_t>(lm) % QM_VECTOR_ALIGN != 0) {
    qmsim::fault(std::string(op) + ": LM address not " + std::to_string(QM_VECTOR_ALIGN) +
                 "-byte aligned");
  }
  lm_access(lm, bytes, write, op);
}

inline void dma(const void* src, void* dst, int bytes, bool to_lm, bool async, const char* op) {
  qmsim::gm_check(to_lm ? src : dst, bytes, op);
  const qmsim::Span d = qmsim::span(dst, bytes, "LM");
  const qmsim::Span s = qmsim::span(src, bytes, "LM");
  qmsim::tracker().access(dma_engine(), d, {s}, async);
  std::memcpy(dst, src, bytes);
  qmsim::charge(DMA, dma_cycles(bytes));
}

}  // namespace xpu

inline int core_id() { return xpu::ids().core; }
inline int core_num() { return QM_CORES_PER_CLUSTER; }
inline int cluster_id() { return xpu::ids().cluster; }
inline int cluster_num() { return QM_CLUSTERS; }

// ---------------------------------------------------------------- DMA
inline void GM2LM(const void* gm, void* lm, int bytes) {
  xpu::dma(gm, lm, bytes, true, false, "GM2LM");
}

inline void LM2GM(const void* lm, void* gm, int bytes) {
  xpu::dma(lm, gm, bytes, false, false, "LM2GM");
}

// Queued on the core's DMA engine: complete for the core at the next mfence().
inline void GM2LM_ASYNC(const void* gm, void* lm, int bytes) {
  xpu::dma(gm, lm, bytes, true, true, "GM2LM_ASYNC");
}

inline void LM2GM_ASYNC(const void* lm, void* gm, int bytes) {
  xpu::dma(lm, gm, bytes, false, true, "LM2GM_ASYNC");
}

// Waits for the core's DMAs; ends a stage.
inline void mfence() {
  qmsim::tracker().order(xpu::dma_engine(), xpu::core_engine());
  qmsim::end_stage();
}

// ---------------------------------------------------------------- 512-bit SIMD
struct float32x16_t {
  float v[16];
};

inline float32x16_t vload_lm_float32x16(const float* lm) {
  xpu::vector_access(lm, sizeof(float32x16_t), false, "vload_lm_float32x16");
  float32x16_t r;
  std::memcpy(r.v, lm, sizeof r.v);
  return r;
}

inline void vstore_lm_float32x16(float* lm, float32x16_t x) {
  xpu::vector_access(lm, sizeof(float32x16_t), true, "vstore_lm_float32x16");
  std::memcpy(lm, x.v, sizeof x.v);
}


// 32 16-bit lanes: the guide's container for fp16 vectors on Kunlun 2 (its §5.4.6
// conversions take and give fp16 as bfloat16x32_t); here the lanes hold fp16 values.
struct bfloat16x32_t {
  float16 v[32];
};

inline bfloat16x32_t vload_lm_bfloat16x32(void* lm) {
  xpu::vector_access(lm, sizeof(bfloat16x32_t), false, "vload_lm_bfloat16x32");
  bfloat16x32_t r;
  std::memcpy(r.v, lm, sizeof r.v);
  return r;
}

// The 16 fp16 of the low (l) or high (h) 256 bits as fp32 (guide §5.4.6.7, §5.4.6.8).
inline float32x16_t vfp162float_l(bfloat16x32_t a) {
  float32x16_t r;
  for (int i = 0; i < 16; ++i) r.v[i] = static_cast<float>(a.v[i]);
  xpu::simd_op();
  return r;
}

inline float32x16_t vfp162float_h(bfloat16x32_t a) {
  float32x16_t r;
  for (int i = 0; i < 16; ++i) r.v[i] = static_cast<float>(a.v[16 + i]);
  xpu::simd_op();
  return r;
}

// A scalar of LM, read by the core (checked against DMAs in flight).
template <class T>
inline T lm_read(const T* lm) {
  xpu::lm_access(lm, sizeof(T), false, "LM read");
  return *lm;
}

// acc + a * b, lane by lane (scalar a times vector b, accumulated in fp32).
inline float32x16_t svmac_float32x16(float a, float32x16_t b, float32x16_t acc) {
  for (int i = 0; i < 16; ++i) acc.v[i] += a * b.v[i];
  xpu::simd_op();
  return acc;
}

// a * b, lane by lane (scalar a times vector b).
inline float32x16_t svmul_float32x16(float a, float32x16_t b) {
  for (int i = 0; i < 16; ++i) b.v[i] *= a;
  xpu::simd_op();
  return b;
}

inline float32x16_t vvadd_float32x16(float32x16_t a, float32x16_t b) {
  for (int i = 0; i < 16; ++i) a.v[i] += b.v[i];
  xpu::simd_op();
  return a;
}

inline float32x16_t svadd_float32x16(float a, float32x16_t b) {
  for (int i = 0; i < 16; ++i) b.v[i] += a;
  xpu::simd_op();
  return b;
}
