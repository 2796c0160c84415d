/* ${name}: C[b] = A[b] @ B[b]${plus_bias} (${batch} x ${m}x${k}x${n}), fp16 in, fp32 out; XPU C/C++ for the
   cluster cores, launched <<<cluster_num, core_num>>>; tiles ${tm}x${tn}x${tk} (C tile in
   LM, A and B slices double-buffered), dealt round-robin over all cores. Per k-step
   the _ASYNC DMAs of the next slices overlap the SIMD work on this one. */
namespace ${name} {
enum : long { M = ${m}, K = ${k}, N = ${n}, BATCH = ${batch},
              TM = ${tm}, TN = ${tn}, TK = ${tk}, TN32 = ${tnp},
              VH = ${h_lanes}, VF = ${f_lanes},  /* fp16 / fp32 lanes of a vector */
              MT = (M + TM - 1) / TM, NT = (N + TN - 1) / TN, KT = (K + TK - 1) / TK,
              ACTIVE = ${active} /* cores with a tile */ };

// rows x width values from global memory (row stride gm_ld) into LM (row stride lm_ld).
static __device__ void gm2lm_2d(const float16* gm, long gm_ld, __local__ float16* lm,
                                long lm_ld, int rows, int width) {
  if (gm_ld == width && lm_ld == width) {
    GM2LM_ASYNC(gm, lm, rows * width * (int)sizeof(float16));
    return;
  }
  for (int r = 0; r < rows; ++r)
    GM2LM_ASYNC(gm + r * gm_ld, lm + r * lm_ld, width * (int)sizeof(float16));
}

static __device__ void lm2gm_2d(__local__ const float* lm, long lm_ld, float* gm, long gm_ld,
                                int rows, int width) {
  if (gm_ld == width && lm_ld == width) {
    LM2GM_ASYNC(lm, gm, rows * width * (int)sizeof(float));
    return;
  }
  for (int r = 0; r < rows; ++r)
    LM2GM_ASYNC(lm + r * lm_ld, gm + r * gm_ld, width * (int)sizeof(float));
}

__global__ void kernel(const float16* a, const float16* b, const float* bias, float* c) {
  const int ncores = cluster_num() * core_num();
  const int cid = cluster_id() * core_num() + core_id();
  __local__ float16* lm_a[2] = {lm_malloc<float16>(TM * TK, "A slice 0"),
                                lm_malloc<float16>(TM * TK, "A slice 1")};
  __local__ float16* lm_b[2] = {lm_malloc<float16>(TK * TN32, "B slice 0"),
                                lm_malloc<float16>(TK * TN32, "B slice 1")};
  __local__ float* lm_c = lm_malloc<float>(TM * TN32, "C tile");
${bias_alloc}  for (long t = cid; t < BATCH * MT * NT; t += ncores) {
    const long bb = t / (MT * NT), i = (t / NT) % MT, j = t % NT;
    const int rows = (int)(i == MT - 1 ? M - i * TM : TM);
    const int cols = (int)(j == NT - 1 ? N - j * TN : TN);
    const float16* ga = a + (bb % ${pa}) * ${sa}L + i * TM * K;
    const float16* gb = b + (bb % ${pb}) * ${sb}L + j * TN;
    float* gc = c + (bb % ${pc}) * ${sc}L + i * TM * N + j * TN;
    for (int q = 0; q < TM * TN32; q += VF) vstore_lm_float32x16(lm_c + q, vset_zero());
    for (long s = 0; s < KT; ++s) {
      const int kk = (int)(s == KT - 1 ? K - s * TK : TK);
      const float16* la = lm_a[s % 2];
      const float16* lb = lm_b[s % 2];
      gm2lm_2d(ga + s * TK, K, lm_a[s % 2], TK, rows, kk);
      gm2lm_2d(gb + s * TK * N, N, lm_b[s % 2], TN32, kk, cols);
      for (int v = 0; v < cols; v += VH) {
        for (int p = 0; p < kk; ++p) {
          const float16x32_t bv = vload_lm_float16x32(lb + p * TN32 + v);
          const float32x16_t b_lo = vfp162float_l(bv), b_hi = vfp162float_h(bv);
          for (int r = 0; r < rows; ++r) {
            float* cr = lm_c + r * TN32 + v;
            const float ar = (float)la[r * TK + p];
            vstore_lm_float32x16(cr, svmac_float32x16(ar, b_lo, vload_lm_float32x16(cr)));
            vstore_lm_float32x16(cr + VF,
                                 svmac_float32x16(ar, b_hi, vload_lm_float32x16(cr + VF)));
          }
        }
      }
      if (s == KT - 1) {
${bias_add}        lm2gm_2d(lm_c, TN32, gc, N, rows, cols);
      }
      mfence();
    }
  }
}
}  // namespace ${name}
