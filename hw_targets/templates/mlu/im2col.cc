/* ${name}: im2col of ${images}x${channels}x${height}x${width} (half) for a ${kh}x${kw} kernel, ${groups} group(s): cols[img][g] is K x (Ho*Wo) = ${k} x ${hw}.
   One row of cols per iteration, rows dealt round-robin to taskDim cores: zero the row in
   NRAM, gather the valid pixels of each output row (GDRAM2NRAM on IO-DMA), store it. */
namespace ${name} {
constexpr int kTaskDim = ${tasks};
constexpr long C = ${channels}, H = ${height}, W = ${width}, HO = ${ho}, WO = ${wo};
constexpr long G = ${groups}, CPG = C / G, KH = ${kh}, KW = ${kw}, KR = CPG * KH * KW;
constexpr long ROWS = ${images} * G * KR, ROW_LEN = ${row_len};
constexpr long SH = ${sh}, SW = ${sw}, DH = ${dh}, DW = ${dw}, PT = ${top}, PL = ${left};

__nram__ int8_t nram_buffer[MAX_NRAM_SIZE];

__mlu_global__ void kernel(half* x, half* cols) {
  half* row = (half*)nram_buffer;
  for (long t = taskId; t < ROWS; t += taskDim) {
    const long img = t / (G * KR), g = (t / KR) % G, q = t % KR;
    const long ch = g * CPG + q / (KH * KW), ki = (q / KW) % KH, kj = q % KW;
    const half* plane = x + (img * C + ch) * H * W;
    __bang_write_zero(row, ROW_LEN);
    // output columns ow0 <= ow < ow1 read input columns inside the image
    long ow0 = 0, ow1 = WO;
    while (ow0 < WO && ow0 * SW - PL + kj * DW < 0) ++ow0;
    while (ow1 > ow0 && (ow1 - 1) * SW - PL + kj * DW >= W) --ow1;
    const long iw0 = ow0 * SW - PL + kj * DW;
    for (long oh = 0; oh < HO && ow1 > ow0; ++oh) {
      const long ih = oh * SH - PT + ki * DH;
      if (ih < 0 || ih >= H) continue;
      ${gather}
    }
    __memcpy_async(cols + t * HO * WO, row, HO * WO * 2, NRAM2GDRAM);
    __sync_io();
    __sync_compute();
  }
}
}  // namespace ${name}
