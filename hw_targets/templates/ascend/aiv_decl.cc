
  TQue<QuePosition::VECIN, 1> inQueueC;
  TQue<QuePosition::VECIN, 1> inQueueBias;
  TQue<QuePosition::VECOUT, 1> outQueueY;
