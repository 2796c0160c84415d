    // bias[j * BASE_N + c] added to column c: ${vector_floats} columns per repeat, one repeat per row.
    BinaryRepeatParams rp;
    rp.dstRepStride = width / ${block_floats};
    rp.src0RepStride = width / ${block_floats};
    rp.src1RepStride = 0;
    for (int32_t c0 = 0; c0 < cols; c0 += ${vector_floats}) {
      const int32_t mask = cols - c0 < ${vector_floats} ? cols - c0 : ${vector_floats};
      for (int32_t r0 = 0; r0 < rows; r0 += ${max_repeats}) {
        const int32_t repeats = rows - r0 < ${max_repeats} ? rows - r0 : ${max_repeats};
        Add(yLocal[r0 * width + c0], cLocal[r0 * width + c0], biasLocal[c0], mask,
            (uint8_t)repeats, rp);
      }
    }
