/* ${name}: C[b] = A[b] @ B[b]${plus_bias} for b < ${batch}, M x K x N = ${m} x ${k} x ${n}; Ascend C for the Atlas A2 (910B) AI Core,
   ${kernel_type}. A, B fp16 in GM, C and bias fp32. baseM x baseN x baseK = ${tm} x ${tn} x ${tk}
   (${mt} x ${nt} tiles x ${kt} k-steps, on ${cores} cores round-robin).
   Cube (AIC), per k-step: DataCopy GM -> L1 (A1/B1, ND -> NZ in 16-row strips), one LoadData
   each L1 -> L0A zZ / L0B zN (A2/B2), Mmad into L0C (CO1); depth-2 queues double-buffer every level. A tile's C leaves
   L0C by Fixpipe (NZ -> ND into GM) in the first k-step of the core's next tile.${aiv_note} */
namespace ${name} {
using namespace AscendC;

constexpr int32_t M = ${m}, K = ${k}, N = ${n}, BATCH = ${batch};
constexpr int32_t BASE_M = ${tm}, BASE_N = ${tn}, BASE_K = ${tk};
constexpr int32_t MT = ${mt}, NT = ${nt}, KT = ${kt}, TILES = BATCH * MT * NT;
constexpr int64_t PA = ${pa}, SA = ${sa}, PB = ${pb}, SB = ${sb};
constexpr int64_t PC = ${pc}, SC = ${sc}, PBIAS = ${pbias}, SBIAS = ${sbias};
// Tiles that read each element of A, B and bias from L2 (for the launch; see the cost model).
constexpr uint32_t REUSE_A = ${reuse_a}, REUSE_B = ${reuse_b}, REUSE_BIAS = ${reuse_bias};

__aicore__ inline int32_t Fractals(int32_t x) { return (x + ${edge_less}) / ${edge}; }

class KernelMatmul {
 public:
  __aicore__ inline void Init(GM_ADDR a, GM_ADDR b, GM_ADDR bias, GM_ADDR c) {
    aGM.SetGlobalBuffer((__gm__ half*)a, ${size_a});
    bGM.SetGlobalBuffer((__gm__ half*)b, ${size_b});
    cGM.SetGlobalBuffer((__gm__ float*)c, ${size_c});
    pipe.InitBuffer(inQueueA1, 2, BASE_M * BASE_K * sizeof(half));
    pipe.InitBuffer(inQueueB1, 2, BASE_K * BASE_N * sizeof(half));
    pipe.InitBuffer(inQueueA2, 2, BASE_M * BASE_K * sizeof(half));
    pipe.InitBuffer(inQueueB2, 2, BASE_K * BASE_N * sizeof(half));
    pipe.InitBuffer(outQueueCO1, 2, BASE_M * BASE_N * sizeof(float));${aiv_init}
  }

  __aicore__ inline void Process() {
    int32_t pending = -1;  // the tile whose C waits in L0C
    for (int32_t t = GetBlockIdx(); t < TILES; t += GetBlockNum()) {
      const int32_t bb = t / (MT * NT), i = (t / NT) % MT, j = t % NT;
      const int32_t rows = i == MT - 1 ? M - i * BASE_M : BASE_M;
      const int32_t cols = j == NT - 1 ? N - j * BASE_N : BASE_N;
      LocalTensor<float> c1Local;
      if ASCEND_IS_AIC {
        c1Local = outQueueCO1.AllocTensor<float>();
      }
      for (int32_t s = 0; s < KT; ++s) {
        const int32_t kk = s == KT - 1 ? K - s * BASE_K : BASE_K;
        if ASCEND_IS_AIC {
          CopyIn(bb, i, j, s, rows, cols, kk);
          SplitA(rows, kk);
          SplitB(kk, cols);
          Compute(c1Local, rows, cols, kk, s == 0);
          if (pending >= 0 && s == 0) CopyOut(pending);  // the previous tile drains meanwhile
        }${aiv_call}
      }
      if ASCEND_IS_AIC {
        outQueueCO1.EnQue(c1Local);
      }
      pending = t;
    }
    if (pending >= 0) {
      if ASCEND_IS_AIC {
        CopyOut(pending);
      }${aiv_tail}
    }
  }

 private:
  __aicore__ inline void CopyIn(int32_t bb, int32_t i, int32_t j, int32_t s, int32_t rows,
                                int32_t cols, int32_t kk) {
    LocalTensor<half> a1Local = inQueueA1.AllocTensor<half>();
    LocalTensor<half> b1Local = inQueueB1.AllocTensor<half>();
    CopyStrips(a1Local, aGM[(bb % PA) * SA + (int64_t)i * BASE_M * K + s * BASE_K], rows, kk, K);
    CopyStrips(b1Local, bGM[(bb % PB) * SB + (int64_t)s * BASE_K * N + j * BASE_N], kk, cols, N);
    inQueueA1.EnQue(a1Local);
    inQueueB1.EnQue(b1Local);
  }

  // rows x cols of GM (row pitch `pitch`) into L1 as ${edge}-row strips, each an NZ matrix of
  // its own (Nd2NzParams ndNum): strip r's fractal c at (r * Fractals(cols) + c), so L1 holds
  // A as zZ and B as the fractal order of zN, and one LoadData moves a whole operand. The
  // strips go in one DataCopy when their GM stride fits srcNdMatrixStride (at most
  // ${max_nd_stride} elements), else one each; a partial last strip in a DataCopy of its own.
  __aicore__ inline void CopyStrips(const LocalTensor<half>& dst, const GlobalTensor<half>& src,
                                    int32_t rows, int32_t cols, int32_t pitch) {
    const int32_t full = rows / ${edge}, rest = rows % ${edge};
    const int32_t strip = Fractals(cols) * ${fractal};
    const int32_t per_call = (int64_t)${edge} * pitch <= ${max_nd_stride} ? full : 1;
    for (int32_t r = 0; r < full; r += per_call) {
      Nd2NzParams p;
      p.ndNum = per_call;
      p.nValue = ${edge};
      p.dValue = cols;
      p.srcNdMatrixStride = per_call > 1 ? ${edge} * pitch : 0;
      p.srcDValue = pitch;
      p.dstNzC0Stride = ${edge};
      p.dstNzNStride = 1;
      p.dstNzMatrixStride = per_call > 1 ? strip : 0;
      DataCopy(dst[r * strip], src[(int64_t)r * ${edge} * pitch], p);
    }
    if (rest > 0) {
      Nd2NzParams p;
      p.nValue = rest;
      p.dValue = cols;
      p.srcDValue = pitch;
      p.dstNzC0Stride = ${edge};
      DataCopy(dst[full * strip], src[(int64_t)full * ${edge} * pitch], p);
    }
  }

  // A: L1 zZ -> L0A zZ; B: L1 (k-strips, fractal order of zN) -> L0B zN, each fractal
  // transposed. One LoadData each.
  __aicore__ inline void SplitA(int32_t rows, int32_t kk) {
    LocalTensor<half> a1Local = inQueueA1.DeQue<half>();
    LocalTensor<half> a2Local = inQueueA2.AllocTensor<half>();
    Load2d(a2Local, a1Local, Fractals(rows) * Fractals(kk), false);
    inQueueA2.EnQue(a2Local);
    inQueueA1.FreeTensor(a1Local);
  }

  __aicore__ inline void SplitB(int32_t kk, int32_t cols) {
    LocalTensor<half> b1Local = inQueueB1.DeQue<half>();
    LocalTensor<half> b2Local = inQueueB2.AllocTensor<half>();
    Load2d(b2Local, b1Local, Fractals(kk) * Fractals(cols), true);
    inQueueB2.EnQue(b2Local);
    inQueueB1.FreeTensor(b1Local);
  }

  __aicore__ inline void Load2d(const LocalTensor<half>& dst, const LocalTensor<half>& src,
                                int32_t fractals, bool transpose) {
    LoadData2dParams p;
    p.startIndex = 0;
    p.repeatTimes = fractals;
    p.srcStride = 1;
    p.ifTranspose = transpose;
    LoadData(dst, src, p);
  }

  __aicore__ inline void Compute(LocalTensor<float>& c1Local, int32_t rows, int32_t cols,
                                 int32_t kk, bool first) {
    LocalTensor<half> a2Local = inQueueA2.DeQue<half>();
    LocalTensor<half> b2Local = inQueueB2.DeQue<half>();
    MmadParams p;
    p.m = rows;
    p.n = cols;
    p.k = kk;
    p.cmatrixInitVal = first;
    Mmad(c1Local, a2Local, b2Local, p);
    inQueueA2.FreeTensor(a2Local);
    inQueueB2.FreeTensor(b2Local);
  }

  // L0C -> GM: Fixpipe writes tile t row-major (NZ -> ND) into C.
  __aicore__ inline void CopyOut(int32_t t) {
    const int32_t bb = t / (MT * NT), i = (t / NT) % MT, j = t % NT;
    const int32_t rows = i == MT - 1 ? M - i * BASE_M : BASE_M;
    const int32_t cols = j == NT - 1 ? N - j * BASE_N : BASE_N;
    LocalTensor<float> c1Local = outQueueCO1.DeQue<float>();
    FixpipeParamsV220 fp;
    fp.nSize = cols;
    fp.mSize = rows;
    fp.srcStride = Fractals(rows) * ${edge};
    fp.dstStride = N;
    fp.ndNum = 1;
    Fixpipe<float, float, CFG_ROW_MAJOR>(cGM[(bb % PC) * SC + (int64_t)i * BASE_M * N + j * BASE_N],
                                         c1Local, fp);
    outQueueCO1.FreeTensor(c1Local);${fix_signal}
  }
${aiv_methods}
  TPipe pipe;
  TQue<QuePosition::A1, 2> inQueueA1;
  TQue<QuePosition::B1, 2> inQueueB1;
  TQue<QuePosition::A2, 2> inQueueA2;
  TQue<QuePosition::B2, 2> inQueueB2;
  TQue<QuePosition::CO1, 2> outQueueCO1;${aiv_decl}
  GlobalTensor<half> aGM, bGM;
  GlobalTensor<float> biasGM, cGM;
};

extern "C" __global__ __aicore__ void ${name}_custom(GM_ADDR a, GM_ADDR b, GM_ADDR bias,
                                                   GM_ADDR c) {
  KERNEL_TASK_TYPE_DEFAULT(${kernel_type});
  KernelMatmul op;
  op.Init(a, b, bias, c);
  op.Process();
}
}  // namespace ${name}
