/* ${name}: C[b] = A[b] @ B[b]${plus_bias} (${batch} x ${m}x${k}x${n}), fp16 in, fp32 out; XPU C/C++ for Kunlun 2
   (XPU2) cluster cores, launched <<<cluster_num, core_num>>>; tiles ${tm}x${tn}x${tk} (C tile in
   LM, A and B slices double-buffered), dealt round-robin over slots spread over the SIMD
   units (below). A tile starts with
   a stage that loads its first slices (and bias); stage s then issues the _ASYNC DMAs of
   slice s + 1 into the other buffers while the SIMD works on slice s, and ends with
   mfence() (the DMAs done). LM: ${lm_used} bytes. */
namespace ${name} {
enum : long { M = ${m}, K = ${k}, N = ${n}, BATCH = ${batch},
              TM = ${tm}, TN = ${tn}, TK = ${tk}, TN32 = ${tnp},
              VH = ${h_lanes}, VF = ${f_lanes},  /* fp16 / fp32 lanes of a vector */
              MT = (M + TM - 1) / TM, NT = (N + TN - 1) / TN, KT = (K + TK - 1) / TK,
              ACTIVE = ${active} /* cores with a tile */, LM_USED = ${lm_used},
              SHARERS = ${sharers} /* cores per SIMD unit */ };

// rows x width values from global memory (row stride gm_ld) into LM (row stride lm_ld).
static __device__ void gm2lm_2d(__global_ptr__ const float16* gm, long gm_ld, float16* lm,
                                long lm_ld, int rows, int width) {
  if (gm_ld == width && lm_ld == width) {
    GM2LM_ASYNC(gm, lm, rows * width * (int)sizeof(float16));
    return;
  }
  for (int r = 0; r < rows; ++r)
    GM2LM_ASYNC(gm + r * gm_ld, lm + r * lm_ld, width * (int)sizeof(float16));
}

static __device__ void lm2gm_2d(const float* lm, long lm_ld, __global_ptr__ float* gm,
                                long gm_ld, int rows, int width) {
  if (gm_ld == width && lm_ld == width) {
    LM2GM_ASYNC(lm, gm, rows * width * (int)sizeof(float));
    return;
  }
  for (int r = 0; r < rows; ++r)
    LM2GM_ASYNC(lm + r * lm_ld, gm + r * gm_ld, width * (int)sizeof(float));
}

__global__ void kernel(__global_ptr__ const float16* a, __global_ptr__ const float16* b,
                       __global_ptr__ const float* bias, __global_ptr__ float* c) {
  const int ncores = cluster_num() * core_num();
  const int cid = cluster_id() * core_num() + core_id();
  // Tile slots spread over the SIMD groups (SHARERS cores share one unit): core 4g + r takes
  // slot r * G + g (G = ncores / SHARERS groups), so a grid of fewer tiles than cores keeps
  // as few cores per unit busy as it can.
  const int slot = ncores % SHARERS == 0 ? cid % SHARERS * (ncores / SHARERS) + cid / SHARERS
                                         : cid;
  __local__ float16 lm_a[2][TM * TK];
  __simd__ __local__ float16 lm_b[2][TK * TN32];  // read by vector loads: __simd__ (guide §3.2.2)
  __simd__ __local__ float lm_c[TM * TN32];
${bias_alloc}  for (long t = slot; t < BATCH * MT * NT; t += ncores) {
    const long bb = t / (MT * NT), i = (t / NT) % MT, j = t % NT;
    const int rows = (int)(i == MT - 1 ? M - i * TM : TM);
    const int cols = (int)(j == NT - 1 ? N - j * TN : TN);
    __global_ptr__ const float16* ga = a + (bb % ${pa}) * ${sa}L + i * TM * K;
    __global_ptr__ const float16* gb = b + (bb % ${pb}) * ${sb}L + j * TN;
    __global_ptr__ float* gc = c + (bb % ${pc}) * ${sc}L + i * TM * N + j * TN;
    const int kk0 = (int)(KT == 1 ? K : TK);
    gm2lm_2d(ga, K, lm_a[0], TK, rows, kk0);
    gm2lm_2d(gb, N, lm_b[0], TN32, kk0, cols);
${bias_load}    mfence();
    for (long s = 0; s < KT; ++s) {
      const int kk = (int)(s == KT - 1 ? K - s * TK : TK);
      if (s + 1 < KT) {  // the next slices, into the other buffers
        const int kn = (int)(s + 2 == KT ? K - (s + 1) * TK : TK);
        gm2lm_2d(ga + (s + 1) * TK, K, lm_a[(s + 1) % 2], TK, rows, kn);
        gm2lm_2d(gb + (s + 1) * TK * N, N, lm_b[(s + 1) % 2], TN32, kn, cols);
      }
      const float16* la = lm_a[s % 2];
      float16* lb = lm_b[s % 2];
      for (int v = 0; v < cols; v += VH) {
        for (int p = 0; p < kk; ++p) {  // 32 fp16 of B (a bfloat16x32_t holds fp16), widened
          const bfloat16x32_t b_h = vload_lm_bfloat16x32(lb + p * TN32 + v);
          const float32x16_t b_lo = vfp162float_l(b_h), b_hi = vfp162float_h(b_h);
          for (int r = 0; r < rows; ++r) {
            float* cr = lm_c + r * TN32 + v;
            const float ar = (float)la[r * TK + p];
            if (s == 0 && p == 0) {  // the tile's first product initialises C
              vstore_lm_float32x16(cr, svmul_float32x16(ar, b_lo));
              vstore_lm_float32x16(cr + VF, svmul_float32x16(ar, b_hi));
            } else {
              vstore_lm_float32x16(cr, svmac_float32x16(ar, b_lo, vload_lm_float32x16(cr)));
              vstore_lm_float32x16(cr + VF,
                                   svmac_float32x16(ar, b_hi, vload_lm_float32x16(cr + VF)));
            }
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
