    // bias[j * BASE_N + c] added to column c: one ${edge}-float row per repeat, bias repeated.
    LocalTensor<float> biasLocal = inQueueBias.AllocTensor<float>();
    DataCopyExtParams bp;
    bp.blockLen = cols * sizeof(float);
    DataCopyPad(biasLocal, biasGM[(bb % PBIAS) * SBIAS + j * BASE_N], bp,
                DataCopyPadExtParams<float>{});
    BinaryRepeatParams rp;
    rp.dstRepStride = ${row_blocks};
    rp.src0RepStride = ${row_blocks};
    rp.src1RepStride = 0;
    for (int32_t fj = 0; fj < nf; ++fj) {
      for (int32_t r0 = 0; r0 < rows; r0 += ${max_repeats}) {
        LocalTensor<float> part = c2Local[fj * mf * ${fractal} + r0 * ${edge}];
        Add(part, part, biasLocal[fj * ${edge}], ${edge}, (uint8_t)std::min(${max_repeats}, rows - r0), rp);
      }
    }
    inQueueBias.FreeTensor(biasLocal);
