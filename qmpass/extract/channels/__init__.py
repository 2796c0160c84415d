"""Coupled channel groups: the channel spaces that structured pruning can shrink (read-only).

Removing output channel ``c`` of a convolution is only an exact graph edit if every tensor
that carries channel ``c`` loses it too: the Relu after it, the other side of a residual
``Add``, the slice of a ``Concat`` it feeds, and the input channel ``c`` of every layer
that reads it. As in Torch-Pruning's dependency graph, such channels form one *group*
that is pruned atomically. Here the groups come from a union-find over the activation
tensors of the main graph, driven by one registered rule per op family
(:mod:`.rules`, shared with the Relax pruning of :mod:`qmpass.tvm.prune`):

* a *producer* (``Conv`` with ``group=1``, ``MatMul``/``Gemm`` with a constant right
  operand) starts a channel space at its output; its weight is sliced on its output axis;
* a *pass-through* op keeps the channel indexing, so its output joins its input's space:
  unary activations, ``BatchNormalization`` and depthwise ``Conv`` (their constants are
  sliced), pooling, elementwise ops with a constant (scalar, or one value per channel to
  slice), and elementwise ops of two activations, which *unite* two spaces (a residual
  ``Add`` makes both branches one group);
* a *consumer* (``Conv`` with ``group=1``, ``MatMul``/``Gemm`` with a constant right
  operand) reads the space; its weight is sliced on its input axis. A global pooling
  followed by ``Flatten`` (or ``Reshape`` to ``[N, C]``) moves the channels of an NCHW
  tensor to the last axis, so a classifier head is a consumer too;
* a ``Concat`` on the channel axis gives its output a space of its own in which input
  ``k`` occupies ``[offset_k, offset_k + C_k)``; the consumers of the output are
  consumers of every input's group at that offset.

Any other reader of a tensor of a space (``Reshape``, ``LayerNormalization``, a graph
output, a subgraph that captures it...), a space that no weight produces (the graph
input, the output of a ``LayerNormalization``), and weights that are shared or computed
*pin* the group: it is reported with the reason and is not pruned.

Weights may be initializers or ``Constant`` nodes, also behind ``Identity`` nodes (the
PyTorch exporter deduplicates equal tensors that way); anything computed pins.

The modules follow the data flow: :mod:`.walk` holds what the rules record on tensors
(over the union-find of :mod:`.unionfind`), :mod:`.rules` the registry of op rules,
:mod:`.resolve` the walk and the resolution into the :mod:`.records`.
"""

from __future__ import annotations

from qmpass.extract.channels.records import ChannelConsumer, ChannelGroup, SlicedConstant
from qmpass.extract.channels.resolve import channel_groups

__all__ = ["ChannelConsumer", "ChannelGroup", "SlicedConstant", "channel_groups"]
