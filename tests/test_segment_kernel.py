"""The segmented LoRA kernel (segment_matmul.c, built by segment_kernel.py with the machine's C
compiler) against torch: each row range multiplied by its own entry of a weight stack, in place or
added, with rows outside every range untouched; inputs that do not fit are refused. Skipped where
no kernel could be built (then mixed-adapter batches use torch's batched matmuls)."""

from __future__ import annotations

import pytest
import torch

from stillroom_server.engine.kernels import segment_kernel
from stillroom_server.engine.kernels.segment_kernel import Segments

pytestmark = pytest.mark.skipif(not segment_kernel.available(), reason="no C compiler built the kernel")


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize(("k", "m"), [(48, 16), (16, 1100), (7, 5)])   # 1100: two column passes
def test_each_segment_is_multiplied_by_its_own_weights(accumulate, k, m):
    generator = torch.Generator().manual_seed(k * m)
    wide = torch.randn(23, k + 9, generator=generator)
    x = wide[:, 3:3 + k]                            # rows k + 9 floats apart, as a column slice is
    stack = torch.randn(4, k, m, generator=generator)
    out = torch.randn(23, m, generator=generator)
    before = out.clone()
    segments = Segments(begin=(1, 2, 9, 15), end=(2, 9, 15, 21), group=(3, 0, 3, 1))   # 1, 7, 6, 6 rows
    segment_kernel.matmul(x, stack, segments, out, accumulate=accumulate)
    expected = before.clone()
    for begin, end, group in zip(segments.begin, segments.end, segments.group):
        product = x[begin:end] @ stack[group]
        expected[begin:end] = before[begin:end] + product if accumulate else product
    # k-term fp32 dot products (k <= 48) of unit normals in another order: partial sums ~sqrt(k) in size,
    # each rounded, about k u = 6e-6 apart; atol 1e-5 plus rtol 1e-5 of the ~sqrt(k)-sized results
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
    untouched = [0, 21, 22]
    assert torch.equal(out[untouched], before[untouched])


def test_inputs_that_do_not_fit_are_refused_and_nothing_is_written():
    x, stack, out = torch.randn(6, 8), torch.randn(2, 8, 4), torch.zeros(6, 4)
    for bad_x, bad_stack, bad_out, segments in [
            (x.double(), stack, out, Segments((0,), (6,), (0,))),          # not fp32
            (x, stack, torch.zeros(6, 5), Segments((0,), (6,), (0,))),     # out's width is not M
            (x, stack, out, Segments((0,), (7,), (0,))),                   # a segment past the rows
            (x, stack, out, Segments((0,), (6,), (2,))),                   # a group past the stack
            (x.t().contiguous().t(), stack, out, Segments((0,), (6,), (0,)))]:   # columns not unit-strided
        with pytest.raises(ValueError, match="segment_kernel.matmul"):
            segment_kernel.matmul(bad_x, bad_stack, segments, bad_out, accumulate=True)
        assert not out.any()
