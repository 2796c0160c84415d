__memcpy_async(row + oh * WO + ow0, plane + ih * W + iw0, (ow1 - ow0) * 2,
                     GDRAM2NRAM);
