// qmsim.h: what every simulated target shares. Global memory that knows its arguments,
// on-chip arenas of declared sizes that check every access, and the cycle counters that
// the cost model predicts (hw_targets/base.py: a stage costs the max over its pipes; a
// core the sum of its stages; a kernel its slowest core).
//
// A simulated fault (an access outside an argument or past an on-chip buffer, or a race
// between asynchronous engines) prints one line starting "qmsim:" on stderr and exits with
// status 3.
//
// Asynchronous engines (qmsim::Tracker below). A copy queued on a DMA engine or an
// instruction of an asynchronous pipe is a *transfer*: the engine that runs it, the range
// it writes and the ranges it reads. The simulation performs it at once, but it is
// complete for another engine only once that engine has passed a synchronisation point
// that orders it after the transfer (happens-before, tracked with vector clocks). An
// engine that reads what a transfer in flight writes, or writes what it reads or writes,
// races with it: one line "qmsim: race: ..." naming the buffer and the two engines.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

namespace qmsim {

using half = _Float16;

[[noreturn]] inline void fault(const std::string& message) {
  std::fprintf(stderr, "qmsim: %s\n", message.c_str());
  std::exit(3);
}

// ---------------------------------------------------------------- global memory
struct Region {
  const unsigned char* base;
  std::size_t bytes;
  std::string name;
};

inline std::vector<Region>& gm_regions() {
  static std::vector<Region> regions;
  return regions;
}

// Checks that [p, p + bytes) lies inside one global-memory argument.
inline void gm_check(const void* p, std::size_t bytes, const char* op) {
  const auto* q = static_cast<const unsigned char*>(p);
  for (const Region& r : gm_regions()) {
    if (q >= r.base && q <= r.base + r.bytes) {
      if (q + bytes > r.base + r.bytes) {
        fault(std::string(op) + " runs past global argument '" + r.name + "' (" +
              std::to_string(q - r.base) + " + " + std::to_string(bytes) + " > " +
              std::to_string(r.bytes) + " bytes)");
      }
      return;
    }
  }
  fault(std::string(op) + " touches global memory outside every argument");
}

template <class T>
struct GlobalArg {
  std::string name;
  std::vector<T> data;
  GlobalArg(const char* n, std::size_t count) : name(n), data(std::max<std::size_t>(count, 1)) {
    gm_regions().push_back({reinterpret_cast<const unsigned char*>(data.data()),
                            count * sizeof(T), name});
  }
  T* ptr() { return data.data(); }
  // Reads float32 values from DIR/NAME.bin and converts them to T.
  void load(const std::string& dir) {
    std::string path = dir + "/" + name + ".bin";
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) fault("cannot open " + path);
    std::vector<float> tmp(data.size());
    std::size_t got = std::fread(tmp.data(), sizeof(float), tmp.size(), f);
    std::fclose(f);
    if (got != tmp.size()) fault("short input " + path);
    for (std::size_t i = 0; i < tmp.size(); ++i) data[i] = static_cast<T>(tmp[i]);
  }
  void store(const std::string& dir) const {
    std::string path = dir + "/" + name + ".out";
    FILE* f = std::fopen(path.c_str(), "wb");
    if (!f) fault("cannot write " + path);
    std::vector<float> tmp(data.begin(), data.end());
    std::fwrite(tmp.data(), sizeof(float), tmp.size(), f);
    std::fclose(f);
  }
};

// ---------------------------------------------------------------- on-chip memory
// An on-chip buffer of a declared size. Allocation past its capacity and any access
// outside it are faults; `reset` frees everything (one kernel's lifetime).
struct Arena {
  const char* name;
  std::size_t capacity;
  std::size_t align;
  std::vector<unsigned char> bytes;
  std::size_t used = 0;

  Arena(const char* n, std::size_t cap, std::size_t al) : name(n), capacity(cap), align(al),
                                                           bytes(cap) {}

  void* alloc(std::size_t size, const char* what) {
    std::size_t start = (used + align - 1) / align * align;
    if (start + size > capacity) {
      fault(std::string(what) + " needs " + std::to_string(size) + " bytes of " + name +
            " at offset " + std::to_string(start) + ", past its " + std::to_string(capacity) +
            " bytes");
    }
    used = start + size;
    return bytes.data() + start;
  }
  void reset() { used = 0; }
  bool contains(const void* p) const {
    const auto* q = static_cast<const unsigned char*>(p);
    return q >= bytes.data() && q <= bytes.data() + capacity;
  }
  // Checks that [p, p + size) lies inside the allocated part of this arena.
  void check(const void* p, std::size_t size, const char* op) const {
    const auto* q = static_cast<const unsigned char*>(p);
    if (!contains(p) || q + size > bytes.data() + used) {
      fault(std::string(op) + " overflows " + name + " (" +
            std::to_string(q - bytes.data()) + " + " + std::to_string(size) + " > " +
            std::to_string(used) + " allocated of " + std::to_string(capacity) + " bytes)");
    }
  }
};

// ---------------------------------------------------------------- asynchronous engines
// Which global argument (or "on-chip") a pointer lies in, for messages.
inline std::string region_name(const void* p) {
  const auto* q = static_cast<const unsigned char*>(p);
  for (const Region& r : gm_regions()) {
    if (q >= r.base && q < r.base + r.bytes) return "global '" + r.name + "'";
  }
  return "";
}

// `count` rows of [lo, hi) shifted by multiples of `pitch` bytes (a strided copy).
struct Span {
  const unsigned char* lo = nullptr;
  const unsigned char* hi = nullptr;
  std::string name;  // the buffer, as a message names it
  long long pitch = 0;
  long long count = 1;

  long long len() const { return hi - lo; }
  const unsigned char* end() const { return hi + (count - 1) * pitch; }
  // Whether row j of a strided span meets [a, b).
  bool meets(const unsigned char* a, const unsigned char* b) const {
    if (count == 1 || pitch <= 0) return lo < b && a < end();
    long long j = (a - lo - len()) / pitch;  // rows before j end at or before a
    for (j = std::max(0LL, j); j < count; ++j) {
      const unsigned char* r = lo + j * pitch;
      if (r >= b) return false;
      if (r + len() > a) return true;
    }
    return false;
  }
  bool overlaps(const Span& o) const {
    if (lo == hi || o.lo == o.hi || !(lo < o.end() && o.lo < end())) return false;
    const Span& few = count <= o.count ? *this : o;
    const Span& many = count <= o.count ? o : *this;
    for (long long k = 0; k < few.count; ++k) {
      const unsigned char* a = few.lo + k * few.pitch;
      if (many.meets(a, a + few.len())) return true;
    }
    return false;
  }
};

inline Span span(const void* p, std::size_t bytes, const std::string& name) {
  const auto* q = static_cast<const unsigned char*>(p);
  std::string where = region_name(p);
  return {q, q + bytes, where.empty() ? name : where};
}

// `count` rows of `bytes` bytes, `pitch` bytes apart.
inline Span strided(const void* p, std::size_t bytes, long long pitch, long long count,
                    const std::string& name) {
  Span s = span(p, bytes, name);
  s.pitch = pitch;
  s.count = std::max(1LL, count);
  return s;
}

struct Transfer {
  int engine;
  long long seq;  // the engine's clock when it was issued
  Span dst;
  std::vector<Span> srcs;
};

// Engines, their vector clocks, the transfers in flight and the pending signals.
struct Tracker {
  std::vector<std::string> names;
  std::vector<bool> scalar;  // engines not counted when deciding a transfer is done
  std::vector<std::vector<long long>> clock;
  std::vector<Transfer> flight;
  std::vector<std::pair<long long, std::vector<long long>>> signals;  // key -> clock snapshot
  long long issued = 0;

  int engine(const std::string& name, bool is_scalar = false) {
    for (std::size_t i = 0; i < names.size(); ++i)
      if (names[i] == name) return static_cast<int>(i);
    names.push_back(name);
    scalar.push_back(is_scalar);
    for (auto& c : clock) c.push_back(0);
    clock.emplace_back(names.size(), 0);
    return static_cast<int>(names.size() - 1);
  }
  bool done_for(const Transfer& t, int e) const {
    return t.engine == e || clock[e][t.engine] >= t.seq;
  }
  [[noreturn]] void race(const Transfer& t, int e, const std::string& buffer, const char* first,
                         const char* then) {
    fault("race: " + buffer + " " + first + " " + names[t.engine] + " is " + then + " " +
          names[e] + " before a synchronisation point orders them");
  }
  // Engine e accesses `dst` (written, may be empty) and `srcs` (read); a race with a
  // transfer in flight is a fault. With `async` the access is itself a transfer.
  void access(int e, const Span& dst, std::initializer_list<Span> srcs, bool async) {
    for (const Transfer& t : flight) {
      if (done_for(t, e)) continue;
      for (const Span& s : srcs)
        if (t.dst.overlaps(s)) race(t, e, t.dst.name, "written by", "read by");
      if (dst.lo != dst.hi) {
        if (t.dst.overlaps(dst)) race(t, e, dst.name, "written by", "written again by");
        for (const Span& s : t.srcs)
          if (s.overlaps(dst)) race(t, e, dst.name, "read by", "overwritten by");
      }
    }
    if (!async) return;
    long long seq = ++clock[e][e];
    // Consecutive writes of one engine to adjacent bytes coalesce (a scalar loop).
    if (!flight.empty() && srcs.size() == 0) {
      Transfer& last = flight.back();
      if (last.engine == e && last.srcs.empty() && last.dst.hi == dst.lo &&
          last.dst.count == 1 && dst.count == 1 && last.dst.name == dst.name) {
        last.dst.hi = dst.hi;
        last.seq = seq;
        return;
      }
    }
    flight.push_back({e, seq, dst, std::vector<Span>(srcs)});
  }
  // Engine `to` now sees everything engine `from` (and what `from` saw) had issued.
  void join(int to, const std::vector<long long>& seen) {
    for (std::size_t i = 0; i < seen.size(); ++i) clock[to][i] = std::max(clock[to][i], seen[i]);
    prune();
  }
  void order(int from, int to) { join(to, clock[from]); }
  // A signal of engine `from` under `key`; wait() by another engine joins it once.
  void signal(long long key, int from) { signals.emplace_back(key, clock[from]); }
  bool wait(long long key, int to) {
    for (std::size_t i = 0; i < signals.size(); ++i) {
      if (signals[i].first == key) {
        std::vector<long long> seen = signals[i].second;
        signals.erase(signals.begin() + static_cast<long>(i));
        join(to, seen);
        return true;
      }
    }
    return false;
  }
  // Every engine sees every transfer (a kernel's end, a full barrier).
  void drain() {
    flight.clear();
    signals.clear();
    for (std::size_t e = 0; e < names.size(); ++e)
      for (std::size_t i = 0; i < names.size(); ++i) clock[e][i] = clock[i][i];
  }
  void prune() {
    std::size_t kept = 0;
    for (std::size_t i = 0; i < flight.size(); ++i) {
      bool done = true;
      for (std::size_t e = 0; e < names.size() && done; ++e)
        done = scalar[e] || done_for(flight[i], static_cast<int>(e));
      if (!done) flight[kept++] = flight[i];
    }
    flight.resize(kept);
  }
  void reset() { *this = Tracker{}; }
};

inline Tracker& tracker() {
  static Tracker t;
  return t;
}

// ---------------------------------------------------------------- cycle counters
constexpr int kMaxPipes = 8;

struct Counters {
  const char* names[kMaxPipes] = {};
  int pipes = 0;
  long long stage[kMaxPipes] = {};
  long long core_pipe[kMaxPipes] = {};
  long long core_cycles = 0;
  long long core_stages = 0;
  // The slowest core so far.
  long long cycles = 0;
  long long stages = 0;
  long long pipe_total[kMaxPipes] = {};
};

inline Counters& counters() {
  static Counters c;
  return c;
}

inline void charge(int pipe, long long cycles) {
  Counters& c = counters();
  if (pipe < 0 || pipe >= c.pipes) fault("charge to an undeclared pipe");
  c.stage[pipe] += cycles;
  c.core_pipe[pipe] += cycles;
}

// Closes a stage: double-buffered pipes overlap, so it costs its slowest pipe.
inline void end_stage() {
  Counters& c = counters();
  long long worst = 0;
  bool any = false;
  for (int i = 0; i < c.pipes; ++i) {
    worst = std::max(worst, c.stage[i]);
    any = any || c.stage[i] != 0;
    c.stage[i] = 0;
  }
  if (any) {
    c.core_cycles += worst;
    c.core_stages += 1;
  }
}

inline void begin_kernel(std::initializer_list<const char*> pipe_names) {
  Counters& c = counters();
  c = Counters{};
  for (const char* n : pipe_names) c.names[c.pipes++] = n;
}

#ifndef QM_LAUNCH_CYCLES
#define QM_LAUNCH_CYCLES 0
#endif

// A core starts QM_LAUNCH_CYCLES after the kernel's launch: a stage of its own, charged to
// the first pipe.
inline void core_begin(int) {
  Counters& c = counters();
  c.core_cycles = 0;
  c.core_stages = 0;
  for (int i = 0; i < kMaxPipes; ++i) c.core_pipe[i] = c.stage[i] = 0;
  if (QM_LAUNCH_CYCLES > 0) {
    charge(0, QM_LAUNCH_CYCLES);
    end_stage();
  }
}

inline void core_end() {
  tracker().drain();  // a kernel's end waits for every engine
  end_stage();  // work charged after the last explicit stage end is a stage of its own
  Counters& c = counters();
  if (c.core_cycles > c.cycles || (c.core_cycles == c.cycles && c.stages == 0)) {
    c.cycles = c.core_cycles;
    c.stages = c.core_stages;
    for (int i = 0; i < kMaxPipes; ++i) c.pipe_total[i] = c.core_pipe[i];
  }
}

// One JSON object per kernel on stdout: {"kernel": ..., "cycles": ..., "stages": ...,
// "pipes": {...}} (the slowest core).
inline void report_kernel(const char* kernel) {
  Counters& c = counters();
  std::printf("{\"kernel\": \"%s\", \"cycles\": %lld, \"stages\": %lld, \"pipes\": {", kernel,
              c.cycles, c.stages);
  for (int i = 0; i < c.pipes; ++i) {
    std::printf("%s\"%s\": %lld", i ? ", " : "", c.names[i], c.pipe_total[i]);
  }
  std::printf("}}\n");
}

inline long long ceil_div(long long a, long long b) { return (a + b - 1) / b; }

}  // namespace qmsim
