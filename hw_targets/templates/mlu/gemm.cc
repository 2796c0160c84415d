/* ${name}: C[b] = A[b] @ B[b]${bias_note}, ${batch} x ${m}x${k}x${n} (A, B half; C float), BANG C for one MLU370 chip.
   Tiles ${tm}x${tn} of C, k-chunks of ${tk}; tiles in column-major order (i fastest), each of
   taskDim = ${cores} cores taking a contiguous run of them. ${residency}
   A step is (tile, k-chunk); iteration i of the software pipeline loads step i
   (GDRAM2NRAM), lays the B chunk of step i-1 out for WRAM (__bang_transpose to N x K, then
   __bang_reshape_filter), moves the chunk of step i-2 NRAM2WRAM, multiplies step i-3 on the
   TFU into the fp32 accumulator (a 1x1 convolution of the rows x K chunk, height 1 and
   width rows: __bang_conv on a tile's first chunk, __bang_conv_partial adding to the
   accumulator on the others), stores the tile whose last step was i-4, and zeroes the
   padding of step i+1's slots (their last reader ran earlier in this iteration); then
   __sync_io, __sync_move and __sync_compute.${zero_note}
   NRAM: ${nram_used} of MAX_NRAM_SIZE bytes; WRAM: ${wram_used} bytes. */
namespace ${name} {
constexpr int kTaskDim = ${cores};
constexpr long M = ${m}, K = ${k}, N = ${n}, BATCH = ${batch};
constexpr long TM = ${tm}, TN = ${tn}, TK = ${tk};
constexpr long TKP = (TK + ${k_align_less}) / ${k_align} * ${k_align};
constexpr long TNP = (TN + ${n_align_less}) / ${n_align} * ${n_align};
constexpr long MT = (M + TM - 1) / TM, NT = (N + TN - 1) / TN, KT = (K + TK - 1) / TK;
constexpr long TILES = BATCH * MT * NT, PER_CORE = (TILES + kTaskDim - 1) / kTaskDim;
constexpr bool RESIDENT = ${resident};  // a column's whole B panel stays in WRAM
constexpr long A_SLOT = ${a_slot}, BIAS_SLOT = ${bias_slot};
constexpr int DEPTH = ${depth};  // iterations from a step's load to its multiply, plus one

__nram__ int8_t nram_buffer[MAX_NRAM_SIZE];
__wram__ int8_t wram_buffer[MAX_WRAM_SIZE];

struct Step {
  long lt, s, bb, ti, tj, bias_off;
  int rows, cols, kk, kp, np;
  bool load_b;  // this step brings its B chunk to WRAM (else it is there from the tile before)
  long wslot;   // the B chunk's WRAM slot
};

// Step j of this task: local tile j / KT (global tile taskId * PER_CORE + lt), chunk j % KT.
__mlu_func__ Step step(long j) {
  Step st;
  st.lt = j / KT;
  st.s = j % KT;
  const long first = taskId * PER_CORE, t = first + st.lt, col = t / MT;
  st.bb = t / (MT * NT);
  st.ti = t % MT;
  st.tj = col % NT;
  st.load_b = !RESIDENT || st.lt == 0 || col != (t - 1) / MT;
  st.wslot = RESIDENT ? (col - first / MT) % 2 * KT + st.s : j % 2;
  st.bias_off = (st.bb % ${pbias}) * ${sbias}L;
  st.rows = (int)(st.ti == MT - 1 ? M - st.ti * TM : TM);
  st.cols = (int)(st.tj == NT - 1 ? N - st.tj * TN : TN);
  st.kk = (int)(st.s == KT - 1 ? K - st.s * TK : TK);
  st.kp = (st.kk + ${k_align_less}) / ${k_align} * ${k_align};
  st.np = (st.cols + ${n_align_less}) / ${n_align} * ${n_align};
  return st;
}

__mlu_global__ void kernel(half* a, half* b, float* bias, float* c) {
  half* a_nram[DEPTH];
  for (int q = 0; q < DEPTH; ++q) a_nram[q] = (half*)(nram_buffer + ${off_a}) + q * A_SLOT;
  half* b_stage[2] = {(half*)(nram_buffer + ${off_b_stage}),
                      (half*)(nram_buffer + ${off_b_stage}) + TKP * TNP};
  half* b_t = (half*)(nram_buffer + ${off_b_t});
  half* b_r[2] = {(half*)(nram_buffer + ${off_b_r}), (half*)(nram_buffer + ${off_b_r}) + TKP * TNP};
  float* acc_nram[2] = {(float*)(nram_buffer + ${off_acc}),
                        (float*)(nram_buffer + ${off_acc}) + TM * TNP};
  float* bias_nram[DEPTH];
  for (int q = 0; q < DEPTH; ++q)
    bias_nram[q] = (float*)(nram_buffer + ${off_bias}) + q * BIAS_SLOT;
  half* b_wram = (half*)wram_buffer;  // slots of TKP x TNP

  const long left = TILES - taskId * PER_CORE;
  const long tiles = left <= 0 ? 0 : (left < PER_CORE ? left : PER_CORE);
  const long steps = tiles * KT;
${zero_first}  for (long i = 0; steps > 0 && i < steps + DEPTH; ++i) {
    if (i < steps) {  // load step i
      const Step st = step(i);
      __memcpy_async(a_nram[i % DEPTH], a + (st.bb % ${pa}) * ${sa}L + st.ti * TM * K + st.s * TK,
                     st.kk * 2, GDRAM2NRAM, st.kp * 2, K * 2, st.rows - 1);
      if (st.load_b)
        __memcpy_async(b_stage[i % 2], b + (st.bb % ${pb}) * ${sb}L + st.s * TK * N + st.tj * TN,
                       st.cols * 2, GDRAM2NRAM, st.np * 2, N * 2, st.kk - 1);
${load_bias}    }
    if (i >= 1 && i - 1 < steps && step(i - 1).load_b) {  // the B chunk of step i-1 in WRAM's layout
      const Step st = step(i - 1);
      __bang_transpose(b_t, b_stage[(i - 1) % 2], st.kp, st.np);
      __bang_reshape_filter(b_r[(i - 1) % 2], b_t, st.np, 1, 1, st.kp);
    }
    if (i >= 2 && i - 2 < steps && step(i - 2).load_b) {  // to WRAM
      const Step st = step(i - 2);
      __memcpy_async(b_wram + st.wslot * TKP * TNP, b_r[(i - 2) % 2], st.np * st.kp * 2,
                     NRAM2WRAM);
    }
    if (i >= 3 && i - 3 < steps) {  // multiply step i-3
      const Step st = step(i - 3);
      float* acc = acc_nram[st.lt % 2];
      if (st.s == 0) {  // ci = kp, height 1, width rows, 1x1 filter, stride 1, co = np
        __bang_conv(acc, a_nram[(i - 3) % DEPTH], b_wram + st.wslot * TKP * TNP, st.kp, 1,
                    st.rows, 1, 1, 1, 1, st.np);
      } else {
        __bang_conv_partial(acc, a_nram[(i - 3) % DEPTH], b_wram + st.wslot * TKP * TNP, acc,
                            st.kp, 1, st.rows, 1, 1, 1, 1, st.np);
      }
${add_bias}    }
    if (i >= 4 && (i - 4) % KT == KT - 1) {  // store the tile whose last step was i-4
      const Step st = step(i - 4);
      __memcpy_async(c + (st.bb % ${pc}) * ${sc}L + st.ti * TM * N + st.tj * TN,
                     acc_nram[st.lt % 2], st.cols * 4, NRAM2GDRAM, N * 4, st.np * 4, st.rows - 1);
    }
    if (i + 1 < steps) {  // the padding of step i+1's slots
      const Step st = step(i + 1);
      if (st.kk < st.kp) {
        __bang_write_zero(a_nram[(i + 1) % DEPTH], (st.rows * st.kp + ${line_less}) / ${line} * ${line});
        if (st.load_b) __bang_write_zero(b_stage[(i + 1) % 2], st.kp * st.np);
      }
    }
    __sync_io();
    __sync_move();
    __sync_compute();
  }
}
}  // namespace ${name}
