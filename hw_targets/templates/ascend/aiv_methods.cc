
  // AIV: tile t of C (in GM once the AIC's Fixpipe is done) plus the bias, through UB.
  __aicore__ inline void AddBias(int32_t t) {
    const int32_t bb = t / (MT * NT), i = (t / NT) % MT, j = t % NT;
    const int32_t rows = i == MT - 1 ? M - i * BASE_M : BASE_M;
    const int32_t cols = j == NT - 1 ? N - j * BASE_N : BASE_N;
    const int32_t width = (cols + ${block_floats_less}) / ${block_floats} * ${block_floats};  // UB row: whole ${block}-byte blocks
    const int64_t at = (bb % PC) * SC + (int64_t)i * BASE_M * N + j * BASE_N;
    CrossCoreWaitFlag(0);
    LocalTensor<float> cLocal = inQueueC.AllocTensor<float>();
    DataCopyExtParams cp;
    cp.blockCount = rows;
    cp.blockLen = cols * sizeof(float);
    cp.srcStride = (N - cols) * sizeof(float);
    DataCopyPad(cLocal, cGM[at], cp, DataCopyPadExtParams<float>{});
    inQueueC.EnQue(cLocal);
    LocalTensor<float> biasLocal = inQueueBias.AllocTensor<float>();
    DataCopyExtParams bp;
    bp.blockLen = ${bias_len} * sizeof(float);
    DataCopyPad(biasLocal, biasGM[(bb % PBIAS) * SBIAS + ${bias_offset}], bp,
                DataCopyPadExtParams<float>{});
    inQueueBias.EnQue(biasLocal);
    cLocal = inQueueC.DeQue<float>();
    biasLocal = inQueueBias.DeQue<float>();
    LocalTensor<float> yLocal = outQueueY.AllocTensor<float>();
${bias_add}    outQueueY.EnQue(yLocal);
    inQueueC.FreeTensor(cLocal);
    inQueueBias.FreeTensor(biasLocal);
    yLocal = outQueueY.DeQue<float>();
    DataCopyExtParams op;
    op.blockCount = rows;
    op.blockLen = cols * sizeof(float);
    op.dstStride = (N - cols) * sizeof(float);
    DataCopyPad(cGM[at], yLocal, op);
    outQueueY.FreeTensor(yLocal);
  }
