
    CrossCoreSetFlag<2, PIPE_FIX>(0);  // tile t is in GM: the AIV may add the bias
