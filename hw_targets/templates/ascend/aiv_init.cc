
    biasGM.SetGlobalBuffer((__gm__ float*)bias, ${size_bias});
    pipe.InitBuffer(inQueueC, 1, BASE_M * ${row_floats} * sizeof(float));
    pipe.InitBuffer(inQueueBias, 1, ${bias_bytes});
    pipe.InitBuffer(outQueueY, 1, BASE_M * ${row_floats} * sizeof(float));
