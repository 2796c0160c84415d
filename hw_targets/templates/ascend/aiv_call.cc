
        if ASCEND_IS_AIV {
          if (pending >= 0 && s == 0) AddBias(pending);
        }
