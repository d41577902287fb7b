"""atskern's kernels registered as torch custom ops (``torch.library.custom_op``).

Each op has a fake (meta) implementation, so ``torch.compile`` traces through
it without running it, and the patch ops have their gradients registered
with ``register_autograd``:

- ``atskern::sample(attention, key, n, replace, strict, validate) -> int32 (B, n, D)`` grid indices
  (no gradient; the sampled attention is a torch gather, see ``functional``);
- ``atskern::extract_patches(x, offsets, patch_size, fill, channels_first)``,
  whose backward is ``atskern::scatter_patches`` (skipped when ``x`` needs no
  gradient), and whose double backward is the gather again.

The kernel calls go through :mod:`._bridge` (zero-copy, torch's stream) and
write into tensors torch allocated (the kernels' ``out=``), so on CUDA the
memory comes from torch's caching allocator, not CuPy's pool.
"""

from __future__ import annotations

import math

import torch

import atskern
from atskern._memory import too_large

from ._bridge import byte_twin, from_kernel, kernel_stream, to_kernel

_U64 = 2**64


def _kernel(name: str):
    """``atskern.<name>``, or an ImportError when this atskern predates the patch kernels."""
    function = getattr(atskern, name, None)
    if function is None:
        raise ImportError(f"atskern {atskern.__version__} has no {name}; install an atskern with the patch kernels")
    return function


# --- sampling -------------------------------------------------------------------------------


def _sample(attention: torch.Tensor, key: torch.Tensor, n: int, replace: bool, strict: bool = False,
            validate: bool = True) -> torch.Tensor:
    """int32 ``(B, n, D)`` grid indices drawn by ``atskern.sample`` with seed ``key``.

    ``key`` is a CPU int64 scalar (read on the host, passed to the kernels by value), or on CUDA a one-element
    int64 tensor on attention's device that the kernels read themselves (a *device key*: a CUDA graph that
    captured the call draws with the key's value at each replay). On CUDA nothing waits for the device with
    either key: validation is asynchronous (:func:`assert_valid_status`: a bad row raises at the next
    synchronization). ``validate=False`` skips the check (bad rows: in-range indices). ``strict=True`` refuses
    rows with fewer positive weights than ``n`` (without replacement) instead of drawing zero-probability fillers.
    """
    with kernel_stream(attention.device):
        if attention.device.type == "cuda":
            seed = to_kernel(key.reshape(1)) if key.device.type == "cuda" else int(key.item()) % _U64
            indices, _, status = atskern.sample(to_kernel(attention), n, replace=replace, seed=seed, strict=strict,
                                                validate=False, return_status=True)
            if validate:
                assert_valid_status(from_kernel(status), n if strict and not replace else 1)
            return from_kernel(indices)
        indices, _ = atskern.sample(to_kernel(attention), n, replace=replace, seed=int(key.item()) % _U64,
                                    strict=strict, validate=validate)
        return from_kernel(indices)


sample_indices = torch.library.custom_op("atskern::sample", mutates_args=())(_sample)


@sample_indices.register_fake
def _(attention, key, n, replace, strict=False, validate=True):
    return attention.new_empty((attention.shape[0], n, attention.dim() - 1), dtype=torch.int32)


INVALID_ROWS = (
    "atskern.sample: an attention row has NaN/inf, negative weights, no positive weight, or (strict) fewer than n "
    "(checked on the device; atskern.sample on CPU tensors names the row)"
)


def assert_valid_status(status: torch.Tensor, need: int = 1) -> None:
    """Check ``atskern.sample``'s device status on the device (``torch._assert_async``): no host round trip;
    a bad row (or, with ``need = n``, a row with fewer than ``n`` positive weights) raises at the next
    synchronization with :data:`INVALID_ROWS`."""
    summary = status[-1]
    ok = (summary[0] == 0) & (summary[1] == 0) & (summary[2] >= need)
    torch._assert_async(ok, INVALID_ROWS)


# --- patches --------------------------------------------------------------------------------


def _patch_shape(x_shape, count: int, patch_size, channels_first: bool):
    if channels_first:
        return (x_shape[0], count, x_shape[1], *patch_size)
    return (x_shape[0], count, *patch_size, x_shape[-1])


def _image_shape(grad_shape, spatial_shape, channels_first: bool):
    b, c = grad_shape[0], (grad_shape[2] if channels_first else grad_shape[-1])
    return (b, c, *spatial_shape) if channels_first else (b, *spatial_shape, c)


def _fill_for(dtype: torch.dtype, fill):
    """``fill`` for the kernel: an int stays an int (exact); an integral float becomes one for integer dtypes."""
    if dtype.is_floating_point or dtype.is_complex or isinstance(fill, int):
        return fill
    return int(fill) if math.isfinite(fill) and float(fill).is_integer() else fill


def _kernel_fill(x: torch.Tensor, moved: torch.Tensor, fill):
    """``fill`` in the dtype the kernel sees (the bit pattern of a bfloat16 ``fill`` as int16)."""
    if moved is x:
        return _fill_for(x.dtype, fill)
    return int(torch.tensor(fill, dtype=x.dtype).view(moved.dtype).item())


def _output(shape, like: torch.Tensor, what: str) -> torch.Tensor:
    """An empty tensor of ``like``'s dtype and device (torch owns the memory: its caching allocator on CUDA), or,
    as atskern says it, a ValueError naming ``what`` sized it where it cannot be allocated."""
    try:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    except (RuntimeError, MemoryError) as error:
        if not isinstance(error, (torch.OutOfMemoryError, MemoryError)) and not any(
                words in str(error) for words in ("allocate", "overflow")):
            raise  # another RuntimeError (a CUDA error an earlier launch left) keeps its own message
        raise too_large(shape, like.element_size(), like.dtype, what, error) from None


def _extract(x: torch.Tensor, offsets: torch.Tensor, patch_size: list[int], fill: int | float | bool,
            channels_first: bool) -> torch.Tensor:
    """``atskern.extract_patches`` on a tensor (bytes moved as-is, so any dtype of size 1, 2, 4 or 8)."""
    out = _output(_patch_shape(tuple(x.shape), offsets.shape[1], patch_size, channels_first), x,
                  "x's batch, the offsets and patch_size")
    moved = byte_twin(x)
    with kernel_stream(x.device):
        _kernel("extract_patches")(
            to_kernel(moved, strided=True),
            to_kernel(offsets),
            tuple(patch_size),
            fill=_kernel_fill(x, moved, fill),
            channels_first=channels_first,
            out=to_kernel(byte_twin(out)),
        )
    return out


extract = torch.library.custom_op("atskern::extract_patches", mutates_args=())(_extract)


@extract.register_fake
def _(x, offsets, patch_size, fill, channels_first):
    return x.new_empty(_patch_shape(tuple(x.shape), offsets.shape[1], patch_size, channels_first))


_SCATTER_DTYPES = (torch.float32, torch.float64)


def _scatter(grad: torch.Tensor, offsets: torch.Tensor, spatial_shape: list[int], channels_first: bool) -> torch.Tensor:
    """``atskern.scatter_patches`` (the adjoint of :func:`extract`), float32 or float64."""
    out = torch.empty(_image_shape(tuple(grad.shape), spatial_shape, channels_first), dtype=grad.dtype, device=grad.device)
    with kernel_stream(grad.device):
        _kernel("scatter_patches")(
            to_kernel(grad), to_kernel(offsets), tuple(spatial_shape), channels_first=channels_first, out=to_kernel(out)
        )
    return out


scatter = torch.library.custom_op("atskern::scatter_patches", mutates_args=())(_scatter)


@scatter.register_fake
def _(grad, offsets, spatial_shape, channels_first):
    return grad.new_empty(_image_shape(tuple(grad.shape), spatial_shape, channels_first))


def scatter_as(grad: torch.Tensor, offsets: torch.Tensor, spatial_shape, channels_first: bool, dtype,
               op=None) -> torch.Tensor:
    """Scatter ``grad`` (accumulating in float32 unless float64) and return it in ``dtype``; ``op`` the scatter to
    call (default the custom op)."""
    if grad.dtype not in _SCATTER_DTYPES:
        grad = grad.to(torch.float32)
    return (op or scatter)(grad.contiguous(), offsets, list(spatial_shape), channels_first).to(dtype)


def _spatial(shape, channels_first: bool):
    return list(shape[2:]) if channels_first else list(shape[1:-1])


def _extract_setup(ctx, inputs, output):
    x, offsets, patch_size, _fill, channels_first = inputs
    ctx.save_for_backward(offsets)
    ctx.spatial = _spatial(x.shape, channels_first)
    ctx.channels_first = channels_first
    ctx.dtype = x.dtype


def _extract_backward(ctx, grad, scatter_op=None):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    (offsets,) = ctx.saved_tensors
    return scatter_as(grad, offsets, ctx.spatial, ctx.channels_first, ctx.dtype, scatter_op), None, None, None, None


extract.register_autograd(_extract_backward, setup_context=_extract_setup)


def _scatter_setup(ctx, inputs, output):
    grad, offsets, _spatial_shape, channels_first = inputs
    ctx.save_for_backward(offsets)
    ctx.patch = _spatial(grad.shape[1:], channels_first)
    ctx.channels_first = channels_first


def _scatter_backward(ctx, upstream, extract_op=None):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    (offsets,) = ctx.saved_tensors
    return (extract_op or extract)(upstream.contiguous(), offsets, ctx.patch, 0.0, ctx.channels_first), None, None, None


scatter.register_autograd(_scatter_backward, setup_context=_scatter_setup)


# --- eager calls ------------------------------------------------------------------------------
# A torch.library custom op costs 0.4-0.7 ms of host time per eager call (its dispatch, measured on an H200
# machine with torch 2.11), ten times the kernels' own host time. Outside torch.compile the same implementations
# and gradients run through plain autograd Functions; under torch.compile the custom ops are what gets traced.


class _EagerExtract(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, offsets, patch_size, fill, channels_first):
        out = _extract(x, offsets, patch_size, fill, channels_first)
        _extract_setup(ctx, (x, offsets, patch_size, fill, channels_first), out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _extract_backward(ctx, grad, _EagerScatter.apply)


class _EagerScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, offsets, spatial_shape, channels_first):
        out = _scatter(grad, offsets, spatial_shape, channels_first)
        _scatter_setup(ctx, (grad, offsets, spatial_shape, channels_first), out)
        return out

    @staticmethod
    def backward(ctx, upstream):
        return _scatter_backward(ctx, upstream, _EagerExtract.apply)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _traced(*tensors) -> bool:
    """Whether the call is being traced rather than run: torch.compile, torch.jit.trace (a direct call's draw would
    become a constant of the trace), or tensors that hold no data (the meta device Keras builds models on, fake or
    functional tensor subclasses): then only the custom ops will do."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or any(type(t) not in _PLAIN or t.device.type == "meta" for t in tensors))


def _refuse_transforms(what: str, *tensors) -> None:
    """A NotImplementedError naming ``what`` where a tensor is wrapped by a ``torch.func`` transform (its wrapper
    holds no data the kernels could read)."""
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        raise NotImplementedError(
            f"ats.torch's {what} does not run under torch.func transforms (grad, vmap, jacrev, jvp): use "
            "torch.autograd (loss.backward(), torch.autograd.grad), or transform only what follows the patches "
            "(expectation supports vmap and grad)")


def sample_patches_indices(attention, key, n, replace, strict=False, validate=True):
    """:func:`sample_indices`: the custom op when traced, a direct call otherwise."""
    if _traced(attention, key):
        return sample_indices(attention, key, n, replace, strict, validate)
    _refuse_transforms("sample", attention, key)
    return _sample(attention, key, n, replace, strict, validate)


def extract_patches(x, offsets, patch_size, fill, channels_first):
    """:func:`extract` with its gradients: the custom op when traced, an autograd Function otherwise."""
    if _traced(x, offsets):
        return extract(x, offsets, patch_size, fill, channels_first)
    _refuse_transforms("extract_patches", x, offsets)
    return _EagerExtract.apply(x, offsets, patch_size, fill, channels_first)
