"""Control tables as data: register name -> (address, size, value encoding, access, default).

A bus vendor class is mostly one ``ControlTable``. Registers are looked up by name
(``table["Goal_Position"]``); a typo raises ``RegisterError`` with the closest names, so a
misspelt register fails on the first call rather than reading the wrong address.

Value encodings (what a signed value looks like on the wire):

- ``Unsigned``: plain little-endian unsigned integer of ``size`` bytes.
- ``SignMagnitude(bit)``: Feetech. Negative values set bit ``bit`` and keep the magnitude in
  the bits below it (``encoded = (1 << bit) | |v|``); LeRobot ``encoding_utils.py``.
- ``TwosComplement``: Dynamixel X-series and CAN drives.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from molmoact2_edge.errors import RegisterError


class Encoding(Protocol):
    """How a signed Python int maps to the raw unsigned register value and back."""

    def encode(self, value: int, size: int) -> int: ...

    def decode(self, raw: int, size: int) -> int: ...

    def bounds(self, size: int) -> tuple[int, int]: ...


@dataclass(frozen=True)
class Unsigned:
    def encode(self, value: int, size: int) -> int:
        return value

    def decode(self, raw: int, size: int) -> int:
        return raw

    def bounds(self, size: int) -> tuple[int, int]:
        return 0, (1 << (8 * size)) - 1


@dataclass(frozen=True)
class SignMagnitude:
    bit: int  # index of the sign bit; the magnitude uses the bits below it

    def encode(self, value: int, size: int) -> int:
        return (1 << self.bit) | -value if value < 0 else value

    def decode(self, raw: int, size: int) -> int:
        magnitude = raw & ((1 << self.bit) - 1)
        return -magnitude if raw & (1 << self.bit) else magnitude

    def bounds(self, size: int) -> tuple[int, int]:
        limit = (1 << self.bit) - 1
        return -limit, limit


@dataclass(frozen=True)
class TwosComplement:
    def encode(self, value: int, size: int) -> int:
        return value & ((1 << (8 * size)) - 1)

    def decode(self, raw: int, size: int) -> int:
        sign = 1 << (8 * size - 1)
        return raw - (sign << 1) if raw & sign else raw

    def bounds(self, size: int) -> tuple[int, int]:
        half = 1 << (8 * size - 1)
        return -half, half - 1


UNSIGNED = Unsigned()
TWOS_COMPLEMENT = TwosComplement()

Area = Literal["eeprom", "ram", "factory"]


@dataclass(frozen=True)
class Register:
    """One entry of a control table."""

    name: str
    address: int
    size: int  # bytes, little-endian on the wire
    encoding: Encoding = UNSIGNED
    writable: bool = True
    area: Area = "ram"
    default: int = 0  # power-on value (decoded), what an emulator starts from

    def encode(self, value: int) -> int:
        """Signed value -> raw unsigned register value; out of range raises ``RegisterError``."""
        low, high = self.encoding.bounds(self.size)
        if not low <= value <= high:
            raise RegisterError(
                f"value {value} does not fit register {self.name} (address {self.address}, "
                f"{self.size} B): allowed range is {low}..{high}"
            )
        return self.encoding.encode(int(value), self.size)

    def decode(self, raw: int) -> int:
        return self.encoding.decode(raw, self.size)

    def to_bytes(self, value: int) -> bytes:
        return self.encode(value).to_bytes(self.size, "little")

    def from_bytes(self, data: bytes | bytearray) -> int:
        return self.decode(int.from_bytes(data, "little"))


class ControlTable(Mapping[str, Register]):
    """Name -> ``Register`` for one servo model, with did-you-mean lookups."""

    def __init__(self, model: str, registers: Iterable[Register]):
        self.model = model
        self._registers: dict[str, Register] = {}
        for reg in registers:
            if reg.name in self._registers:
                raise ValueError(f"duplicate register {reg.name} in the {model} control table")
            self._registers[reg.name] = reg

    def __getitem__(self, name: str) -> Register:
        try:
            return self._registers[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._registers, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise RegisterError(f"unknown register {name!r} for {self.model}{hint}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._registers)

    def __len__(self) -> int:
        return len(self._registers)

    def resolve(self, register: str | Register) -> Register:
        """Accept a name or a ``Register`` (which must belong to this table)."""
        if isinstance(register, Register):
            if self._registers.get(register.name) != register:
                raise RegisterError(f"register {register.name} is not in the {self.model} control table")
            return register
        return self[register]

    def memory_size(self) -> int:
        """Bytes of register memory the table spans (address 0 up to the last byte)."""
        return max(reg.address + reg.size for reg in self._registers.values())

    def default_memory(self) -> bytearray:
        """The power-on register file: every register's default, encoded, at its address."""
        memory = bytearray(self.memory_size())
        for reg in self._registers.values():
            memory[reg.address : reg.address + reg.size] = reg.to_bytes(reg.default)
        return memory
