/* ${name}: im2col of ${images}x${channels}x${height}x${width} (fp16) for a ${kh}x${kw} kernel, ${groups} group(s): cols[img][g] is K x (Ho*Wo) =
   ${k} x ${hw}. One cols row (channel, tap) at a time, rows dealt round-robin over all
   cores: GM2LM each input row the tap reads, gather in LM, LM2GM ${chunk} output row(s) at a
   time. Every copy is synchronous (nothing to overlap: the core only moves data). */
namespace ${name} {
enum : long { C = ${channels}, H = ${height}, W = ${width}, HO = ${ho}, WO = ${wo},
              G = ${groups}, CPG = C / G, KH = ${kh}, KW = ${kw}, SH = ${sh}, SW = ${sw},
              PT = ${top}, PL = ${left}, DH = ${dh}, DW = ${dw}, CHUNK = ${chunk},
              KR = CPG * KH * KW, ROWS = ${images} * G * KR,
              ACTIVE = ${active}, LM_USED = ${lm_used} };

__global__ void kernel(__global_ptr__ const float16* x, __global_ptr__ float16* cols) {
  const int ncores = cluster_num() * core_num();
  const int cid = cluster_id() * core_num() + core_id();
  __local__ float16 lm_in[${row}];
  __local__ float16 lm_out[CHUNK * WO];
  for (long t = cid; t < ROWS; t += ncores) {
    const long img = t / (G * KR), g = (t / KR) % G, r = t % KR;
    const long ch = g * CPG + r / (KH * KW);
    const int tap_h = (int)((r / KW) % KH), tap_w = (int)(r % KW);
    __global_ptr__ const float16* plane = x + (img * C + ch) * H * W;
    for (int oc = 0; oc < HO; oc += CHUNK) {
      const int n = (int)(HO - oc < CHUNK ? HO - oc : CHUNK);
      for (int oh = oc; oh < oc + n; ++oh) {
        float16* dst = lm_out + (oh - oc) * WO;
        const int ih = oh * SH - PT + tap_h * DH;
        if (ih < 0 || ih >= H) {
          for (int ow = 0; ow < WO; ++ow) dst[ow] = (float16)0;
          continue;
        }
        GM2LM(plane + ih * W, lm_in, W * (int)sizeof(float16));
        for (int ow = 0; ow < WO; ++ow) {
          const int iw = ow * SW - PL + tap_w * DW;
          dst[ow] = (iw >= 0 && iw < W) ? lm_in[iw] : (float16)0;
        }
      }
      LM2GM(lm_out, cols + t * HO * WO + oc * WO, n * WO * (int)sizeof(float16));
    }
  }
}
}  // namespace ${name}
