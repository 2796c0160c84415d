/* ${name}: im2col of ${images}x${channels}x${height}x${width} (half) for a ${kh}x${kw} kernel, ${groups} group(s): cols[img][g] is K x (Ho*Wo) = ${k} x ${hw}.
   One row of cols per iteration, rows dealt round-robin to taskDim cores: gather the valid
   pixels of each output row into a zeroed NRAM row (GDRAM2NRAM on IO-DMA), store it, and
   zero the other row buffer for the next iteration (its store ended with the last
   iteration); a first iteration zeroes the first buffer. */
namespace ${name} {
constexpr int kTaskDim = ${tasks};
constexpr long C = ${channels}, H = ${height}, W = ${width}, HO = ${ho}, WO = ${wo};
constexpr long G = ${groups}, CPG = C / G, KH = ${kh}, KW = ${kw}, KR = CPG * KH * KW;
constexpr long ROWS = ${images} * G * KR, ROW_LEN = ${row_len};
constexpr long SH = ${sh}, SW = ${sw}, DH = ${dh}, DW = ${dw}, PT = ${top}, PL = ${left};

__nram__ int8_t nram_buffer[MAX_NRAM_SIZE];

__mlu_global__ void kernel(half* x, half* cols) {
  half* rows[2] = {(half*)nram_buffer, (half*)nram_buffer + ROW_LEN};
  if (taskId < ROWS) {
    __bang_write_zero(rows[0], ROW_LEN);
    __sync_compute();
  }
  for (long t = taskId, q = 0; t < ROWS; t += taskDim, ++q) {
    half* row = rows[q % 2];
    const long img = t / (G * KR), g = (t / KR) % G, r = t % KR;
    const long ch = g * CPG + r / (KH * KW), ki = (r / KW) % KH, kj = r % KW;
    const half* plane = x + (img * C + ch) * H * W;
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
    if (t + taskDim < ROWS) __bang_write_zero(rows[(q + 1) % 2], ROW_LEN);
    __sync_io();
    __sync_compute();
  }
}
}  // namespace ${name}
