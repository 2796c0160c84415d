  __simd__ __local__ float lm_bias[${length}];
