/* ${name}: im2col of x ${images} x ${channels} x ${height} x ${width} (NCHW, fp16) for a ${kh} x ${kw} kernel, stride ${sh} x ${sw}, pads top/left ${top}/${left}, ${groups} group(s): cols[img][g] is ${k} x ${hw}.
   A vector (AIV-only) kernel: per (image, channel), DataCopyPad the plane GM -> UB, Gather the row of each of its ${taps} taps (offsets computed once by the
   scalar unit; taps in the padding read a zero slot) and DataCopyPad it UB -> GM. A fused Load3D (L1 -> L0A img2col in the cube) would avoid this GM round trip; it is not emitted. */
namespace ${name} {
using namespace AscendC;

constexpr int32_t IMAGES = ${images}, C = ${channels}, H = ${height}, W = ${width}, HO = ${ho}, WO = ${wo};
constexpr int32_t KH = ${kh}, KW = ${kw}, SH = ${sh}, SW = ${sw}, DH = ${dh}, DW = ${dw}, PT = ${top}, PL = ${left};
constexpr int32_t PLANE = ${plane}, ZERO = ${zero}, ROWS = KH * KW * HO * WO;

class KernelIm2col {
 public:
  __aicore__ inline void Init(GM_ADDR x, GM_ADDR cols) {
    xGM.SetGlobalBuffer((__gm__ half*)x, (int64_t)IMAGES * C * PLANE);
    colsGM.SetGlobalBuffer((__gm__ half*)cols, (int64_t)IMAGES * C * ROWS);
    pipe.InitBuffer(inQueueX, 2, ${x_bytes});
    pipe.InitBuffer(outQueueCols, 2, ${cols_bytes});
    pipe.InitBuffer(offsetBuf, ${offset_bytes});
    LocalTensor<uint32_t> offsets = offsetBuf.Get<uint32_t>();
    for (int32_t tap = 0; tap < KH * KW; ++tap) {
      for (int32_t oh = 0; oh < HO; ++oh) {
        for (int32_t ow = 0; ow < WO; ++ow) {
          const int32_t ih = oh * SH - PT + (tap / KW) * DH, iw = ow * SW - PL + (tap % KW) * DW;
          const bool inside = ih >= 0 && ih < H && iw >= 0 && iw < W;
          offsets.SetValue((tap * HO + oh) * WO + ow,
                           (inside ? ih * W + iw : ZERO) * sizeof(half));
        }
      }
    }
    SetFlag<HardEvent::S_V>(EVENT_ID0);  // the offsets, written by the scalar unit, before Gather
    WaitFlag<HardEvent::S_V>(EVENT_ID0);
  }

  __aicore__ inline void Process() {
    for (int32_t t = GetBlockIdx(); t < IMAGES * C; t += GetBlockNum()) {
      CopyIn(t);
      LocalTensor<half> xLocal = inQueueX.DeQue<half>();
      for (int32_t tap = 0; tap < KH * KW; ++tap) {
        Compute(xLocal, tap);
        CopyOut(t, tap);
      }
      inQueueX.FreeTensor(xLocal);
    }
  }

 private:
  __aicore__ inline void CopyIn(int32_t t) {
    LocalTensor<half> xLocal = inQueueX.AllocTensor<half>();
    DataCopyExtParams p;
    p.blockLen = PLANE * sizeof(half);
    DataCopyPad(xLocal, xGM[(int64_t)t * PLANE], p, DataCopyPadExtParams<half>{});
    Duplicate(xLocal[ZERO], (half)0, ${edge});
    inQueueX.EnQue(xLocal);
  }

  // The row of cols of one tap: HO * WO gathered values.
  __aicore__ inline void Compute(LocalTensor<half>& xLocal, int32_t tap) {
    LocalTensor<half> colsLocal = outQueueCols.AllocTensor<half>();
    Gather(colsLocal, xLocal, offsetBuf.Get<uint32_t>()[tap * HO * WO], 0, HO * WO);
    outQueueCols.EnQue(colsLocal);
  }

  // Channel t of image img is rows [ch_in_group * KH * KW, ...) of cols[img][group]: the
  // block at t * ROWS, the tap's row at tap * HO * WO in it.
  __aicore__ inline void CopyOut(int32_t t, int32_t tap) {
    LocalTensor<half> colsLocal = outQueueCols.DeQue<half>();
    DataCopyExtParams p;
    p.blockLen = HO * WO * sizeof(half);
    DataCopyPad(colsGM[(int64_t)t * ROWS + tap * HO * WO], colsLocal, p);
    outQueueCols.FreeTensor(colsLocal);
  }

  TPipe pipe;
  TQue<QuePosition::VECIN, 2> inQueueX;
  TQue<QuePosition::VECOUT, 2> outQueueCols;
  TBuf<TPosition::VECCALC> offsetBuf;
  GlobalTensor<half> xGM, colsGM;
};

extern "C" __global__ __aicore__ void ${name}_custom(GM_ADDR x, GM_ADDR cols) {
  KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_AIV_ONLY);
  KernelIm2col op;
  op.Init(x, cols);
  op.Process();
}
}  // namespace ${name}
