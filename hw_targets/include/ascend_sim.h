// ascend_sim.h: the meaning on the CPU of the Ascend C subset that hw_targets/ascend/
// emits for the Atlas A2 generation (Ascend 910B, dav-c220), with the cycles its cost
// model charges.
//
// One AI Core is simulated at a time (qmsim runs cores one after the other): its cube core
// (AIC: L1, L0A, L0B, L0C) and, in a MIX kernel (KERNEL_TYPE_MIX_AIC_1_1), its vector core
// (AIV: the Unified Buffer, UB). A MIX kernel is one source whose `if ASCEND_IS_AIC` and
// `if ASCEND_IS_AIV` parts run on the two cores; the simulation runs both parts in one pass,
// in the order the source gives (one legal interleaving), and the cross-core flags must
// order what the AIV reads after what the AIC writes. Memories are bounds-checked arenas of
// the declared sizes; TPipe::InitBuffer carves queue buffers out of them, so a tile that
// does not fit faults there, naming the memory; every access of an intrinsic is checked
// against its tensor and arena, every global access with qmsim::gm_check.
//
// Layouts (Ascend C `Mmad` doc): a fractal is E x E elements, E = QM_CUBE_EDGE = 16 (512 B
// of fp16). A tile in L1 is "NZ" (fractal columns one after the other, rows inside a
// fractal contiguous); A in L0A is "zZ" (fractals row-major, each row-major), B in L0B is
// "zN" (fractals row-major, each column-major), C in L0C is "NZ" in fp32. Partial fractals
// are zero-padded, and the cube computes whole fractals: padding to E is paid for. C leaves
// L0C through `Fixpipe` (NZ -> ND into GM).
//
// Pipes and what is charged to them (constants QM_* come from hw_targets/ascend/target.py):
//   MTE2      AIC: GM -> L1, bytes / QM_L2_RATE (reads are served by the chip's L2)
//   MTE1      L1 -> L0A/L0B: one fp16 fractal's bytes per fractal / QM_L1_TO_L0A_RATE or
//             QM_L1_TO_L0B_RATE
//   M         the cube: ceil(m/E) ceil(n/E) ceil(k/E) cycles per Mmad
//   FIX       Fixpipe L0C -> GM: the fp32 fractals read / QM_L0C_OUT_RATE
//   AIV-MTE2  AIV: GM -> UB, bytes / QM_L2_RATE
//   V         vector unit: QM_VECTOR_REPEAT_CYCLES per repeat (<= QM_VECTOR_BYTES)
//   MTE3      UB -> GM: bytes / QM_UB_TO_DDR_RATE
//   HBM       this core's share of the chip's HBM: bytes / (reuse x QM_HBM_CORE_RATE), where
//             `reuse` (set by the launch, qm_l2_reuse) is how many tiles read each element
//             of the argument from L2 after its one fetch from HBM.
// Every move (DataCopy, LoadData, Fixpipe, DataCopyPad) charges QM_DMA_ISSUE_CYCLES plus
// its whole transfer to its pipe(s); a CrossCoreWaitFlag charges QM_FLAG_CYCLES to V. A stage (one double-buffered
// iteration) ends where the next AllocTensor of a depth-2 input queue (A1, B1, VECIN)
// begins the next iteration, or where a finished C tile is handed over (EnQue on CO1). UB data moves in blocks of QM_UB_ALIGN (32) bytes:
// DataCopyPad pitches and vector strides count them.
//
// Synchronisation (qmsim::Tracker): each pipe of each core is an engine. A queue's EnQue
// signals from its producer pipe and DeQue waits in its consumer pipe (A1/B1: MTE2 -> MTE1,
// A2/B2: MTE1 -> M, CO1: M -> FIX, VECIN: MTE2 -> V, VECOUT: V -> MTE3); FreeTensor
// signals back and AllocTensor waits. SetFlag/WaitFlag<HardEvent::X_Y> order pipe X before
// pipe Y; CrossCoreSetFlag<2, pipe> / CrossCoreWaitFlag order the AIC's pipe before every
// pipe of the AIV (A2 blocks all of them). A read of what another pipe still writes, or a
// write of what it still reads, is a race (exit 3); a DeQue or wait that no EnQue or set
// precedes would hang the core and is reported as the race it guards.
#pragma once

#include <cstdint>
#include <deque>

#include "qmsim.h"

#define __global__
#define __aicore__
#define __gm__
#define ASCEND_IS_AIC (AscendC::qm_on(AscendC::AIC))
#define ASCEND_IS_AIV (AscendC::qm_on(AscendC::AIV))
#define KERNEL_TASK_TYPE_DEFAULT(type) AscendC::qm_kernel_type(type)

using GM_ADDR = std::uint8_t*;

namespace AscendC {

constexpr int kEdge = QM_CUBE_EDGE;               // elements along a fractal's side
constexpr int kFractal = kEdge * kEdge;           // elements of a fractal
constexpr long long kBlock = QM_UB_ALIGN;         // bytes of a UB block

using half = qmsim::half;

enum class TPosition { GM, A1, A2, B1, B2, CO1, CO2, VECIN, VECOUT, VECCALC };
using QuePosition = TPosition;

// The order of the names in begin_kernel (hw_targets/ascend/target.py PIPES).
enum Pipe {
  PIPE_MTE2 = 0, PIPE_MTE1 = 1, PIPE_M = 2, PIPE_FIX = 3, PIPE_AIV_MTE2 = 4, PIPE_V = 5,
  PIPE_MTE3 = 6, PIPE_HBM = 7, PIPE_S = 8
};

// ---------------------------------------------------------------- cores and engines
enum CoreType { AIC = 0, AIV = 1 };
enum KernelType { KERNEL_TYPE_AIC_ONLY, KERNEL_TYPE_AIV_ONLY, KERNEL_TYPE_MIX_AIC_1_1 };

inline CoreType& current_core() {
  static CoreType c = AIC;
  return c;
}

// `if ASCEND_IS_AIC` / `if ASCEND_IS_AIV`: the part that follows runs on that core.
inline bool qm_on(CoreType c) {
  current_core() = c;
  return true;
}

inline void qm_kernel_type(KernelType t) { current_core() = t == KERNEL_TYPE_AIV_ONLY ? AIV : AIC; }

// The engine of `pipe` on the running core (the AIC's GM -> L1 and the AIV's GM -> UB are
// different MTE2s).
inline int engine(Pipe pipe) {
  static const char* aic[] = {"MTE2", "MTE1", "M", "FIX", "MTE2", "V", "MTE3", "HBM", "S"};
  const bool aiv = current_core() == AIV;
  const std::string name = std::string(aiv ? "AIV " : "AIC ") + aic[pipe];
  return qmsim::tracker().engine(name, pipe == PIPE_S);
}

inline Pipe gm_in_pipe() { return current_core() == AIV ? PIPE_AIV_MTE2 : PIPE_MTE2; }

enum class HardEvent { MTE2_MTE1, MTE1_M, M_FIX, MTE2_V, V_MTE3, MTE2_S, S_V, S_MTE2, V_S, MTE3_S };
using event_t = int;
constexpr event_t EVENT_ID0 = 0, EVENT_ID1 = 1;

inline void event_pipes(HardEvent e, Pipe& from, Pipe& to) {
  static const Pipe table[][2] = {
      {PIPE_MTE2, PIPE_MTE1}, {PIPE_MTE1, PIPE_M}, {PIPE_M, PIPE_FIX}, {PIPE_MTE2, PIPE_V},
      {PIPE_V, PIPE_MTE3},    {PIPE_MTE2, PIPE_S}, {PIPE_S, PIPE_V},   {PIPE_S, PIPE_MTE2},
      {PIPE_V, PIPE_S},       {PIPE_MTE3, PIPE_S}};
  from = table[static_cast<int>(e)][0];
  to = table[static_cast<int>(e)][1];
  if (from == PIPE_MTE2) from = gm_in_pipe();
  if (to == PIPE_MTE2) to = gm_in_pipe();
}

inline long long flag_key(int kind, int a, int b, int id) {
  return ((static_cast<long long>(kind) * 64 + a) * 64 + b) * 64 + id;
}

[[noreturn]] inline void hang(const std::string& what, int from, int to) {
  const qmsim::Tracker& t = qmsim::tracker();
  qmsim::fault("race: " + what + " waits for a signal that never comes: nothing orders " +
               t.names[from] + " before " + t.names[to] + " (the core would hang)");
}

template <HardEvent E>
inline void SetFlag(event_t id) {
  Pipe from, to;
  event_pipes(E, from, to);
  qmsim::tracker().signal(flag_key(1, engine(from), engine(to), id), engine(from));
}

template <HardEvent E>
inline void WaitFlag(event_t id) {
  Pipe from, to;
  event_pipes(E, from, to);
  if (!qmsim::tracker().wait(flag_key(1, engine(from), engine(to), id), engine(to)))
    hang("WaitFlag", engine(from), engine(to));
}

// Mode 2: the AIC's `pipe` before every pipe of the AIV (or the reverse).
template <int MODE, Pipe PIPE>
inline void CrossCoreSetFlag(std::uint16_t flagId) {
  static_assert(MODE == 2, "only mode 2 (AIC <-> AIV of one AI Core) is simulated");
  qmsim::tracker().signal(flag_key(2, 0, 0, flagId), engine(PIPE));
}

// A2/A3: blocks every pipe of the waiting core until the flag is set.
inline void CrossCoreWaitFlag(std::uint16_t flagId) {
  const std::vector<Pipe> pipes = current_core() == AIV
      ? std::vector<Pipe>{PIPE_AIV_MTE2, PIPE_V, PIPE_MTE3, PIPE_S}
      : std::vector<Pipe>{PIPE_MTE2, PIPE_MTE1, PIPE_M, PIPE_FIX, PIPE_S};
  std::vector<long long> seen;
  for (const auto& entry : qmsim::tracker().signals)
    if (entry.first == flag_key(2, 0, 0, flagId)) seen = entry.second;
  if (!qmsim::tracker().wait(flag_key(2, 0, 0, flagId), engine(pipes[0])))
    hang("CrossCoreWaitFlag(" + std::to_string(flagId) + ")",
         qmsim::tracker().engine("AIC FIX"), engine(pipes[0]));
  for (Pipe p : pipes) qmsim::tracker().join(engine(p), seen);
  qmsim::charge(PIPE_V, QM_FLAG_CYCLES);  // the round trip through the flag's scheduler
}

// ---------------------------------------------------------------- on-chip memories
inline qmsim::Arena& l1() {
  static qmsim::Arena a("L1", QM_L1_BYTES, QM_L1_ALIGN);
  return a;
}
inline qmsim::Arena& l0a() {
  static qmsim::Arena a("L0A", QM_L0A_BYTES, QM_L0A_ALIGN);
  return a;
}
inline qmsim::Arena& l0b() {
  static qmsim::Arena a("L0B", QM_L0B_BYTES, QM_L0B_ALIGN);
  return a;
}
inline qmsim::Arena& l0c() {
  static qmsim::Arena a("L0C", QM_L0C_BYTES, QM_L0C_ALIGN);
  return a;
}
inline qmsim::Arena& ub() {
  static qmsim::Arena a("UB", QM_UB_BYTES, QM_UB_ALIGN);
  return a;
}

inline qmsim::Arena& arena_of(TPosition p) {
  switch (p) {
    case TPosition::A1:
    case TPosition::B1: return l1();
    case TPosition::A2: return l0a();
    case TPosition::B2: return l0b();
    case TPosition::CO1: return l0c();
    case TPosition::CO2:
    case TPosition::VECIN:
    case TPosition::VECOUT:
    case TPosition::VECCALC: return ub();
    default: qmsim::fault("no on-chip memory for that position");
  }
}

inline const char* position_name(TPosition p) {
  static const char* names[] = {"GM", "A1", "A2", "B1", "B2", "CO1", "CO2", "VECIN", "VECOUT",
                                "VECCALC"};
  return names[static_cast<int>(p)];
}

struct Block {
  int idx = 0;
  int num = 1;
};
inline Block& block() {
  static Block b;
  return b;
}

// Called by the launcher before each simulated core: a kernel's buffers live one core long.
inline void qm_begin_core(int idx, int num) {
  for (qmsim::Arena* a : {&l1(), &l0a(), &l0b(), &l0c(), &ub()}) a->reset();
  block() = {idx, num};
  current_core() = AIC;
}

// L2 reuse of a global argument (the launch sets it from the cost model; not a kernel call):
// tiles that read each element from L2 after its one fetch from HBM.
inline std::vector<std::pair<const void*, std::uint32_t>>& l2_reuse() {
  static std::vector<std::pair<const void*, std::uint32_t>> table;
  return table;
}

inline void qm_l2_reuse(const void* base, std::uint32_t reuse) {
  l2_reuse().emplace_back(base, reuse < 1 ? 1 : reuse);
}

inline std::uint32_t reuse_of(const void* base) {
  std::uint32_t found = 1;
  for (const auto& entry : l2_reuse())
    if (entry.first == base) found = entry.second;
  return found;
}

inline std::int64_t GetBlockIdx() { return block().idx; }
inline std::int64_t GetBlockNum() { return block().num; }

inline long long cdiv(long long a, long long b) { return qmsim::ceil_div(a, b); }

// ---------------------------------------------------------------- tensors
// Out of line: the fault paths of qmsim::Arena::check stay out of every intrinsic.
[[gnu::noinline]] inline void arena_check(TPosition pos, const void* p, std::size_t bytes,
                                          const char* op) {
  arena_of(pos).check(p, bytes, op);
}

[[noreturn, gnu::cold, gnu::noinline]] inline void overflow(const char* op, TPosition pos,
                                                            long long count, long long size) {
  qmsim::fault(std::string(op) + " overflows its " + position_name(pos) + " buffer in " +
               arena_of(pos).name + " (" + std::to_string(count) + " > " +
               std::to_string(size) + " elements)");
}

template <class T>
struct LocalTensor {
  T* data = nullptr;
  std::uint32_t size = 0;  // elements from data to the end of its buffer
  TPosition pos = TPosition::VECCALC;

  LocalTensor operator[](std::uint32_t offset) const {
    if (offset > size) overflow("LocalTensor[]", pos, offset, size);
    return {data + offset, size - offset, pos};
  }
  // [0, count) must lie inside this tensor's buffer and its arena's allocated part.
  void check(long long count, const char* op) const {
    if (count < 0 || count > static_cast<long long>(size)) overflow(op, pos, count, size);
    arena_check(pos, data, sizeof(T) * count, op);
  }
  qmsim::Span bytes(long long first, long long count) const {
    return qmsim::span(data + first, sizeof(T) * count, arena_of(pos).name);
  }
  // The scalar unit reads or writes one element (S is in order with itself only).
  T GetValue(std::uint32_t i) const {
    check(i + 1, "GetValue");
    qmsim::tracker().access(engine(PIPE_S), {}, {bytes(i, 1)}, false);
    return data[i];
  }
  void SetValue(std::uint32_t i, T v) {
    check(i + 1, "SetValue");
    qmsim::tracker().access(engine(PIPE_S), bytes(i, 1), {}, true);
    data[i] = v;
  }
  template <class U>
  LocalTensor<U> ReinterpretCast() const {
    return {reinterpret_cast<U*>(data), static_cast<std::uint32_t>(size * sizeof(T) / sizeof(U)),
            pos};
  }
};

template <class T>
struct GlobalTensor {
  T* base = nullptr;
  std::uint64_t size = 0;
  std::uint32_t reuse = 1;

  void SetGlobalBuffer(__gm__ T* p, std::uint64_t n) {
    base = p;
    size = n;
    reuse = reuse_of(p);
  }
  GlobalTensor operator[](std::uint64_t offset) const {
    GlobalTensor g = *this;
    g.base = base + offset;
    g.size = offset <= size ? size - offset : 0;
    return g;
  }
};

inline void charge_gm_read(long long bytes, std::uint32_t reuse) {
  qmsim::charge(gm_in_pipe(), QM_DMA_ISSUE_CYCLES + cdiv(bytes, QM_L2_RATE));
  qmsim::charge(PIPE_HBM, cdiv(bytes, static_cast<long long>(reuse) * QM_HBM_CORE_RATE));
}

inline void charge_gm_write(long long bytes) {
  qmsim::charge(PIPE_MTE3, QM_DMA_ISSUE_CYCLES + cdiv(bytes, QM_UB_TO_DDR_RATE));
  qmsim::charge(PIPE_HBM, cdiv(bytes, QM_HBM_CORE_RATE));
}

// ---------------------------------------------------------------- queues
// A queue owns `depth` equal buffers in the memory of its position; depth 2 is double
// buffering. AllocTensor takes a free buffer, EnQue/DeQue pass it on in order, FreeTensor
// gives it back; each hand-over is a signal between the producer and consumer pipes.
inline void queue_pipes(TPosition p, Pipe& producer, Pipe& consumer) {
  switch (p) {
    case TPosition::A1:
    case TPosition::B1: producer = PIPE_MTE2; consumer = PIPE_MTE1; return;
    case TPosition::A2:
    case TPosition::B2: producer = PIPE_MTE1; consumer = PIPE_M; return;
    case TPosition::CO1: producer = PIPE_M; consumer = PIPE_FIX; return;
    case TPosition::VECIN: producer = PIPE_AIV_MTE2; consumer = PIPE_V; return;
    case TPosition::VECOUT: producer = PIPE_V; consumer = PIPE_MTE3; return;
    default: qmsim::fault(std::string("no queue at position ") + position_name(p));
  }
}

template <TPosition P, int DEPTH>
struct TQue {
  static constexpr TPosition position = P;
  std::vector<unsigned char*> slots;
  std::vector<bool> busy;
  std::deque<unsigned char*> queued;
  std::uint32_t len = 0;

  static long long key(const void* slot, int kind) {
    return (static_cast<long long>(reinterpret_cast<std::uintptr_t>(slot)) << 2) | kind;
  }
  template <class T>
  LocalTensor<T> AllocTensor() {
    Pipe producer, consumer;
    queue_pipes(P, producer, consumer);
    // A double-buffered input queue's next buffer begins the next pipeline iteration.
    if (DEPTH == 2 && (P == TPosition::A1 || P == TPosition::B1 || P == TPosition::VECIN))
      qmsim::end_stage();
    for (std::size_t i = 0; i < slots.size(); ++i) {
      if (!busy[i]) {
        busy[i] = true;
        qmsim::tracker().wait(key(slots[i], 1), engine(producer));  // its FreeTensor, if any
        return {reinterpret_cast<T*>(slots[i]), static_cast<std::uint32_t>(len / sizeof(T)), P};
      }
    }
    qmsim::fault(std::string("AllocTensor: every buffer of a ") + position_name(P) +
                 " queue is in use");
  }
  template <class T>
  void EnQue(const LocalTensor<T>& t) {
    Pipe producer, consumer;
    queue_pipes(P, producer, consumer);
    queued.push_back(reinterpret_cast<unsigned char*>(t.data));
    qmsim::tracker().signal(key(t.data, 0), engine(producer));
    if (P == TPosition::CO1) qmsim::end_stage();  // a finished C tile ends the k-step
  }
  template <class T>
  LocalTensor<T> DeQue() {
    Pipe producer, consumer;
    queue_pipes(P, producer, consumer);
    if (queued.empty()) {
      hang(std::string("DeQue of the ") + position_name(P) + " queue", engine(producer),
           engine(consumer));
    }
    unsigned char* p = queued.front();
    queued.pop_front();
    qmsim::tracker().wait(key(p, 0), engine(consumer));
    return {reinterpret_cast<T*>(p), static_cast<std::uint32_t>(len / sizeof(T)), P};
  }
  template <class T>
  void FreeTensor(LocalTensor<T>& t) {
    Pipe producer, consumer;
    queue_pipes(P, producer, consumer);
    for (unsigned char* q : queued) {
      if (q == reinterpret_cast<unsigned char*>(t.data)) {  // EnQue'd, never DeQue'd
        const qmsim::Tracker& tr = qmsim::tracker();
        qmsim::fault(std::string("race: a ") + position_name(P) +
                     " buffer is freed while still queued (no DeQue): nothing ordered " +
                     tr.names[engine(producer)] + " before " + tr.names[engine(consumer)]);
      }
    }
    for (std::size_t i = 0; i < slots.size(); ++i) {
      if (slots[i] == reinterpret_cast<unsigned char*>(t.data)) {
        busy[i] = false;
        qmsim::tracker().signal(key(slots[i], 1), engine(consumer));
      }
    }
  }
};

template <TPosition P>
struct TBuf {
  static constexpr TPosition position = P;
  unsigned char* data = nullptr;
  std::uint32_t len = 0;
  template <class T>
  LocalTensor<T> Get() {
    return {reinterpret_cast<T*>(data), static_cast<std::uint32_t>(len / sizeof(T)), P};
  }
};

struct TPipe {
  template <TPosition P, int DEPTH>
  void InitBuffer(TQue<P, DEPTH>& que, int num, std::uint32_t len) {
    std::string what = std::string("TPipe::InitBuffer(") + position_name(P) + " queue, " +
                       std::to_string(num) + " x " + std::to_string(len) + " B)";
    que.len = len;
    for (int i = 0; i < num; ++i) {
      que.slots.push_back(static_cast<unsigned char*>(arena_of(P).alloc(len, what.c_str())));
      que.busy.push_back(false);
    }
  }
  template <TPosition P>
  void InitBuffer(TBuf<P>& buf, std::uint32_t len) {
    std::string what = std::string("TPipe::InitBuffer(") + position_name(P) + " buffer, " +
                       std::to_string(len) + " B)";
    buf.len = len;
    buf.data = static_cast<unsigned char*>(arena_of(P).alloc(len, what.c_str()));
  }
};

// An asynchronous instruction of `pipe` on the running core.
inline void track(Pipe pipe, const qmsim::Span& dst, std::initializer_list<qmsim::Span> srcs) {
  qmsim::tracker().access(engine(pipe), dst, srcs, true);
}

// ---------------------------------------------------------------- MTE2: GM -> L1 (ND -> NZ)
struct Nd2NzParams {
  std::uint16_t ndNum = 1;
  std::uint16_t nValue = 0;             // rows
  std::uint16_t dValue = 0;             // columns
  std::uint16_t srcNdMatrixStride = 0;
  std::uint16_t srcDValue = 0;          // row pitch of the source, elements
  std::uint16_t dstNzC0Stride = 0;      // rows of the NZ tile (a multiple of kEdge)
  std::uint16_t dstNzNStride = 1;
  std::uint16_t dstNzMatrixStride = 0;
};

// ndNum ND matrices of nValue x dValue (matrix i at src + i * srcNdMatrixStride, row pitch
// srcDValue) into NZ matrices at dst + i * dstNzMatrixStride: column block c of a matrix at
// c * dstNzC0Stride rows of kEdge, row r of a block at r * dstNzNStride rows (C0_SIZE units:
// one row of kEdge halves). Rows up to dstNzC0Stride and columns up to kEdge are zeroed.
inline void DataCopy(const LocalTensor<half>& dst, const GlobalTensor<half>& src,
                     const Nd2NzParams& p) {
  const int rows = p.nValue, cols = p.dValue, rp = p.dstNzC0Stride, ns = p.dstNzNStride;
  if (p.ndNum == 0 || rows == 0 || cols == 0) return;  // a NOP, as documented
  if (rp < (rows - 1) * ns + 1 || ns < 1) qmsim::fault("DataCopy Nd2Nz: dstNzC0Stride must hold nValue rows of dstNzNStride");
  if (p.ndNum > 1 && p.dstNzMatrixStride == 0) qmsim::fault("DataCopy Nd2Nz: dstNzMatrixStride 0 overwrites the first matrix");
  const long long cb = cdiv(cols, kEdge), block = static_cast<long long>(rp) * kEdge;
  const long long matrix = cb * block;
  for (int m = 0; m < p.ndNum; ++m) {
    const long long at = static_cast<long long>(m) * p.dstNzMatrixStride;
    const half* base = src.base + static_cast<long long>(m) * p.srcNdMatrixStride;
    dst.check(at + matrix, "DataCopy(Nd2Nz)");
    track(gm_in_pipe(), dst.bytes(at, matrix),
          {qmsim::strided(base, sizeof(half) * cols, sizeof(half) * p.srcDValue, rows, "GM")});
    std::memset(dst.data + at, 0, sizeof(half) * matrix);
    for (int r = 0; r < rows; ++r) {
      const half* row = base + static_cast<long long>(r) * p.srcDValue;
      qmsim::gm_check(row, sizeof(half) * cols, "DataCopy(Nd2Nz)");
      for (int c = 0; c < cols; ++c)
        dst.data[at + (c / kEdge) * block + static_cast<long long>(r) * ns * kEdge + c % kEdge] = row[c];
    }
  }
  charge_gm_read(static_cast<long long>(sizeof(half)) * p.ndNum * rows * cols, src.reuse);
}

// ---------------------------------------------------------------- MTE1: L1 -> L0A/L0B
struct LoadData2dParams {
  std::uint16_t startIndex = 0;  // first source fractal
  std::uint8_t repeatTimes = 1;  // fractals moved
  std::uint16_t srcStride = 1;   // fractals between consecutive source fractals
  std::uint8_t sid = 0;
  std::uint16_t dstGap = 0;      // fractals skipped between consecutive destination fractals
  bool ifTranspose = false;      // transpose each fractal (NZ -> zN for B)
};

inline void LoadData(const LocalTensor<half>& dst, const LocalTensor<half>& src,
                     const LoadData2dParams& p) {
  if (dst.pos != TPosition::A2 && dst.pos != TPosition::B2) qmsim::fault("LoadData: destination is not L0A/L0B");
  const long long last_src = (p.startIndex + static_cast<long long>(p.repeatTimes - 1) * p.srcStride + 1) * kFractal;
  const long long last_dst = (static_cast<long long>(p.repeatTimes - 1) * (1 + p.dstGap) + 1) * kFractal;
  src.check(last_src, "LoadData source");
  dst.check(last_dst, "LoadData destination");
  track(PIPE_MTE1, dst.bytes(0, last_dst), {src.bytes(0, last_src)});
  for (int r = 0; r < p.repeatTimes; ++r) {
    const half* s = src.data + (p.startIndex + static_cast<long long>(r) * p.srcStride) * kFractal;
    half* d = dst.data + static_cast<long long>(r) * (1 + p.dstGap) * kFractal;
    for (int i = 0; i < kEdge; ++i)
      for (int j = 0; j < kEdge; ++j)
        d[i * kEdge + j] = p.ifTranspose ? s[j * kEdge + i] : s[i * kEdge + j];
  }
  const int rate = dst.pos == TPosition::A2 ? QM_L1_TO_L0A_RATE : QM_L1_TO_L0B_RATE;
  qmsim::charge(PIPE_MTE1, QM_DMA_ISSUE_CYCLES +
                               cdiv(static_cast<long long>(sizeof(half)) * kFractal * p.repeatTimes, rate));
}

// ---------------------------------------------------------------- M: the cube
struct MmadParams {
  std::uint16_t m = 0;
  std::uint16_t n = 0;
  std::uint16_t k = 0;
  bool isBias = false;
  bool cmatrixInitVal = true;  // C = A B (true) or C += A B (false)
};

// c (L0C, NZ fp32) (+)= a (L0A, zZ fp16) @ b (L0B, zN fp16), whole E x E x E fractals.
inline void Mmad(const LocalTensor<float>& c, const LocalTensor<half>& a,
                 const LocalTensor<half>& b, const MmadParams& p) {
  if (a.pos != TPosition::A2 || b.pos != TPosition::B2 || c.pos != TPosition::CO1)
    qmsim::fault("Mmad needs A in L0A, B in L0B and C in L0C");
  const long long mf = cdiv(p.m, kEdge), nf = cdiv(p.n, kEdge), kf = cdiv(p.k, kEdge);
  a.check(mf * kf * kFractal, "Mmad A");
  b.check(kf * nf * kFractal, "Mmad B");
  c.check(mf * nf * kFractal, "Mmad C");
  track(PIPE_M, c.bytes(0, mf * nf * kFractal),
        {a.bytes(0, mf * kf * kFractal), b.bytes(0, kf * nf * kFractal)});
  if (p.cmatrixInitVal) std::memset(c.data, 0, sizeof(float) * mf * nf * kFractal);
  for (long long fi = 0; fi < mf; ++fi) {
    for (long long fj = 0; fj < nf; ++fj) {
      float* cf = c.data + (fj * mf + fi) * kFractal;
      for (long long fk = 0; fk < kf; ++fk) {
        const half* af = a.data + (fi * kf + fk) * kFractal;
        const half* bf = b.data + (fk * nf + fj) * kFractal;
        for (int i = 0; i < kEdge; ++i)
          for (int kk = 0; kk < kEdge; ++kk) {
            const float av = static_cast<float>(af[i * kEdge + kk]);
            for (int j = 0; j < kEdge; ++j)
              cf[i * kEdge + j] += av * static_cast<float>(bf[j * kEdge + kk]);
          }
      }
    }
  }
  qmsim::charge(PIPE_M, mf * nf * kf);
}

// ---------------------------------------------------------------- FIX: L0C -> GM
struct FixpipeParamsV220 {
  std::uint16_t nSize = 0;      // columns written
  std::uint16_t mSize = 0;      // rows written
  std::uint16_t srcStride = 0;  // rows of the NZ tile in L0C (a multiple of the cube edge)
  std::uint32_t dstStride = 0;  // ND: elements from one row of dst to the next
  std::uint16_t ndNum = 1;
  std::uint16_t srcNdStride = 0;
  std::uint16_t dstNdStride = 0;
  bool reluEn = false;
  std::uint8_t unitFlag = 0;
};
enum class CO2Layout { NZ, ROW_MAJOR, COLUMN_MAJOR };
struct FixpipeConfig {
  CO2Layout format;
};
constexpr FixpipeConfig CFG_ROW_MAJOR = {CO2Layout::ROW_MAJOR};

// dst (GM, ND, row pitch dstStride) = src (L0C, NZ fp32, srcStride rows), mSize x nSize.
template <class T, class U, const FixpipeConfig& CONFIG>
inline void Fixpipe(const GlobalTensor<T>& dst, const LocalTensor<U>& src,
                    const FixpipeParamsV220& p) {
  static_assert(CONFIG.format == CO2Layout::ROW_MAJOR, "only NZ -> ND is simulated");
  if (src.pos != TPosition::CO1) qmsim::fault("Fixpipe: source is not L0C");
  const long long rows = p.mSize, cols = p.nSize, rp = p.srcStride;
  if (rp % kEdge != 0 || rp < rows) qmsim::fault("Fixpipe: srcStride must be a multiple of the cube edge >= mSize");
  const long long nf = cdiv(cols, kEdge);
  src.check(rp * nf * kEdge, "Fixpipe source");
  track(PIPE_FIX,
        qmsim::strided(dst.base, sizeof(T) * cols, sizeof(T) * p.dstStride, rows, "GM"),
        {src.bytes(0, rp * nf * kEdge)});
  for (long long r = 0; r < rows; ++r) {
    T* row = dst.base + r * p.dstStride;
    qmsim::gm_check(row, sizeof(T) * cols, "Fixpipe");
    for (long long c = 0; c < cols; ++c)
      row[c] = static_cast<T>(src.data[(c / kEdge) * rp * kEdge + r * kEdge + c % kEdge]);
  }
  qmsim::charge(PIPE_FIX, QM_DMA_ISSUE_CYCLES +
                              cdiv(static_cast<long long>(sizeof(U)) * kFractal * cdiv(rows, kEdge) * nf,
                               QM_L0C_OUT_RATE));
  qmsim::charge(PIPE_HBM, cdiv(static_cast<long long>(sizeof(T)) * rows * cols, QM_HBM_CORE_RATE));
}

// ---------------------------------------------------------------- V: vector ops
struct BinaryRepeatParams {
  std::uint8_t dstBlkStride = 1, src0BlkStride = 1, src1BlkStride = 1;
  std::uint8_t dstRepStride = 8, src0RepStride = 8, src1RepStride = 8;
};
struct UnaryRepeatParams {
  std::uint16_t blockNumber = 8;
  std::uint8_t dstBlkStride = 1, srcBlkStride = 1;
  std::uint8_t dstRepStride = 8, srcRepStride = 8;
};

// Element e of repeat r of an operand with the given strides (in UB blocks).
template <class T>
inline long long vec_index(int r, int e, int blk_stride, int rep_stride) {
  constexpr int per_block = kBlock / sizeof(T);
  return (static_cast<long long>(r) * rep_stride + (e / per_block) * blk_stride) * per_block +
         e % per_block;
}

// dst = src0 + src1 on the first `mask` elements of each of `repeatTimes` repeats.
template <class T>
inline void Add(const LocalTensor<T>& dst, const LocalTensor<T>& src0, const LocalTensor<T>& src1,
                std::uint64_t mask, std::uint8_t repeatTimes, const BinaryRepeatParams& p) {
  if (mask > QM_VECTOR_BYTES / sizeof(T)) qmsim::fault("Add: mask wider than one repeat");
  long long hi_d = 0, hi_0 = 0, hi_1 = 0;  // extents touched (elements), for the tracker
  for (int r = 0; r < repeatTimes; ++r) {
    for (int e = 0; e < static_cast<int>(mask); ++e) {
      const long long d = vec_index<T>(r, e, p.dstBlkStride, p.dstRepStride);
      const long long s0 = vec_index<T>(r, e, p.src0BlkStride, p.src0RepStride);
      const long long s1 = vec_index<T>(r, e, p.src1BlkStride, p.src1RepStride);
      dst.check(d + 1, "Add dst");
      src0.check(s0 + 1, "Add src0");
      src1.check(s1 + 1, "Add src1");
      dst.data[d] = src0.data[s0] + src1.data[s1];
      hi_d = std::max(hi_d, d + 1);
      hi_0 = std::max(hi_0, s0 + 1);
      hi_1 = std::max(hi_1, s1 + 1);
    }
  }
  track(PIPE_V, dst.bytes(0, hi_d), {src0.bytes(0, hi_0), src1.bytes(0, hi_1)});
  qmsim::charge(PIPE_V, static_cast<long long>(repeatTimes) * QM_VECTOR_REPEAT_CYCLES);
}

// dst = src + scalar on the first `mask` elements of each of `repeatTimes` repeats.
template <class T>
inline void Adds(const LocalTensor<T>& dst, const LocalTensor<T>& src, T scalar, std::uint64_t mask,
                 std::uint8_t repeatTimes, const UnaryRepeatParams& p) {
  if (mask > QM_VECTOR_BYTES / sizeof(T)) qmsim::fault("Adds: mask wider than one repeat");
  long long hi_d = 0, hi_s = 0;
  for (int r = 0; r < repeatTimes; ++r) {
    for (int e = 0; e < static_cast<int>(mask); ++e) {
      const long long d = vec_index<T>(r, e, p.dstBlkStride, p.dstRepStride);
      const long long s = vec_index<T>(r, e, p.srcBlkStride, p.srcRepStride);
      dst.check(d + 1, "Adds dst");
      src.check(s + 1, "Adds src");
      dst.data[d] = src.data[s] + scalar;
      hi_d = std::max(hi_d, d + 1);
      hi_s = std::max(hi_s, s + 1);
    }
  }
  track(PIPE_V, dst.bytes(0, hi_d), {src.bytes(0, hi_s)});
  qmsim::charge(PIPE_V, static_cast<long long>(repeatTimes) * QM_VECTOR_REPEAT_CYCLES);
}

// dst[0, count) = value.
template <class T>
inline void Duplicate(const LocalTensor<T>& dst, T value, std::int32_t count) {
  dst.check(count, "Duplicate");
  track(PIPE_V, dst.bytes(0, count), {});
  for (int i = 0; i < count; ++i) dst.data[i] = value;
  qmsim::charge(PIPE_V, cdiv(static_cast<long long>(sizeof(T)) * count, QM_VECTOR_BYTES) *
                            QM_VECTOR_REPEAT_CYCLES);
}

// dst[i] = src[(srcBaseAddr + srcOffset[i]) / sizeof(T)] (offsets in bytes).
template <class T>
inline void Gather(const LocalTensor<T>& dst, const LocalTensor<T>& src,
                   const LocalTensor<std::uint32_t>& srcOffset, std::uint32_t srcBaseAddr,
                   std::uint32_t count) {
  dst.check(count, "Gather dst");
  srcOffset.check(count, "Gather offsets");
  track(PIPE_V, dst.bytes(0, count), {srcOffset.bytes(0, count), src.bytes(0, src.size)});
  for (std::uint32_t i = 0; i < count; ++i) {
    const long long s = (srcBaseAddr + srcOffset.data[i]) / sizeof(T);
    src.check(s + 1, "Gather src");
    dst.data[i] = src.data[s];
  }
  qmsim::charge(PIPE_V, cdiv(static_cast<long long>(sizeof(T)) * count, QM_VECTOR_BYTES) *
                            QM_VECTOR_REPEAT_CYCLES);
}

// ---------------------------------------------------------------- GM <-> UB, any length
struct DataCopyExtParams {
  std::uint16_t blockCount = 1;
  std::uint32_t blockLen = 0;   // bytes per block
  std::uint32_t srcStride = 0;  // gap after each block: bytes in GM, UB blocks in UB
  std::uint32_t dstStride = 0;
  std::uint32_t rsv = 0;
};
template <class T>
struct DataCopyPadExtParams {
  bool isPad = false;
  std::uint8_t leftPadding = 0;
  std::uint8_t rightPadding = 0;
  T paddingValue = 0;
};

inline long long ub_pitch(const DataCopyExtParams& p, std::uint32_t gap_blocks) {
  return (cdiv(p.blockLen, kBlock) + gap_blocks) * kBlock;  // bytes from one UB block to the next
}

// GM -> UB (MTE2): blockCount blocks of blockLen bytes; UB blocks start kBlock-aligned.
template <class T>
inline void DataCopyPad(const LocalTensor<T>& dst, const GlobalTensor<T>& src,
                        const DataCopyExtParams& p, const DataCopyPadExtParams<T>&) {
  const long long pitch = ub_pitch(p, p.dstStride);
  dst.check((pitch * (p.blockCount - 1) + p.blockLen) / sizeof(T), "DataCopyPad(UB, GM)");
  track(gm_in_pipe(), qmsim::strided(dst.data, p.blockLen, pitch, p.blockCount, arena_of(dst.pos).name),
        {qmsim::strided(src.base, p.blockLen, p.blockLen + p.srcStride, p.blockCount, "GM")});
  const auto* s = reinterpret_cast<const unsigned char*>(src.base);
  auto* d = reinterpret_cast<unsigned char*>(dst.data);
  for (int i = 0; i < p.blockCount; ++i) {
    const unsigned char* row = s + static_cast<long long>(i) * (p.blockLen + p.srcStride);
    qmsim::gm_check(row, p.blockLen, "DataCopyPad(UB, GM)");
    std::memcpy(d + i * pitch, row, p.blockLen);
  }
  charge_gm_read(static_cast<long long>(p.blockCount) * p.blockLen, src.reuse);
}

// UB -> GM (MTE3).
template <class T>
inline void DataCopyPad(const GlobalTensor<T>& dst, const LocalTensor<T>& src,
                        const DataCopyExtParams& p) {
  const long long pitch = ub_pitch(p, p.srcStride);
  src.check((pitch * (p.blockCount - 1) + p.blockLen) / sizeof(T), "DataCopyPad(GM, UB)");
  track(PIPE_MTE3, qmsim::strided(dst.base, p.blockLen, p.blockLen + p.dstStride, p.blockCount, "GM"),
        {qmsim::strided(src.data, p.blockLen, pitch, p.blockCount, arena_of(src.pos).name)});
  auto* d = reinterpret_cast<unsigned char*>(dst.base);
  const auto* s = reinterpret_cast<const unsigned char*>(src.data);
  for (int i = 0; i < p.blockCount; ++i) {
    unsigned char* row = d + static_cast<long long>(i) * (p.blockLen + p.dstStride);
    qmsim::gm_check(row, p.blockLen, "DataCopyPad(GM, UB)");
    std::memcpy(row, s + i * pitch, p.blockLen);
  }
  charge_gm_write(static_cast<long long>(p.blockCount) * p.blockLen);
}

}  // namespace AscendC
