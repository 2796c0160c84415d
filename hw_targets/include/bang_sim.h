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
//   TFU       __bang_conv / __bang_conv_partial: output pixels x channel_output x
//             (kernel_height kernel_width channel_input) MACs / QM_MACS_PER_CYCLE (the
//             partial sum's addition rides on the TFU's accumulation: not charged).
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
// write of what it still reads, is a race (exit 3). WRAM holds the filter of `__bang_conv`
// in the layout `__bang_reshape_filter` gives (here: QM_N_ALIGN output channels interleaved
// per input channel; the hardware's layout is not published), so a plainly transposed
// matrix multiplies wrongly. A GEMM is a 1x1 convolution (mlu-ops' msda kernels do the same).
#pragma once

#include <cmath>
#include <vector>

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

namespace bang {

// dst[ho][wo][co] (fp32, NRAM) = sum over (kh, kw, ci) of src[ho*sh+kh][wo*sw+kw][ci] (NRAM,
// NHWC) times the co x (kh kw ci) filter in WRAM, laid out by __bang_reshape_filter (then
// NRAM2WRAM); plus partial[ho][wo][co] when `partial` is given (it may be dst). The header's
// MLU370 (tp_3xx) rules checked: ci * sizeof(half) 64-byte aligned (ci a multiple of
// QM_K_ALIGN), co a multiple of QM_N_ALIGN (64), dst not src.
inline void conv(const char* op, float* dst, const half* src, const half* kernel, const float* partial,
                 int ci, int height, int width, int kh, int kw, int sw, int sh, int co) {
  if (ci % QM_K_ALIGN != 0 || co % QM_N_ALIGN != 0) {
    qmsim::fault(std::string(op) + ": channel_input = " + std::to_string(ci) +
                 " must be a multiple of " + std::to_string(QM_K_ALIGN) + " and channel_output = " +
                 std::to_string(co) + " of " + std::to_string(QM_N_ALIGN));
  }
  if (kh < 1 || kw < 1 || sw < 1 || sh < 1 || height < kh || width < kw) {
    qmsim::fault(std::string(op) + ": no output for this filter and stride");
  }
  const long long ho = (height - kh) / sh + 1, wo = (width - kw) / sw + 1;
  const long long kc = 1LL * kh * kw * ci, in = 2LL * height * width * ci, out = 4LL * ho * wo * co;
  nram().check(src, in, op);
  wram().check(kernel, 2LL * co * kc, op);
  nram().check(dst, out, op);
  if (static_cast<const void*>(dst) == static_cast<const void*>(src)) {
    qmsim::fault(std::string(op) + ": dst and src can not be homologous operands");
  }
  const qmsim::Span filter = qmsim::span(kernel, 2LL * co * kc, "WRAM");
  if (partial != nullptr) {
    nram().check(partial, out, op);
    compute(dst, out, {nram_span(src, in), filter, nram_span(partial, out)});
  } else {
    compute(dst, out, {nram_span(src, in), filter});
  }
  std::vector<float> result(static_cast<std::size_t>(ho * wo * co));
  for (long long y = 0; y < ho; ++y) {
    for (long long x = 0; x < wo; ++x) {
      for (long long o = 0; o < co; ++o) {
        float acc = 0.0f;
        for (long long r = 0; r < kh; ++r) {
          for (long long c = 0; c < kw; ++c) {
            const half* pixel = src + ((y * sh + r) * width + x * sw + c) * ci;
            const long long tap = (r * kw + c) * ci;
            for (long long i = 0; i < ci; ++i)
              acc += static_cast<float>(pixel[i]) *
                     static_cast<float>(kernel[wram_index(o, tap + i, kc)]);
          }
        }
        const long long at = (y * wo + x) * co + o;
        result[static_cast<std::size_t>(at)] = partial != nullptr ? acc + partial[at] : acc;
      }
    }
  }
  std::copy(result.begin(), result.end(), dst);
  qmsim::charge(TFU, qmsim::ceil_div(ho * wo * co * kc, QM_MACS_PER_CYCLE));
}

}  // namespace bang

// half src and kernel, float dst, no bias (BANG header: supported on (m)tp_3xx).
inline void __bang_conv(float* dst, half* src, half* kernel, int channel_input, int height,
                        int width, int kernel_height, int kernel_width, int stride_width,
                        int stride_height, int channel_output) {
  bang::conv("__bang_conv", dst, src, kernel, nullptr, channel_input, height, width,
             kernel_height, kernel_width, stride_width, stride_height, channel_output);
}

// As __bang_conv, plus `partial` (same shape as dst; may be dst itself).
inline void __bang_conv_partial(float* dst, half* src, half* kernel, float* partial,
                                int channel_input, int height, int width, int kernel_height,
                                int kernel_width, int stride_width, int stride_height,
                                int channel_output) {
  bang::conv("__bang_conv_partial", dst, src, kernel, partial, channel_input, height, width,
             kernel_height, kernel_width, stride_width, stride_height, channel_output);
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

// dst = the n x (h w c) filter src (NHWC) in the layout __bang_conv reads from WRAM.
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
