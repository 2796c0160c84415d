/* ${name}: C[b] = A[b] @ B[b]${plus_bias} (${batch} x ${m}x${k}x${n}), plain C, tiles ${tm}x${tn}x${tk}.
   Tiles are dealt round-robin to the cores; per k-step the next A and B tiles are loaded
   into the other half of a double buffer while the FMAs run on this one. */
namespace ${name} {
enum : long { M = ${m}, K = ${k}, N = ${n}, BATCH = ${batch},
              TM = ${tm}, TN = ${tn}, TK = ${tk},
              MT = (M + TM - 1) / TM, NT = (N + TN - 1) / TN, KT = (K + TK - 1) / TK };

static void kernel(int core, int cores, const float* a, const float* b, const float* bias,
                   float* c) {
  float* ta[2] = {qm_local_alloc(TM * TK, "A tile 0"), qm_local_alloc(TM * TK, "A tile 1")};
  float* tb[2] = {qm_local_alloc(TK * TN, "B tile 0"), qm_local_alloc(TK * TN, "B tile 1")};
  float* tc = qm_local_alloc(TM * TN, "C tile");
  for (long t = core; t < BATCH * MT * NT; t += cores) {
    const long bb = t / (MT * NT), i = (t / NT) % MT, j = t % NT;
    const int rows = (int)(i == MT - 1 ? M - i * TM : TM);
    const int cols = (int)(j == NT - 1 ? N - j * TN : TN);
    const float* ga = a + (bb % ${pa}) * ${sa}L + i * TM * K;
    const float* gb = b + (bb % ${pb}) * ${sb}L + j * TN;
    float* gc = c + (bb % ${pc}) * ${sc}L + i * TM * N + j * TN;
    qm_zero(tc, rows * cols);
    for (long s = 0; s < KT; ++s) {
      const int kk = (int)(s == KT - 1 ? K - s * TK : TK);
      qm_load(ta[s % 2], ga + s * TK, rows, kk, K);
      qm_load(tb[s % 2], gb + s * TK * N, kk, cols, N);
      qm_fma(tc, ta[s % 2], tb[s % 2], rows, cols, kk);${bias}
      if (s == KT - 1) qm_store(gc, tc, rows, cols, N);
      qm_end_stage();
    }
  }
}
}  // namespace ${name}
