    // bias[i * BASE_M + r] added to row r, read by the scalar unit.
    SetFlag<HardEvent::MTE2_S>(EVENT_ID0);
    WaitFlag<HardEvent::MTE2_S>(EVENT_ID0);
    UnaryRepeatParams up;
    for (int32_t r = 0; r < rows; ++r) {
      const float value = biasLocal.GetValue(r);
      for (int32_t c0 = 0; c0 < cols; c0 += ${vector_floats}) {
        const int32_t mask = cols - c0 < ${vector_floats} ? cols - c0 : ${vector_floats};
        Adds(yLocal[r * width + c0], cLocal[r * width + c0], value, mask, 1, up);
      }
    }
