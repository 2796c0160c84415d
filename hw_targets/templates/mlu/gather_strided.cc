__memcpy_async(row + oh * WO + ow0, plane + ih * W + iw0, 2, GDRAM2NRAM, 2,
                     SW * 2, ow1 - ow0 - 1);
