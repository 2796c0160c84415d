/* ${name}: C[b] = A[b] @ B[b]${bias_note}, ${batch} x ${m}x${k}x${n} (A, B half; C float), BANG C.
   Tiles ${tm}x${tn} of C, k-chunks of ${tk}, dealt round-robin to taskDim = ${cores} cores.
   A step is (tile, k-chunk); iteration i of the pipeline loads step i (GDRAM2NRAM), moves
   the B chunk of step i-1 to WRAM (transposed: WRAM holds N lanes of K), multiplies step
   i-2 on the TFU into the fp32 accumulator, and stores the tile whose last step was i-3.
   NRAM: ${nram_used} of MAX_NRAM_SIZE bytes; WRAM: ${wram_used} bytes. */
namespace ${name} {
constexpr int kTaskDim = ${cores};
constexpr long M = ${m}, K = ${k}, N = ${n}, BATCH = ${batch};
constexpr long TM = ${tm}, TN = ${tn}, TK = ${tk};
constexpr long TKP = (TK + ${k_align_less}) / ${k_align} * ${k_align};
constexpr long TNP = (TN + ${n_align_less}) / ${n_align} * ${n_align};
constexpr long MT = (M + TM - 1) / TM, NT = (N + TN - 1) / TN, KT = (K + TK - 1) / TK;
constexpr long TILES = BATCH * MT * NT;
constexpr long A_SLOT = ${a_slot}, BIAS_SLOT = ${bias_slot};

__nram__ int8_t nram_buffer[MAX_NRAM_SIZE];
__wram__ int8_t wram_buffer[MAX_WRAM_SIZE];

struct Step {
  long lt, s, bb, ti, tj, bias_off;
  int rows, cols, kk, kp, np;
};

// Step j of this task: local tile j / KT (global tile taskId + lt * taskDim), chunk j % KT.
__mlu_func__ Step step(long j) {
  Step st;
  st.lt = j / KT;
  st.s = j % KT;
  const long t = taskId + st.lt * taskDim;
  st.bb = t / (MT * NT);
  st.ti = (t / NT) % MT;
  st.tj = t % NT;
  st.bias_off = (st.bb % ${pbias}) * ${sbias}L;
  st.rows = (int)(st.ti == MT - 1 ? M - st.ti * TM : TM);
  st.cols = (int)(st.tj == NT - 1 ? N - st.tj * TN : TN);
  st.kk = (int)(st.s == KT - 1 ? K - st.s * TK : TK);
  st.kp = (st.kk + ${k_align_less}) / ${k_align} * ${k_align};
  st.np = (st.cols + ${n_align_less}) / ${n_align} * ${n_align};
  return st;
}

__mlu_global__ void kernel(half* a, half* b, float* bias, float* c) {
  half* a_nram[3];
  for (int q = 0; q < 3; ++q) a_nram[q] = (half*)(nram_buffer + ${off_a}) + q * A_SLOT;
  half* b_stage[2] = {(half*)(nram_buffer + ${off_b_stage}),
                      (half*)(nram_buffer + ${off_b_stage}) + TKP * TNP};
  half* b_t = (half*)(nram_buffer + ${off_b_t});
  float* acc_nram[2] = {(float*)(nram_buffer + ${off_acc}),
                        (float*)(nram_buffer + ${off_acc}) + TM * TNP};
  float* part = (float*)(nram_buffer + ${off_part});
  float* bias_nram[3];
  for (int q = 0; q < 3; ++q)
    bias_nram[q] = (float*)(nram_buffer + ${off_bias}) + q * BIAS_SLOT;
  half* b_wram[2] = {(half*)wram_buffer, (half*)wram_buffer + TKP * TNP};

  const long tiles = taskId < TILES ? (TILES - taskId + taskDim - 1) / taskDim : 0;
  const long steps = tiles * KT;
  for (long i = 0; steps > 0 && i < steps + 3; ++i) {
    if (i < steps) {  // load step i
      const Step st = step(i);
      half* an = a_nram[i % 3];
      half* bn = b_stage[i % 2];
      if (st.kk < st.kp) {  // the TFU multiplies the padded K: zero it
        __bang_write_zero(an, (st.rows * st.kp + ${line_less}) / ${line} * ${line});
        __bang_write_zero(bn, st.kp * st.np);
      }
      __memcpy_async(an, a + (st.bb % ${pa}) * ${sa}L + st.ti * TM * K + st.s * TK,
                     st.kk * 2, GDRAM2NRAM, st.kp * 2, K * 2, st.rows - 1);
      __memcpy_async(bn, b + (st.bb % ${pb}) * ${sb}L + st.s * TK * N + st.tj * TN,
                     st.cols * 2, GDRAM2NRAM, st.np * 2, N * 2, st.kk - 1);
${load_bias}    }
    if (i >= 1 && i - 1 < steps) {  // right-hand matrix of step i-1 to WRAM
      const Step st = step(i - 1);
      __bang_transpose(b_t, b_stage[(i - 1) % 2], st.kp, st.np);
      __memcpy_async(b_wram[(i - 1) % 2], b_t, st.np * st.kp * 2, NRAM2WRAM);
    }
    if (i >= 2 && i - 2 < steps) {  // multiply step i-2
      const Step st = step(i - 2);
      float* acc = acc_nram[st.lt % 2];
      if (st.s == 0) {
        __bang_matmul(acc, a_nram[(i - 2) % 3], b_wram[(i - 2) % 2], st.rows, st.kp, st.np);
      } else {
        __bang_matmul(part, a_nram[(i - 2) % 3], b_wram[(i - 2) % 2], st.rows, st.kp, st.np);
        __bang_add(acc, acc, part, st.rows * st.np);
      }
${add_bias}    }
    if (i >= 3 && (i - 3) % KT == KT - 1) {  // store the tile whose last step was i-3
      const Step st = step(i - 3);
      __memcpy_async(c + (st.bb % ${pc}) * ${sc}L + st.ti * TM * N + st.tj * TN,
                     acc_nram[st.lt % 2], st.cols * 4, NRAM2GDRAM, N * 4, st.np * 4, st.rows - 1);
    }
    __sync_io();
    __sync_compute();
  }
}
}  // namespace ${name}
