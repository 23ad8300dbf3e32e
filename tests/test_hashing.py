"""The hash families and sort helpers, each against a direct computation."""

from __future__ import annotations

import pytest
import torch

from lshattn import hashing


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_draw_normal_depends_on_the_generator_only():
    a = hashing.draw_normal((3, 4), gen(1), torch.device("cpu"))
    b = hashing.draw_normal((3, 4), gen(1), torch.device("cpu"))
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert not torch.equal(a, hashing.draw_normal((3, 4), gen(2), torch.device("cpu")))


@pytest.mark.parametrize(
    "num_buckets, factors", [(2, (2,)), (8, (8,)), (64, (64,)), (128, (64, 2)), (4096, (64, 64)), (2**13, (64, 64, 2))]
)
def test_angular_factors(num_buckets, factors):
    assert hashing.angular_factors(num_buckets) == factors
    assert torch.tensor(factors).prod().item() == num_buckets


@pytest.mark.parametrize("num_buckets", [2, 8, 64, 256])
def test_angular_buckets_are_argmax_of_plus_minus_rotations(num_buckets):
    x = torch.randn(2, 3, 50, 16, generator=gen())
    factors = hashing.angular_factors(num_buckets)
    rotations = torch.randn(3, 16, 2, sum(factors) // 2, generator=gen(1))
    buckets = hashing.angular_buckets(x, rotations, factors)
    assert buckets.shape == (2, 3, 2, 50) and buckets.min() >= 0 and buckets.max() < num_buckets
    expected = torch.zeros_like(buckets)
    radix, start = 1, 0
    for f in factors:  # the textbook form: argmax over the concatenation [xR, -xR]
        rotated = torch.einsum("bhld,hdrf->bhrlf", x, rotations[..., start : start + f // 2])
        expected += radix * torch.cat([rotated, -rotated], -1).argmax(-1)
        radix, start = radix * f, start + f // 2
    assert torch.equal(buckets, expected)


def test_angular_buckets_are_scale_invariant_and_antipodal():
    x = torch.randn(1, 2, 30, 8, generator=gen())
    rotations = torch.randn(2, 8, 1, 4, generator=gen(1))
    buckets = hashing.angular_buckets(x, rotations, (8,))
    assert torch.equal(hashing.angular_buckets(x * 3.7, rotations, (8,)), buckets)
    assert torch.equal(hashing.angular_buckets(-x, rotations, (8,)), (buckets + 4) % 8)


def test_xbox_plus_turns_inner_products_into_distances():
    q, k = torch.randn(2, 3, 20, 8, generator=gen()), torch.randn(2, 3, 15, 8, generator=gen(1)) * 2
    q_valid, k_valid = torch.ones(2, 20, dtype=torch.bool), torch.ones(2, 15, dtype=torch.bool)
    q_aug, k_aug = hashing.xbox_plus(q, k, q_valid, k_valid)
    m2 = q.pow(2).sum(-1).amax(-1, keepdim=True) + k.pow(2).sum(-1).amax(-1, keepdim=True)
    torch.testing.assert_close(q_aug.pow(2).sum(-1), m2.expand(-1, -1, 20))
    torch.testing.assert_close(k_aug.pow(2).sum(-1), m2.expand(-1, -1, 15))
    distance = torch.cdist(q_aug, k_aug).pow(2)
    torch.testing.assert_close(distance, 2 * m2[..., None] - 2 * q @ k.transpose(-1, -2), atol=1e-4, rtol=1e-4)


def test_xbox_plus_norms_come_from_real_tokens_only():
    q, k = torch.randn(1, 2, 10, 8, generator=gen()), torch.randn(1, 2, 10, 8, generator=gen(1))
    valid = torch.arange(10)[None] < 6
    q_big, k_big = q.clone(), k.clone()
    q_big[:, :, 6:] *= 100
    k_big[:, :, 6:] *= 100
    small = hashing.xbox_plus(q, k, valid, valid)
    big = hashing.xbox_plus(q_big, k_big, valid, valid)
    for a, b in zip(small, big):
        assert torch.equal(a[:, :, :6], b[:, :, :6])
        assert torch.isfinite(b).all()


def test_sort_order_puts_invalid_last_and_breaks_ties_by_position():
    key = torch.tensor([3.0, 1.0, 3.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 6)
    valid = torch.tensor([[True, True, True, False, True, True]])
    order = hashing.sort_order(key, valid)
    assert order.flatten().tolist() == [1, 4, 5, 0, 2, 3]


def test_inverse_order_and_gather_rows():
    order = torch.stack([torch.randperm(7, generator=gen(i)) for i in range(6)]).view(1, 2, 3, 7)
    inverse = hashing.inverse_order(order)
    assert torch.equal(torch.gather(order, -1, inverse), torch.arange(7).expand(1, 2, 3, 7))
    x = torch.randn(1, 2, 7, 5, generator=gen())
    gathered = hashing.gather_rows(x, order)
    for h in range(2):
        for r in range(3):
            assert torch.equal(gathered[0, h, r], x[0, h, order[0, h, r]])
    per_round = torch.randn(1, 2, 3, 7, 5, generator=gen(1))
    assert torch.equal(hashing.gather_rows(per_round, order)[0, 1, 2], per_round[0, 1, 2, order[0, 1, 2]])


def test_e2lsh_projection_is_a_plain_projection():
    x = torch.randn(2, 3, 9, 6, generator=gen())
    directions = torch.randn(3, 4, 6, generator=gen(1))
    projection = hashing.e2lsh_projection(x, directions)
    torch.testing.assert_close(projection[1, 2, 3], x[1, 2] @ directions[2, 3])
