  if (steps > 0) {  // the TFU multiplies the padded K of step 0: zero it
    const Step st = step(0);
    __bang_write_zero(a_nram[0], (st.rows * st.kp + ${line_less}) / ${line} * ${line});
    __bang_write_zero(b_stage[0], st.kp * st.np);
    __sync_compute();
  }
