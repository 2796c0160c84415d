      if (st.s == 0)
        __memcpy_async(bias_nram[st.lt % DEPTH], bias + st.bias_off + st.ti * TM, st.rows * 4,
                       GDRAM2NRAM);
