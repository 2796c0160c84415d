        if (s == KT - 1)
          qm_bias(tc, bias + (bb % ${period}) * ${stride} + ${offset}, rows, cols, ${row});
