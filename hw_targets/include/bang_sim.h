// bang_sim.h: the meaning of the BANG C names the mlu kernels use, on the CPU, with their cost.
//
// One core of an MLU370 chip runs a task at a time: `taskId`/`taskDim` (and `coreId`,
// `clusterId`) are set by the launch. A kernel declares its on-chip memory the way
// mlu-ops does (`__nram__ int8_t nram_buffer[MAX_NRAM_SIZE]`, likewise `__wram__`) and
// carves tiles out of it; the launch binds those arrays, and every intrinsic checks each
// NRAM/WRAM range it touches against the bound size (a tile past it is a fault naming the
// memory), and every GDRAM range with qmsim::gm_check. On-chip memory is filled with 0xff
// (fp16 NaN) before each task, so a kernel that reads padding it did not zero fails.
//
// Pipes and charges (constants QM_* come from hw_targets/mlu/target.py):
//   IO-DMA    GDRAM<->NRAM: bytes in QM_GDRAM_UNIT units per segment (a store that
//             leaves a partial unit also reads it: read-modify-write), at the chip's DRAM
//             bandwidth shared by the taskDim active cores, capped at one core's DMA rate.
//   Move-DMA  NRAM->WRAM and NRAM->NRAM: bytes / QM_MOVE_BYTES_PER_CYCLE.
//   (every __memcpy call also charges QM_DMA_ISSUE_CYCLES to its engine)
//   TFU       __bang_matmul: M x K x N MACs (K a multiple of QM_K_ALIGN, N of QM_N_ALIGN)
//             / QM_MACS_PER_CYCLE.
//   VFU       vector ops: ceil(bytes / QM_VECTOR_BYTES); lengths must be multiples of it.
//   ALU       scalar work; charged only the barrier.
// `__sync_compute()` ends a pipeline iteration (a stage): the barrier costs every pipe
// QM_SYNC_CYCLES, so the stage costs its slowest pipe plus the barrier.
//
// Asynchronous engines (qmsim::Tracker): `__memcpy_async` GDRAM<->NRAM runs on the IO
// engine, NRAM->WRAM and NRAM->NRAM on the Move engine, every `__bang_*` on the compute
// engine (TFU and VFU, in order with each other). Each is complete for the others only
// after `__sync_io()`, `__sync_move()` or `__sync_compute()` respectively; the synchronous
// `__memcpy` is complete when it returns. A read of what an engine still writes, or a
// write of what it still reads, is a race (exit 3). WRAM holds the right-hand matrix of
// `__bang_matmul` in the layout `__bang_reshape_filter` gives (here: QM_N_ALIGN output
// channels interleaved per input channel; the hardware's layout is not published), so a
// plainly transposed matrix multiplies wrongly.
#pragma once

#include <cmath>

#include "qmsim.h"

using half = qmsim::half;

#define __mlu_global__
#define __mlu_entry__
#define __mlu_func__ static inline
#define __nram__ static __attribute__((aligned(QM_NRAM_ALIGN)))
#define __wram__ static __attribute__((aligned(QM_WRAM_ALIGN)))
#define MAX_NRAM_SIZE QM_NRAM_BYTES
#define MAX_WRAM_SIZE QM_WRAM_BYTES

inline int taskId = 0;
inline int taskDim = 1;
inline int coreId = 0;
inline int clusterId = 0;
inline int clusterDim = 1;

enum mluMemcpyDirection_t { GDRAM2NRAM, NRAM2GDRAM, NRAM2WRAM, NRAM2NRAM };

namespace bang {

enum Pipe { ALU = 0, VFU = 1, TFU = 2, IO = 3, MOVE = 4 };

// An on-chip memory bound to a kernel's declared array.
struct Space {
  const char* name;
  unsigned char* base = nullptr;
  std::size_t bytes = 0;

  void check(const void* p, long long size, const char* op) const {
    const auto* q = static_cast<const unsigned char*>(p);
    if (base == nullptr) qmsim::fault(std::string(op) + ": no " + name + " bound for this kernel");
    const long long offset = q - base;
    if (offset < 0 || size < 0 || offset + size > static_cast<long long>(bytes)) {
      qmsim::fault(std::string(op) + " overflows " + name + " (" + std::to_string(offset) + " + " +
                   std::to_string(size) + " > " + std::to_string(bytes) + " bytes)");
    }
  }
};

inline Space& nram() {
  static Space s{"NRAM"};
  return s;
}

inline Space& wram() {
  static Space s{"WRAM"};
  return s;
}

// Binds the kernel's `__nram__`/`__wram__` arrays (size 0: the kernel uses none).
inline void bind(void* nram_base, std::size_t nram_bytes, void* wram_base, std::size_t wram_bytes) {
  nram() = Space{"NRAM", static_cast<unsigned char*>(nram_base), nram_bytes};
  wram() = Space{"WRAM", static_cast<unsigned char*>(wram_base), wram_bytes};
}

// Starts task `task` of `dim`: ids as a UNION/BLOCK launch gives them, poisoned on-chip memory.
inline void start_task(int task, int dim) {
  taskId = task;
  taskDim = dim;
  coreId = task % QM_CORES_PER_CLUSTER;
  clusterId = task / QM_CORES_PER_CLUSTER;
  clusterDim = (dim + QM_CORES_PER_CLUSTER - 1) / QM_CORES_PER_CLUSTER;
  if (nram().base) std::memset(nram().base, 0xff, nram().bytes);
  if (wram().base) std::memset(wram().base, 0xff, wram().bytes);
}

inline long long round_up(long long a, long long b) { return qmsim::ceil_div(a, b) * b; }

inline int io_engine() { return qmsim::tracker().engine("IO-DMA"); }
inline int move_engine() { return qmsim::tracker().engine("Move-DMA"); }
inline int compute_engine() { return qmsim::tracker().engine("compute"); }

// Engine `from` is complete for every engine.
inline void sync_engine(int from) {
  qmsim::Tracker& t = qmsim::tracker();
  for (int e : {io_engine(), move_engine(), compute_engine()}) t.order(from, e);
}

// A compute instruction writing dst and reading the srcs (NRAM/WRAM).
inline void compute(const void* dst, long long dst_bytes, std::initializer_list<qmsim::Span> srcs) {
  qmsim::tracker().access(compute_engine(), qmsim::span(dst, dst_bytes, "NRAM"), srcs, true);
}

inline qmsim::Span nram_span(const void* p, long long bytes) { return qmsim::span(p, bytes, "NRAM"); }

// WRAM index of element (n, k) of an N x K filter in the layout of __bang_reshape_filter.
inline long long wram_index(long long n, long long k, long long K) {
  return ((n / QM_N_ALIGN) * K + k) * QM_N_ALIGN + n % QM_N_ALIGN;
}

// Cycles of `bytes` over GDRAM: this core's share of the chip bandwidth (taskDim active
// cores), at most one core's DMA rate (both in bytes per 1000 cycles).
inline long long io_cycles(long long bytes) {
  const long long rate = std::max(1LL, std::min<long long>(QM_DRAM_MILLIBYTES_PER_CYCLE / taskDim,
                                                           QM_CORE_DRAM_MILLIBYTES_PER_CYCLE));
  return qmsim::ceil_div(bytes * 1000, rate);
}

inline long long vector_cycles(long long bytes, const char* op) {
  if (bytes % QM_VECTOR_BYTES != 0) {
    qmsim::fault(std::string(op) + ": vector length of " + std::to_string(bytes) +
                 " bytes is not a multiple of " + std::to_string(QM_VECTOR_BYTES));
  }
  return bytes / QM_VECTOR_BYTES;
}

inline void memcpy_2d(void* dst, const void* src, long long size, mluMemcpyDirection_t dir,
                      long long dst_stride, long long src_stride, long long segnum,
                      bool async) {
  const char* op = "__memcpy";
  const long long segments = segnum + 1;
  const int engine = dir == GDRAM2NRAM || dir == NRAM2GDRAM ? io_engine() : move_engine();
  const char* dst_name = dir == NRAM2WRAM ? "WRAM" : "NRAM";
  for (long long s = 0; s < segments; ++s) {
    auto* d = static_cast<unsigned char*>(dst) + s * dst_stride;
    const auto* r = static_cast<const unsigned char*>(src) + s * src_stride;
    switch (dir) {
      case GDRAM2NRAM:
        qmsim::gm_check(r, size, "__memcpy GDRAM2NRAM");
        nram().check(d, size, "__memcpy GDRAM2NRAM");
        break;
      case NRAM2GDRAM:
        nram().check(r, size, "__memcpy NRAM2GDRAM");
        qmsim::gm_check(d, size, "__memcpy NRAM2GDRAM");
        break;
      case NRAM2WRAM:
        nram().check(r, size, "__memcpy NRAM2WRAM");
        wram().check(d, size, "__memcpy NRAM2WRAM");
        break;
      case NRAM2NRAM:
        nram().check(r, size, "__memcpy NRAM2NRAM");
        nram().check(d, size, "__memcpy NRAM2NRAM");
        break;
      default:
        qmsim::fault(std::string(op) + ": direction not simulated");
    }
    qmsim::tracker().access(engine, qmsim::span(d, size, dst_name), {qmsim::span(r, size, "NRAM")},
                            async);
    std::memmove(d, r, size);
  }
  switch (dir) {
    case GDRAM2NRAM:
      qmsim::charge(IO, QM_DMA_ISSUE_CYCLES + io_cycles(segments * round_up(size, QM_GDRAM_UNIT)));
      break;
    case NRAM2GDRAM: {
      const long long rmw = size % QM_GDRAM_UNIT ? QM_GDRAM_UNIT : 0;
      qmsim::charge(IO, QM_DMA_ISSUE_CYCLES +
                            io_cycles(segments * (round_up(size, QM_GDRAM_UNIT) + rmw)));
      break;
    }
    default:
      qmsim::charge(MOVE, QM_DMA_ISSUE_CYCLES +
                              qmsim::ceil_div(segments * size, QM_MOVE_BYTES_PER_CYCLE));
  }
}

}  // namespace bang

// ---------------------------------------------------------------- data movement
// The copy is performed at once; an _async one stays in flight for the other engines
// until the __sync_* of its engine (the overlap it buys is what the stage accounting,
// max over pipes, models).
inline void __memcpy(void* dst, const void* src, int size, mluMemcpyDirection_t dir) {
  bang::memcpy_2d(dst, src, size, dir, 0, 0, 0, false);
}

// `segnum + 1` segments of `size` bytes, strides in bytes (BANG's 2-D form).
inline void __memcpy(void* dst, const void* src, int size, mluMemcpyDirection_t dir,
                     int dst_stride, int src_stride, int segnum) {
  bang::memcpy_2d(dst, src, size, dir, dst_stride, src_stride, segnum, false);
}

inline void __memcpy_async(void* dst, const void* src, int size, mluMemcpyDirection_t dir) {
  bang::memcpy_2d(dst, src, size, dir, 0, 0, 0, true);
}

inline void __memcpy_async(void* dst, const void* src, int size, mluMemcpyDirection_t dir,
                           int dst_stride, int src_stride, int segnum) {
  bang::memcpy_2d(dst, src, size, dir, dst_stride, src_stride, segnum, true);
}

// Waits for the IO-DMA engine's copies.
inline void __sync_io() { bang::sync_engine(bang::io_engine()); }

// Waits for the Move-DMA engine's copies (NRAM -> WRAM, NRAM -> NRAM).
inline void __sync_move() { bang::sync_engine(bang::move_engine()); }

// Waits for the compute engine and ends the pipeline iteration: every pipe waits at the
// barrier.
inline void __sync_compute() {
  bang::sync_engine(bang::compute_engine());
  for (int pipe = bang::ALU; pipe <= bang::MOVE; ++pipe) qmsim::charge(pipe, QM_SYNC_CYCLES);
  qmsim::end_stage();
}

// ---------------------------------------------------------------- tensor unit

// dst[M x N] (fp32, NRAM) = lhs[M x K] (NRAM) @ filter^T, where the N x K filter sits in
// WRAM as __bang_reshape_filter laid it out (then NRAM2WRAM).
inline void __bang_matmul(float* dst, const half* lhs, const half* rhs, int M, int K, int N) {
  if (K % QM_K_ALIGN != 0 || N % QM_N_ALIGN != 0) {
    qmsim::fault("__bang_matmul: K = " + std::to_string(K) + " must be a multiple of " +
                 std::to_string(QM_K_ALIGN) + " and N = " + std::to_string(N) + " of " +
                 std::to_string(QM_N_ALIGN));
  }
  bang::nram().check(lhs, 2LL * M * K, "__bang_matmul lhs");
  bang::wram().check(rhs, 2LL * K * N, "__bang_matmul rhs");
  bang::nram().check(dst, 4LL * M * N, "__bang_matmul dst");
  bang::compute(dst, 4LL * M * N,
                {bang::nram_span(lhs, 2LL * M * K), qmsim::span(rhs, 2LL * K * N, "WRAM")});
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      float acc = 0.0f;
      const half* row = lhs + static_cast<long>(m) * K;
      for (int k = 0; k < K; ++k)
        acc += static_cast<float>(row[k]) * static_cast<float>(rhs[bang::wram_index(n, k, K)]);
      dst[static_cast<long>(m) * N + n] = acc;
    }
  }
  qmsim::charge(bang::TFU, qmsim::ceil_div(1LL * M * K * N, QM_MACS_PER_CYCLE));
}

// ---------------------------------------------------------------- vector unit
inline void __bang_transpose(half* dst, const half* src, int height, int width) {
  const long long bytes = 2LL * height * width;
  bang::nram().check(src, bytes, "__bang_transpose src");
  bang::nram().check(dst, bytes, "__bang_transpose dst");
  bang::compute(dst, bytes, {bang::nram_span(src, bytes)});
  for (int h = 0; h < height; ++h)
    for (int w = 0; w < width; ++w)
      dst[static_cast<long>(w) * height + h] = src[static_cast<long>(h) * width + w];
  qmsim::charge(bang::VFU, bang::vector_cycles(bytes, "__bang_transpose"));
}

// dst = the n x (h w c) filter src (NHWC) in the layout __bang_matmul reads from WRAM.
inline void __bang_reshape_filter(half* dst, const half* src, int n, int h, int w, int c) {
  const long long kc = 1LL * h * w * c, bytes = 2LL * n * kc;
  if (n % QM_N_ALIGN != 0) qmsim::fault("__bang_reshape_filter: n = " + std::to_string(n) + " is not a multiple of " + std::to_string(QM_N_ALIGN));
  bang::nram().check(src, bytes, "__bang_reshape_filter src");
  bang::nram().check(dst, bytes, "__bang_reshape_filter dst");
  bang::compute(dst, bytes, {bang::nram_span(src, bytes)});
  for (long long i = 0; i < n; ++i)
    for (long long k = 0; k < kc; ++k) dst[bang::wram_index(i, k, kc)] = src[i * kc + k];
  qmsim::charge(bang::VFU, bang::vector_cycles(bytes, "__bang_reshape_filter"));
}

inline void __bang_add(float* dst, const float* a, const float* b, int n) {
  bang::nram().check(a, 4LL * n, "__bang_add");
  bang::nram().check(b, 4LL * n, "__bang_add");
  bang::nram().check(dst, 4LL * n, "__bang_add");
  bang::compute(dst, 4LL * n, {bang::nram_span(a, 4LL * n), bang::nram_span(b, 4LL * n)});
  for (int i = 0; i < n; ++i) dst[i] = a[i] + b[i];
  qmsim::charge(bang::VFU, bang::vector_cycles(4LL * n, "__bang_add"));
}

// dst[i] = src[i] + seg[i % seg_n]: a row vector added to every row.
inline void __bang_cycle_add(float* dst, const float* src, const float* seg, int n, int seg_n) {
  bang::nram().check(src, 4LL * n, "__bang_cycle_add");
  bang::nram().check(seg, 4LL * seg_n, "__bang_cycle_add");
  bang::nram().check(dst, 4LL * n, "__bang_cycle_add");
  bang::compute(dst, 4LL * n, {bang::nram_span(src, 4LL * n), bang::nram_span(seg, 4LL * seg_n)});
  for (int i = 0; i < n; ++i) dst[i] = src[i] + seg[i % seg_n];
  qmsim::charge(bang::VFU, bang::vector_cycles(4LL * n, "__bang_cycle_add"));
}

inline void __bang_add_scalar(float* dst, const float* src, float value, int n) {
  bang::nram().check(src, 4LL * n, "__bang_add_scalar");
  bang::nram().check(dst, 4LL * n, "__bang_add_scalar");
  bang::compute(dst, 4LL * n, {bang::nram_span(src, 4LL * n)});
  for (int i = 0; i < n; ++i) dst[i] = src[i] + value;
  qmsim::charge(bang::VFU, bang::vector_cycles(4LL * n, "__bang_add_scalar"));
}

template <class T>
inline void __bang_write_zero(T* dst, int n) {
  bang::nram().check(dst, static_cast<long long>(sizeof(T)) * n, "__bang_write_zero");
  bang::compute(dst, static_cast<long long>(sizeof(T)) * n, {});
  for (int i = 0; i < n; ++i) dst[i] = T(0);
  qmsim::charge(bang::VFU,
                bang::vector_cycles(static_cast<long long>(sizeof(T)) * n, "__bang_write_zero"));
}
