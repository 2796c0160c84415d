    biasGM.SetGlobalBuffer((__gm__ float*)bias, ${size_bias});
    biasGM.SetL2Reuse(REUSE_BIAS);
    pipe.InitBuffer(inQueueBias, 1, ${bias_bytes});
