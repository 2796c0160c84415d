  __local__ float lm_bias[${length}];
