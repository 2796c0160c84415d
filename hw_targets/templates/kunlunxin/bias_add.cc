        for (int v = 0; v < cols; v += VH)
          for (int r = 0; r < rows; ++r)
            for (int h = 0; h < VH; h += VF) {
              float* cr = lm_c + r * TN32 + v + h;
              const float32x16_t acc = vload_lm_float32x16(cr);
              vstore_lm_float32x16(cr, ${operand});
            }
