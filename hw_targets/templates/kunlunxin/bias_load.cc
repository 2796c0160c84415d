    GM2LM_ASYNC(bias + (bb % ${period}) * ${stride}L + ${offset}, lm_bias, ${extent} * (int)sizeof(float));
