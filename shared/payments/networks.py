"""Crypto top-ups: the supported networks, the format of their transaction hashes and sender addresses, and
the seam where a chain verifier plugs in.

Formats are checked exactly, checksums included (EIP-55 for mixed-case Ethereum addresses, Base58Check for
Tron and legacy Bitcoin addresses, bech32/bech32m for SegWit ones), so a typo is refused at submission
rather than found by a reviewer. A transaction hash is stored normalised (lower-case hex without `0x`), so
one transfer can be claimed only once whatever its spelling and whatever network it is claimed on.

No chain is contacted here. `ChainVerifier` is the seam: `NoChainVerifier` (the default) reports every
transfer as unverified, and platform admins review by hand; a verifier that reads a node or an explorer
returns what it found, which the review screen shows beside the claim.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "NETWORKS",
    "ChainCheck",
    "ChainVerifier",
    "InvalidTransfer",
    "Network",
    "NoChainVerifier",
    "Transfer",
    "keccak256",
    "validate_transfer",
]


class InvalidTransfer(ValueError):
    """A claimed transfer's network, hash or address is malformed; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class Network:
    name: str
    family: str  # "evm", "tron", "bitcoin"
    assets: str  # what is accepted on it, for the portal


NETWORKS: dict[str, Network] = {n.name: n for n in (
    Network("ethereum", "evm", "USDT, USDC (ERC-20)"),
    Network("polygon", "evm", "USDT, USDC"),
    Network("bsc", "evm", "USDT (BEP-20)"),
    Network("arbitrum", "evm", "USDT, USDC"),
    Network("base", "evm", "USDC"),
    Network("tron", "tron", "USDT (TRC-20)"),
    Network("bitcoin", "bitcoin", "BTC"),
)}


@dataclass(frozen=True, slots=True)
class Transfer:
    network: str
    tx_hash: str  # normalised: 64 lower-case hex digits
    sender_address: str  # as the chain spells it (EVM: checksummed or as given when single-case)


_HEX64 = re.compile(r"[0-9a-f]{64}")
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58)}


def validate_transfer(network: str, tx_hash: str, sender_address: str) -> Transfer:
    """The normalised transfer, or InvalidTransfer naming the field that is wrong."""
    net = NETWORKS.get(network)
    if net is None:
        raise InvalidTransfer("network", f"network must be one of {', '.join(NETWORKS)}")
    digits = tx_hash.lower()
    if net.family == "evm":
        if not digits.startswith("0x"):
            raise InvalidTransfer("tx_hash", f"a {network} transaction hash is 0x and 64 hex digits")
        digits = digits[2:]
    if not _HEX64.fullmatch(digits):
        raise InvalidTransfer("tx_hash", f"a {network} transaction hash is "
                                         f"{'0x and ' if net.family == 'evm' else ''}64 hex digits")
    if digits == "0" * 64:
        raise InvalidTransfer("tx_hash", "the transaction hash is all zeros")
    check = {"evm": _check_evm_address, "tron": _check_tron_address, "bitcoin": _check_bitcoin_address}[net.family]
    if not check(sender_address):
        raise InvalidTransfer("sender_address", f"sender_address is not a valid {network} address")
    return Transfer(network, digits, sender_address)


# --- Ethereum family: 0x + 40 hex, EIP-55 checksum when mixed case -------------------------------------


def _check_evm_address(address: str) -> bool:
    if not re.fullmatch(r"0x[0-9a-fA-F]{40}", address):
        return False
    body = address[2:]
    if body == body.lower() or body == body.upper():
        return body.lower() != "0" * 40  # single case carries no checksum; the zero address is nobody's
    digest = keccak256(body.lower().encode()).hex()
    return all((c.upper() if int(d, 16) >= 8 else c.lower()) == c for c, d in zip(body, digest, strict=False))


# Keccak-256 as Ethereum uses it (the original padding, 0x01, not SHA3-256's 0x06); hashlib has only SHA3.
_RC = [
    0x0000000000000001, 0x0000000000008082, 0x800000000000808A, 0x8000000080008000, 0x000000000000808B,
    0x0000000080000001, 0x8000000080008081, 0x8000000000008009, 0x000000000000008A, 0x0000000000000088,
    0x0000000080008009, 0x000000008000000A, 0x000000008000808B, 0x800000000000008B, 0x8000000000008089,
    0x8000000000008003, 0x8000000000008002, 0x8000000000000080, 0x000000000000800A, 0x800000008000000A,
    0x8000000080008081, 0x8000000000008080, 0x0000000080000001, 0x8000000080008008,
]
_ROT = [[0, 36, 3, 41, 18], [1, 44, 10, 45, 2], [62, 6, 43, 15, 61], [28, 55, 25, 21, 56], [27, 20, 39, 8, 14]]
_MASK = (1 << 64) - 1


def _keccak_f(a: list[list[int]]) -> None:
    for rc in _RC:
        c = [a[x][0] ^ a[x][1] ^ a[x][2] ^ a[x][3] ^ a[x][4] for x in range(5)]
        d = [c[(x - 1) % 5] ^ (((c[(x + 1) % 5] << 1) | (c[(x + 1) % 5] >> 63)) & _MASK) for x in range(5)]
        for x in range(5):
            for y in range(5):
                a[x][y] ^= d[x]
        b = [[0] * 5 for _ in range(5)]
        for x in range(5):
            for y in range(5):
                r = _ROT[x][y]
                b[y][(2 * x + 3 * y) % 5] = ((a[x][y] << r) | (a[x][y] >> (64 - r))) & _MASK if r else a[x][y]
        for x in range(5):
            for y in range(5):
                a[x][y] = b[x][y] ^ ((~b[(x + 1) % 5][y]) & b[(x + 2) % 5][y])
        a[0][0] ^= rc


def keccak256(data: bytes) -> bytes:
    rate = 136
    padded = bytearray(data) + b"\x01" + b"\x00" * ((rate - (len(data) + 1) % rate) % rate)
    padded[-1] |= 0x80
    state = [[0] * 5 for _ in range(5)]
    for offset in range(0, len(padded), rate):
        block = padded[offset:offset + rate]
        for i in range(rate // 8):
            state[i % 5][i // 5] ^= int.from_bytes(block[8 * i:8 * i + 8], "little")
        _keccak_f(state)
    return b"".join(state[i % 5][i // 5].to_bytes(8, "little") for i in range(4))


# --- Base58Check (Tron, legacy Bitcoin) -------------------------------------------------------------------


def _b58check_decode(text: str) -> bytes | None:
    if not text or any(c not in _B58_INDEX for c in text):
        return None
    number = 0
    for c in text:
        number = number * 58 + _B58_INDEX[c]
    raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
    raw = b"\x00" * (len(text) - len(text.lstrip("1"))) + raw
    if len(raw) < 5:
        return None
    payload, checksum = raw[:-4], raw[-4:]
    if hashlib.sha256(hashlib.sha256(payload).digest()).digest()[:4] != checksum:
        return None
    return payload


def _check_tron_address(address: str) -> bool:
    if len(address) != 34 or not address.startswith("T"):
        return False
    payload = _b58check_decode(address)
    return payload is not None and len(payload) == 21 and payload[0] == 0x41


# --- Bitcoin: P2PKH (1…), P2SH (3…), SegWit v0 bech32 (bc1q…), Taproot and later bech32m (bc1p…) ------------

_BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_BECH32_CONST, _BECH32M_CONST = 1, 0x2BC830A3


def _bech32_polymod(values: list[int]) -> int:
    generator = [0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3]
    chk = 1
    for value in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ value
        for i in range(5):
            chk ^= generator[i] if (top >> i) & 1 else 0
    return chk


def _convert_bits(data: list[int], from_bits: int, to_bits: int) -> list[int] | None:
    acc = bits = 0
    out = []
    for value in data:
        acc = (acc << from_bits) | value
        bits += from_bits
        while bits >= to_bits:
            bits -= to_bits
            out.append((acc >> bits) & ((1 << to_bits) - 1))
    if bits >= from_bits or (acc << (to_bits - bits)) & ((1 << to_bits) - 1):
        return None  # non-zero padding or too much of it
    return out


def _check_segwit(address: str) -> bool:
    if address.lower() != address and address.upper() != address:
        return False  # mixed case is invalid bech32
    address = address.lower()
    hrp, sep, data_part = address.rpartition("1")
    if hrp != "bc" or not sep or len(address) > 90 or len(data_part) < 6:
        return False
    if any(c not in _BECH32 for c in data_part):
        return False
    data = [_BECH32.index(c) for c in data_part]
    const = _bech32_polymod([ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp] + data)
    version, program = data[0], _convert_bits(data[1:-6], 5, 8)
    if program is None or version > 16 or not 2 <= len(program) <= 40:
        return False
    if version == 0:
        return const == _BECH32_CONST and len(program) in (20, 32)
    return const == _BECH32M_CONST


def _check_bitcoin_address(address: str) -> bool:
    if address[:3].lower() == "bc1":
        return _check_segwit(address)
    if not 26 <= len(address) <= 35 or address[0] not in "13":
        return False
    payload = _b58check_decode(address)
    return payload is not None and len(payload) == 21 and payload[0] in (0x00, 0x05)


# --- The chain-verifier seam ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChainCheck:
    status: str  # "unverified" (nobody looked), "confirmed", "mismatch", "not_found"
    detail: str = ""


class ChainVerifier(Protocol):
    async def check(self, transfer: Transfer, amount_micros: int) -> ChainCheck:
        """What the chain says about this claimed transfer (sender, receiving address, amount, confirmations)."""
        ...


class NoChainVerifier:
    """No chain is contacted: every claim is unverified and reviewed by a platform admin by hand."""

    async def check(self, transfer: Transfer, amount_micros: int) -> ChainCheck:
        return ChainCheck("unverified", "no chain verifier is configured")
