"""The records of a channel analysis: what a group slices, who reads it, the group."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ChannelConsumer", "ChannelGroup", "SlicedConstant"]


@dataclass(frozen=True)
class SlicedConstant:
    """A constant input of a node that loses the pruned channels.

    ``node`` reads it as input ``input_index``; ``tensor`` is where it is stored (the
    initializer, or the ``Constant`` node's output, behind any ``Identity`` chain);
    channel ``c`` of the group is index ``offset + c`` of ``axis``.
    """

    node: str
    input_index: int
    tensor: str
    axis: int
    offset: int = 0


@dataclass(frozen=True)
class ChannelConsumer:
    """A node whose weight reads the group's channels on its input side.

    ``activation`` is the tensor it reads (for calibration statistics); its channels
    ``[offset, offset + channels)`` are the group's (a ``Concat`` output is wider than
    one group: ``width`` is the consumer's whole input width). ``weight`` is the
    initializer (or stored constant) and ``axis`` the weight axis of input channels.
    """

    node: str
    op_type: str
    activation: str
    offset: int
    width: int
    weight: str
    axis: int


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that are pruned together; ``reason`` is None when the group is prunable.

    ``params_per_channel`` is the number of stored values removed with one channel:
    a producer's output slice, one value per sliced constant (biases, BatchNorm, depthwise
    taps, bias-``Add`` vectors) and a consumer's input slice.
    """

    name: str
    channels: int
    channel_axis: int
    producers: tuple[SlicedConstant, ...]
    sliced: tuple[SlicedConstant, ...]
    consumers: tuple[ChannelConsumer, ...]
    tensors: tuple[str, ...]
    reason: str | None = None
    params_per_channel: int = 0

    @property
    def operators(self) -> tuple[str, ...]:
        """Producer node names, then consumer node names, without repeats."""
        names = [p.node for p in self.producers] + [c.node for c in self.consumers]
        return tuple(dict.fromkeys(names))

    @property
    def prunable(self) -> bool:
        return self.reason is None
