"""Unit tests of the dynamic adjoint scaler on hand-made cotangents and results (no solves)."""
from __future__ import annotations

import math

import torch

from rampde_fx.adjoint.scaling import (EXPONENT_LIMIT, RETRY_STEP_LOG2, TARGET_LOG2,
                                       AdjointScaler, largest_magnitude)

CPU = torch.device("cpu")


def exponent_of(scale: torch.Tensor) -> float:
    """The base-2 exponent of a power of two, checked to be one."""
    mantissa, exponent = torch.frexp(scale)
    assert mantissa.item() == 0.5, f"{scale.item()} is not a power of two"
    return exponent.item() - 1.0


def test_largest_magnitude_skips_missing_and_empty_tensors():
    """The largest |value| over all tensors, as a float32 0-dim tensor, whatever their dtypes;
    None and empty tensors are skipped, and nothing at all gives 0."""
    tensors = [torch.tensor([1.0, -7.5]), None, torch.empty(0),
               torch.tensor([[3.0], [-2.0]], dtype=torch.float64),
               torch.tensor(6.0, dtype=torch.bfloat16)]
    largest = largest_magnitude(tensors, CPU)
    assert largest.dtype == torch.float32 and largest.dim() == 0
    assert largest.item() == 7.5
    for nothing in ([], [None], [torch.empty(0, 3)]):
        zero = largest_magnitude(nothing, CPU)
        assert zero.dtype == torch.float32 and zero.dim() == 0 and zero.item() == 0.0


def test_scale_is_a_power_of_two_that_puts_the_largest_cotangent_at_the_target():
    """With no gain observed yet, the scale is a float32 power of two and the largest scaled
    cotangent lands in [2**TARGET_LOG2, 2**(TARGET_LOG2 + 1)): the magnitude's binary exponent
    is moved to the target, so scaling is exact."""
    for largest in [3.0, 1e-6, 0.75, 1.0, 4096.0, 1e5, 2.0 ** -30]:
        scaler = AdjointScaler(CPU)
        cotangents = [torch.tensor([largest / 3, -largest]), torch.tensor([0.5 * largest])]
        scale = scaler.scale_for(cotangents)
        assert scale.dtype == torch.float32 and scale.dim() == 0
        exponent = exponent_of(scale)
        assert scaler.exponents[-1].item() == exponent
        scaled = largest_magnitude([c * scale for c in cotangents], CPU).item()
        assert 2.0 ** TARGET_LOG2 <= scaled < 2.0 ** (TARGET_LOG2 + 1)
        assert scaled == torch.tensor(largest).item() * 2.0 ** exponent


def test_observed_gain_sets_the_next_steps_scale():
    """The gain observed on a step (largest scaled result over largest scaled cotangent, in
    log2) lowers the next step's target for the cotangent to 2**(TARGET_LOG2 - gain), so that
    a step with the same gain lands its largest scaled result at 2**TARGET_LOG2."""
    scaler = AdjointScaler(CPU)
    first = [torch.tensor([3.0, -1.0])]
    scale = scaler.scale_for(first)
    assert exponent_of(scale) == TARGET_LOG2 - 1  # 3 = 1.5 * 2**1
    scaled_input = 3.0 * scale
    overflowed = scaler.observe([torch.tensor([-8.0]) * scaled_input, torch.tensor([1.0])])
    assert not overflowed.item() and not scaler.overflow.item()
    assert scaler.gain_log2.item() == 3.0

    second = [torch.tensor([0.5, 0.25])]
    scale = scaler.scale_for(second)
    scaled_input = 0.5 * scale.item()
    assert 2.0 ** (TARGET_LOG2 - 3) <= scaled_input < 2.0 ** (TARGET_LOG2 - 2)
    assert 2.0 ** TARGET_LOG2 <= 8.0 * scaled_input < 2.0 ** (TARGET_LOG2 + 1)
    assert [e.item() for e in scaler.exponents] == [TARGET_LOG2 - 1, TARGET_LOG2 - 3 + 1]

    # A shrinking step (gain -2.5) raises the next target; a fractional gain rounds.
    scaler.observe([torch.tensor([scaled_input * 2.0 ** -2.5])])
    assert abs(scaler.gain_log2.item() + 2.5) < 1e-6
    exponent = exponent_of(scaler.scale_for(second))
    assert exponent + math.floor(math.log2(0.5)) in (TARGET_LOG2 + 2, TARGET_LOG2 + 3)


def test_target_can_be_lowered():
    """A scaler whose target is lowered (as the sweep retries do) scales by that much less."""
    cotangents = [torch.tensor([0.3])]
    default = exponent_of(AdjointScaler(CPU).scale_for(cotangents))
    lowered = AdjointScaler(CPU)
    lowered.target_log2 = TARGET_LOG2 - RETRY_STEP_LOG2
    assert exponent_of(lowered.scale_for(cotangents)) == default - RETRY_STEP_LOG2


def test_zero_cotangent_gets_scale_one_and_keeps_the_gain():
    """An all-zero (or absent) cotangent gets scale 1, exponent 0, and finite values; observing
    its zero results neither flags an overflow nor changes the gain, also once a gain has been
    observed."""
    scaler = AdjointScaler(CPU)
    for cotangents in ([torch.zeros(4)], [None, torch.zeros(2, 2)], []):
        scale = scaler.scale_for(cotangents)
        assert scale.item() == 1.0 and scaler.exponents[-1].item() == 0.0
        assert not scaler.observe([torch.zeros(4)]).item()
        assert scaler.gain_log2.item() == 0.0 and not scaler.overflow.item()

    scaler.scale_for([torch.tensor([1.0])])
    scaler.observe([torch.tensor([2.0 ** (TARGET_LOG2 + 2)])])
    assert scaler.gain_log2.item() == 2.0
    assert scaler.scale_for([torch.zeros(3)]).item() == 1.0
    assert not scaler.observe([torch.zeros(3)]).item()
    # Nonzero results of a zero cotangent (a constant part of the step) tell nothing either.
    assert not scaler.observe([torch.ones(3)]).item()
    assert scaler.gain_log2.item() == 2.0 and not scaler.overflow.item()
    assert all(math.isfinite(e.item()) for e in scaler.exponents)


def test_overflow_is_flagged_on_the_device_and_accumulates():
    """inf or nan among the observed results is returned as a device flag and or-ed into
    ``overflow``, which stays set through later finite steps; the gain is not updated from a
    non-finite step."""
    scaler = AdjointScaler(CPU)
    assert scaler.overflow.dtype == torch.bool and scaler.overflow.device == CPU
    scaler.scale_for([torch.tensor([1.0])])
    scaler.observe([torch.tensor([2.0 ** TARGET_LOG2])])
    assert scaler.gain_log2.item() == 0.0

    for bad in (float("inf"), float("-inf"), float("nan")):
        scaler.scale_for([torch.tensor([1.0])])
        flag = scaler.observe([torch.tensor([1.0, bad]), None])
        assert isinstance(flag, torch.Tensor) and flag.dtype == torch.bool
        assert flag.device == CPU and flag.item()
        assert scaler.overflow.item() and scaler.gain_log2.item() == 0.0

    scaler.scale_for([torch.tensor([1.0])])
    assert not scaler.observe([torch.tensor([2.0 ** (TARGET_LOG2 + 1)])]).item()
    assert scaler.overflow.item()
    assert scaler.gain_log2.item() == 1.0


def test_assume_more_gain_retries_with_a_smaller_scale():
    """After an overflow, ``assume_more_gain`` raises the gain estimate by RETRY_STEP_LOG2,
    clears the overflow flag and drops the failed step's exponent: the retry is scaled
    RETRY_STEP_LOG2 lower, and its measured gain replaces the estimate."""
    scaler = AdjointScaler(CPU)
    cotangents = [torch.tensor([1.0, -0.5])]
    first = exponent_of(scaler.scale_for(cotangents))
    assert scaler.observe([torch.tensor([float("inf")])]).item()
    scaler.assume_more_gain()
    assert scaler.gain_log2.item() == RETRY_STEP_LOG2
    assert not scaler.overflow.item()
    assert scaler.exponents == []

    retry = scaler.scale_for(cotangents)
    assert exponent_of(retry) == first - RETRY_STEP_LOG2
    assert [e.item() for e in scaler.exponents] == [first - RETRY_STEP_LOG2]
    scaler.observe([torch.tensor([1.0]) * retry * 2.0 ** 6])
    assert scaler.gain_log2.item() == 6.0


def test_exponent_is_clamped_for_huge_and_tiny_magnitudes():
    """Cotangents near float32's ends, or an extreme observed gain, give exponents within
    +-EXPONENT_LIMIT: the scale and the scaled cotangent stay finite and nonzero in float32."""
    cases = [(torch.finfo(torch.float32).max, 0.0), (2.0 ** 100, 0.0),
             (torch.finfo(torch.float32).smallest_normal, 0.0), (2.0 ** -149, 0.0),
             (1.0, 500.0), (1.0, -500.0)]
    for largest, gain in cases:
        scaler = AdjointScaler(CPU)
        scaler.gain_log2 = torch.tensor(gain)
        cotangent = torch.tensor([largest], dtype=torch.float32)
        assert cotangent.item() > 0
        scale = scaler.scale_for([cotangent])
        exponent = exponent_of(scale)
        assert abs(exponent) <= EXPONENT_LIMIT
        assert torch.isfinite(scale) and scale > 0
        scaled = cotangent * scale
        assert torch.isfinite(scaled).all() and (scaled > 0).all()
    assert exponent_of(AdjointScaler(CPU).scale_for([torch.tensor([2.0 ** -149])])) \
        == EXPONENT_LIMIT
    assert exponent_of(AdjointScaler(CPU).scale_for(
        [torch.tensor([torch.finfo(torch.float32).max])])) == -EXPONENT_LIMIT


def test_float16_round_trip_keeps_small_cotangents():
    """What the scaler is for: a cotangent of magnitude 1e-6 scaled, rounded to float16 and
    unscaled in float32 keeps every entry to float16's unit roundoff 2**-11 (the power-of-two
    scale and unscale are exact), while unscaled its entries below 2**-25 round to 0 and the
    others keep only the subnormal spacing 2**-24."""
    cotangent = 1e-6 * torch.tensor([1.0, -0.37, 0.021, -0.013, 0.0042])
    scale = AdjointScaler(CPU).scale_for([cotangent])
    scaled = cotangent * scale
    assert torch.equal(scaled / scale, cotangent)
    round_trip = scaled.to(torch.float16).to(torch.float32) / scale
    assert ((round_trip - cotangent).abs() <= 2.0 ** -11 * cotangent.abs()).all()

    unscaled = cotangent.to(torch.float16).to(torch.float32)
    assert (unscaled[2:] == 0).all()
    assert ((unscaled[:2] - cotangent[:2]).abs() > 2.0 ** -11 * cotangent[:2].abs()).any()
