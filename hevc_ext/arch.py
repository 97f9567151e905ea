"""The network architecture of the paper (§3.1): shapes, pixel packing and complexity.

A network for ``L`` layers (odd, >= 3) and ``F`` filters alternates point-wise (1×1) and depth-wise
(3×3) convolutions, starting and ending with a point-wise one — for the default ``L = 5``:
``pw(Cin→F) · dw3×3(F) · pw(F→F) · dw3×3(F) · pw(F→Cout)``. ``Cin = Cout = PH·PW`` for luma and
``2·PH·PW`` for the concatenated chroma planes. Every layer but the last has a bias and a ReLU; the last
layer has neither (the residual is bias-free). Batch normalisation precedes every layer but the first
during training and is folded away before quantization, which gives every layer a bias.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

from .errors import UsageError


class Group(enum.Enum):
    """A channel group with its own network: luma, or the two chroma planes concatenated."""

    Y = 0
    UV = 1

    @property
    def planes(self) -> int:
        return 1 if self is Group.Y else 2

    @property
    def plane_indices(self) -> tuple[int, ...]:
        return (0,) if self is Group.Y else (1, 2)

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, order=True)
class Packing:
    """Pixel packing (Fig. 2): a PH×PW patch of samples becomes PH·PW channels."""

    ph: int = 1
    pw: int = 1

    def __post_init__(self) -> None:
        if self.ph not in (1, 2) or self.pw not in (1, 2):
            raise UsageError(f"pixel packing must be one of 1x1, 1x2, 2x1, 2x2, got {self.ph}x{self.pw}")

    @property
    def size(self) -> int:
        return self.ph * self.pw

    @property
    def index(self) -> int:
        """2-bit code used in the side stream: 0=1x1, 1=1x2, 2=2x1, 3=2x2."""
        return (self.ph - 1) * 2 + (self.pw - 1)

    @classmethod
    def from_index(cls, index: int) -> "Packing":
        return cls(index // 2 + 1, index % 2 + 1)

    @classmethod
    def parse(cls, text: str) -> "Packing":
        m = re.fullmatch(r"([12])x([12])", text.strip())
        if not m:
            raise UsageError(f"invalid packing {text!r}: expected 1x1, 1x2, 2x1 or 2x2")
        return cls(int(m.group(1)), int(m.group(2)))

    def __str__(self) -> str:
        return f"{self.ph}x{self.pw}"


ALL_PACKINGS = tuple(Packing(h, w) for h in (1, 2) for w in (1, 2))


@dataclass(frozen=True)
class LayerShape:
    kind: str  # "pw" (1×1, all channels) or "dw" (3×3 depth-wise)
    cin: int
    cout: int
    bias: bool  # a trainable convolution bias (all but the last layer)
    bn: bool  # batch normalisation on the input (all but the first layer)
    relu: bool

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.cout, self.cin) if self.kind == "pw" else (self.cout, 3, 3)

    @property
    def macs(self) -> int:
        """Multiply-accumulates per output position (per packed pixel)."""
        return self.cout * self.cin if self.kind == "pw" else self.cout * 9


@dataclass(frozen=True)
class Architecture:
    """Number of layers and filters of one network (both configurable, paper default 5 × 12)."""

    layers: int = 5
    filters: int = 12

    def __post_init__(self) -> None:
        if self.layers < 3 or self.layers % 2 == 0 or self.layers > 15:
            raise UsageError(f"layers must be odd and in 3..15, got {self.layers}")
        if not 1 <= self.filters <= 32:
            raise UsageError(f"filters must be in 1..32, got {self.filters}")

    def shapes(self, group: Group, packing: Packing) -> tuple[LayerShape, ...]:
        io = group.planes * packing.size
        out = []
        for i in range(self.layers):
            last = i == self.layers - 1
            kind = "pw" if i % 2 == 0 else "dw"
            cin = io if i == 0 else self.filters
            cout = io if last else self.filters
            out.append(LayerShape(kind, cin, cout, bias=not last, bn=i > 0, relu=not last))
        return tuple(out)

    def mac_per_pixel(self, group: Group, packing: Packing) -> float:
        """MACs per luma pixel position, as the paper's Tables 1 and 2 count them."""
        per_packed = sum(s.macs for s in self.shapes(group, packing))
        per_sample = per_packed / packing.size
        return per_sample if group is Group.Y else per_sample / 4.0

    def parameter_count(self, group: Group, packing: Packing) -> int:
        """Signalled parameters: weights, and one bias per output channel of every layer (after folding
        batch normalisation, the last layer has a bias too)."""
        return sum(math.prod(s.weight_shape) + s.cout for s in self.shapes(group, packing))
