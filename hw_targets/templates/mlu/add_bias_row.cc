      if (st.s == KT - 1)
        for (int r = 0; r < st.rows; ++r)
          __bang_add_scalar(acc + r * st.np, acc + r * st.np, bias_nram[st.lt % DEPTH][r], st.np);
