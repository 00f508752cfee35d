"""Small jit helpers shared by the forward and the map pass."""
import triton
import triton.language as tl


@triton.jit
def mma(a, b, IEEE: tl.constexpr):
    """a @ b accumulated in fp32. IEEE: full fp32 products for fp32 inputs (tl.dot would use tf32,
    a 10-bit significand, on GPUs); 16-bit inputs run on the tensor cores either way."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def load(ptrs, mask, MASKED: tl.constexpr):
    """tl.load with ``mask`` (zeros outside) only where a bound can cut the tile: interior tiles
    load without predicates, which keeps the loads vectorised and pipelined."""
    if MASKED:
        return tl.load(ptrs, mask=mask, other=0.0)
    else:
        return tl.load(ptrs)
