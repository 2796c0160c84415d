      if (st.s == KT - 1)
        __bang_cycle_add(acc, acc, bias_nram[st.lt % DEPTH], st.rows * st.np, st.np);
