    // bias[i * BASE_M + r] added to row r of every fractal column.
    LocalTensor<float> biasLocal = inQueueBias.AllocTensor<float>();
    DataCopyExtParams bp;
    bp.blockLen = rows * sizeof(float);
    DataCopyPad(biasLocal, biasGM[(bb % PBIAS) * SBIAS + i * BASE_M], bp,
                DataCopyPadExtParams<float>{});
    UnaryRepeatParams up;
    for (int32_t r = 0; r < rows; ++r) {
      const float value = biasLocal.GetValue(r);
      for (int32_t fj = 0; fj < nf; ++fj) {
        LocalTensor<float> row = c2Local[fj * mf * ${fractal} + r * ${edge}];
        Adds(row, row, value, ${edge}, 1, up);
      }
    }
    inQueueBias.FreeTensor(biasLocal);
