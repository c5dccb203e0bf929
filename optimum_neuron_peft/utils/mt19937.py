"""Jump-ahead for the 32-bit Mersenne Twister (MT19937), the generator behind ``torch.Generator`` on CPU.

DARE masks must reproduce ``torch.bernoulli``'s stream: one MT19937 draw per element, in order. Drawing is
inherently sequential, so to split one stream over several threads we need the state ``n`` draws ahead without
drawing them. MT19937 is linear over GF(2): its untempered outputs ``y_k`` satisfy the recurrence whose
characteristic polynomial ``phi`` (degree 19937) is that of the state transition. If ``g = t^n mod phi``, then
``y_{n+d} = XOR_{i: g_i = 1} y_{i+d}`` for every ``d >= 0`` (Cayley-Hamilton), so the 624 words that follow draw
``n`` are an XOR of windows of the next ~20,560 untempered outputs; ``g`` costs ~15 modular squarings of Python
integers used as GF(2) polynomials. About 0.1 s per jump, against ~7 ns per draw.

States are numpy's ``MT19937`` state: ``key`` (624 uint32 words) and ``pos`` (index of the next word to temper;
624 means "twist first").
"""

from __future__ import annotations

import functools

import numpy as np

MT_N = 624
DEGREE = 19937  # of the characteristic polynomial: the state has 19937 significant bits
_U = np.uint32


def temper(words: np.ndarray) -> np.ndarray:
    y = np.asarray(words, dtype=_U).copy()
    y ^= y >> _U(11)
    y ^= (y << _U(7)) & _U(0x9D2C5680)
    y ^= (y << _U(15)) & _U(0xEFC60000)
    y ^= y >> _U(18)
    return y


def untemper(outputs: np.ndarray) -> np.ndarray:
    """Invert `temper` (each step is a bijection of 32-bit words)."""
    y = np.asarray(outputs, dtype=_U).copy()
    y ^= y >> _U(18)
    y ^= (y << _U(15)) & _U(0xEFC60000)  # its own inverse: the mask has no bit in the 15 lowest places
    x = y.copy()
    for _ in range(5):  # y = x ^ ((x << 7) & m): fixed-point iteration recovers 7 more bits each time
        x = y ^ ((x << _U(7)) & _U(0x9D2C5680))
    y, x = x, x.copy()
    for _ in range(3):
        x = y ^ (x >> _U(11))
    return x


def bit_generator(key: np.ndarray, pos: int) -> np.random.MT19937:
    bit_gen = np.random.MT19937()
    bit_gen.state = {"bit_generator": "MT19937", "state": {"key": np.asarray(key, dtype=_U), "pos": int(pos)}}
    return bit_gen


def berlekamp_massey(bits) -> int:
    """Shortest linear recurrence of a GF(2) sequence, as its characteristic polynomial (bit i = coefficient of
    t^i). Python integers serve as bit vectors: one AND + popcount per step for the discrepancy."""
    c, b, length, m = 1, 1, 0, 1
    window = 0  # bit i is the sequence element i places back
    for n, s in enumerate(bits):
        window = (window << 1) | int(s)
        if (c & window).bit_count() & 1:
            if 2 * length <= n:
                c, b, length, m = c ^ (b << m), c, n + 1 - length, 1
            else:
                c, m = c ^ (b << m), m + 1
        else:
            m += 1
    # connection polynomial c(x) = 1 + c_1 x + ... -> characteristic polynomial t^L c(1/t): the bits reversed
    return int(format(c, f"0{length + 1}b")[::-1], 2)


@functools.lru_cache(maxsize=1)
def characteristic_polynomial() -> int:
    """``phi`` of MT19937, from Berlekamp-Massey on 2 x 19937 output bits (any seed: phi is irreducible, so every
    non-zero bit sequence of the generator has it as minimal polynomial). ~0.15 s, once per process."""
    outputs = bit_generator(*_seeded_state(5489)).random_raw(2 * DEGREE + 64)
    phi = berlekamp_massey((outputs & 1).tolist())
    if phi.bit_length() != DEGREE + 1:  # pragma: no cover - would mean numpy's MT19937 is not MT19937
        raise RuntimeError(f"MT19937 characteristic polynomial has degree {phi.bit_length() - 1}, expected {DEGREE}")
    return phi


def _seeded_state(seed: int) -> tuple[np.ndarray, int]:
    state = np.random.MT19937(seed).state["state"]
    return state["key"], state["pos"]


# GF(2) squaring spreads bit j to bit 2j: one table lookup per byte.
_SPREAD = np.array([int("".join("0" + c for c in format(v, "08b")), 2) for v in range(256)], dtype="<u2")


def _square(p: int) -> int:
    data = np.frombuffer(p.to_bytes((p.bit_length() + 7) // 8 or 1, "little"), dtype=np.uint8)
    return int.from_bytes(_SPREAD[data].tobytes(), "little")


@functools.lru_cache(maxsize=1)
def _reduction_table() -> tuple[int, ...]:
    """For each byte v: the multiple of phi that clears v placed at t^19937 (reduction 8 bits per step)."""
    phi = characteristic_polynomial()
    table = []
    for v in range(256):
        rest, multiple = v << DEGREE, 0
        for j in range(DEGREE + 7, DEGREE - 1, -1):
            if rest >> j & 1:
                rest ^= phi << (j - DEGREE)
                multiple ^= phi << (j - DEGREE)
        table.append(multiple)
    return tuple(table)


def _reduce(p: int, table: tuple[int, ...]) -> int:
    while (size := p.bit_length()) > DEGREE:
        shift = max(size - DEGREE - 8, 0)
        p ^= table[p >> (DEGREE + shift)] << shift
    return p


def jump_polynomial(n: int) -> int:
    """``t^n mod phi``."""
    if n < 0:
        raise ValueError(f"jump: expected a number of draws >= 0, found {n}")
    table, g = _reduction_table(), 1
    for bit in bin(n)[2:]:
        g = _reduce(_square(g), table)
        if bit == "1":
            g = _reduce(g << 1, table)
    return g


def jumped(key: np.ndarray, pos: int, n: int) -> tuple[np.ndarray, int]:
    """The state (key, pos) after ``n`` draws from (key, pos), without drawing them one by one."""
    if n < MT_N:  # a short jump: just draw
        bit_gen = bit_generator(key, pos)
        bit_gen.random_raw(n)
        state = bit_gen.state["state"]
        return np.asarray(state["key"], dtype=_U), int(state["pos"])
    g = jump_polynomial(n)
    ahead = untemper(bit_generator(key, pos).random_raw(DEGREE + MT_N))
    coefficients = np.frombuffer(g.to_bytes(DEGREE // 8 + 1, "little"), dtype=np.uint8)
    selected = np.unpackbits(coefficients, bitorder="little")[:DEGREE].astype(bool)
    windows = np.lib.stride_tricks.sliding_window_view(ahead, MT_N)[:DEGREE]
    key = np.zeros(MT_N, dtype=_U)
    for start in range(0, DEGREE, 2048):  # in blocks: the selected windows would be ~25 MB at once
        block = windows[start : start + 2048][selected[start : start + 2048]]
        key ^= np.bitwise_xor.reduce(block, axis=0) if len(block) else 0
    return key, 0  # the 624 words from draw n on: temper key[0] next
