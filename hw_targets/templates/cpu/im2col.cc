/* ${name}: im2col of ${images}x${channels}x${height}x${width} for a ${kh}x${kw} kernel, ${groups} group(s): cols[img][g] is K x (Ho*Wo) = ${k} x ${hw}; one row per stage, rows dealt round-robin to the cores. */
namespace ${name} {
enum : long { C = ${channels}, H = ${height}, W = ${width}, HO = ${ho}, WO = ${wo},
              G = ${groups}, CPG = C / G, KH = ${kh}, KW = ${kw},
              KR = CPG * KH * KW, ROWS = ${images} * G * KR };

static void kernel(int core, int cores, const float* x, float* cols) {
  float* row = qm_local_alloc(HO * WO, "cols row");
  for (long t = core; t < ROWS; t += cores) {
    const long img = t / (G * KR), g = (t / KR) % G, r = t % KR;
    const long ch = g * CPG + r / (KH * KW);
    qm_im2col_row(row, x + (img * C + ch) * H * W, H, W, HO, WO, (int)((r / KW) % KH),
                  (int)(r % KW), ${sh}, ${sw}, ${top}, ${left}, ${dh}, ${dw});
    qm_store(cols + t * HO * WO, row, 1, HO * WO, HO * WO);
    qm_end_stage();
  }
}
}  // namespace ${name}
