"""MT19937 jump-ahead against sequential drawing (numpy's and torch's generators)."""

import struct

import numpy as np
import pytest
import torch

from optimum_neuron_peft.utils import mt19937


def _state_after(seed: int, draws: int) -> tuple[np.ndarray, int]:
    bit_gen = np.random.MT19937(seed)
    bit_gen.random_raw(draws)
    state = bit_gen.state["state"]
    return state["key"], state["pos"]


def test_untemper_inverts_temper():
    words = np.random.default_rng(0).integers(0, 2**32, size=10_000, dtype=np.uint32)
    words[:4] = [0, 2**32 - 1, 0x80000000, 1]
    assert np.array_equal(mt19937.untemper(mt19937.temper(words)), words)
    assert np.array_equal(mt19937.temper(mt19937.untemper(words)), words)


def test_berlekamp_massey_finds_a_known_recurrence():
    # s_n = s_{n-3} ^ s_{n-4} (characteristic polynomial t^4 + t + 1)
    bits = [1, 0, 0, 0]
    for n in range(4, 40):
        bits.append(bits[n - 3] ^ bits[n - 4])
    assert mt19937.berlekamp_massey(bits) == 0b10011


def test_characteristic_polynomial_is_the_generators_recurrence():
    phi = mt19937.characteristic_polynomial()
    assert phi.bit_length() == mt19937.DEGREE + 1 and phi & 1
    # every bit of every untempered output, from any state, satisfies the recurrence with phi
    words = mt19937.untemper(np.random.MT19937(2024).random_raw(mt19937.DEGREE + 200))
    taps = np.flatnonzero(np.unpackbits(np.frombuffer(phi.to_bytes(2500, "little"), np.uint8), bitorder="little"))
    for d in (0, 57, 199):
        assert np.bitwise_xor.reduce(words[taps + d]) == 0


@pytest.mark.parametrize(
    "seed, before, n",
    [(1, 0, 0), (2, 0, 1), (3, 623, 624), (4, 5, 625), (5, 624, 19937), (6, 1000, 10**6 + 7), (7, 77, 3 * 2**25 + 11)],
)
def test_jumped_equals_drawing(seed, before, n):
    key, pos = _state_after(seed, before)
    jumped_key, jumped_pos = mt19937.jumped(key, pos, n)
    sequential = mt19937.bit_generator(key, pos)
    sequential.random_raw(n)
    assert np.array_equal(mt19937.bit_generator(jumped_key, jumped_pos).random_raw(5000), sequential.random_raw(5000))


def test_jump_from_a_torch_generator_state():
    # torch's CPU generator is MT19937 too: its stream after n draws is the jumped stream
    g = torch.Generator().manual_seed(31)
    torch.rand(3, generator=g)
    state = g.get_state().numpy()
    key = state[24 : 24 + 8 * 624].view(np.uint64).astype(np.uint32)
    _, left, _, nxt = struct.unpack_from("<QiiQ", state, 0)  # at::mt19937 data: seed, left, seeded, next
    pos = 624 if left == 1 else nxt
    jumped = mt19937.bit_generator(*mt19937.jumped(key, pos, 100_003))
    torch.empty(100_003, dtype=torch.int32).random_(generator=g)  # one 32-bit draw per element
    ours = jumped.random_raw(1000).astype(np.int64) % 2**31
    assert np.array_equal(ours, torch.empty(1000, dtype=torch.int32).random_(generator=g).numpy())


def test_jump_rejects_negative():
    with pytest.raises(ValueError, match="expected a number of draws >= 0"):
        mt19937.jump_polynomial(-1)
