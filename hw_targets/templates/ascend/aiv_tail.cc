
      if ASCEND_IS_AIV {
        AddBias(pending);
      }
