  __local__ float* lm_bias = lm_malloc<float>(${length}, "bias");
