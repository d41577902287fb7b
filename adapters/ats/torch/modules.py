"""``nn.Module`` versions of the 2019 Keras API: ``AttentionSampling``, ``SamplePatches``, ``Expectation``,
``SampleSoftmax``, ``MultinomialEntropy``. Channels-first images ``(B, C, *spatial)``."""

from __future__ import annotations

import torch
from torch import nn

from .. import _distributed
from .._layer_args import check_flag, check_sampling_args, check_seed
from . import functional as F


class RegularizedModel(nn.Module):
    """A model that keeps its attention regularizer's last value in ``regularization_loss`` (a tensor of the
    training graph): copies and pickles hold it detached (``copy.deepcopy`` refuses a non-leaf tensor, so
    ``AveragedModel`` and best-model copies failed after a forward)."""

    def __getstate__(self):
        state = self.__dict__.copy()
        loss = state.get("regularization_loss")
        if isinstance(loss, torch.Tensor) and loss.grad_fn is not None:
            state["regularization_loss"] = loss.detach()
        return state


class _KeyStream:
    """Sampling seeds: from torch's default generator (seed None) or a reproducible stream of a fixed seed.

    Both are salted with the process rank (:func:`ats._distributed.salted_seed`)
    when they are drawn, so that the ranks of a data-parallel job draw
    different patches even when every rank calls ``torch.manual_seed`` with
    the same value or builds its modules with the same ``seed``. Rank 0 (and a
    single-process run) keeps the unsalted keys. A fixed seed's stream on rank
    ``r > 0`` starts from a mix of the salted seed (splitmix64), not from it:
    the salt is an xor of ``r`` times the stream's step, so for seeds like 0 or
    42 the salted stream was rank 0's, ``r`` calls ahead. ``calls`` (the stream's
    position) is saved in the owning module's ``state_dict``.
    """

    def __init__(self, seed):
        self.seed = check_seed(seed)
        self.calls = 0

    @torch.compiler.disable
    def next(self) -> torch.Tensor:
        rank = _distributed.process_index()
        if torch.jit.is_tracing() and (self.seed is not None or rank != 0):
            raise RuntimeError(
                f"torch.jit.trace would record this module's sampling key (seed={self.seed}, rank {rank}) as a "
                "constant: every call of the trace would draw the same patches. Trace a module built with seed=None "
                "(its key is a traced torch.randint), or use torch.compile")
        if self.seed is None:
            key = F.random_key()
            return key if rank == 0 else F.key_tensor(_distributed.salted_seed(int(key), rank))
        # splitmix64 of (base, call number): a fresh, reproducible key per call
        base = rank_seed(self.seed, rank)
        self.calls += 1
        return F.key_tensor(_mix64((base + self.calls * _GOLDEN64) % 2**64))


_GOLDEN64 = 0x9E3779B97F4A7C15


def rank_seed(seed: int, rank: int | None = None) -> int:
    """The seed whose key stream rank ``rank`` (this process's by default) of a job draws for a module built with
    ``seed``: ``seed`` itself on rank 0, else splitmix64's finalizer of ``salted_seed(seed, rank)``. A module built
    with ``rank_seed(seed, r)`` and run alone draws what rank ``r`` draws."""
    seed = check_seed(seed)
    if seed is None:
        raise ValueError("seed must be an int in [0, 2**64), got None")
    rank = _distributed.process_index() if rank is None else int(rank)
    return seed if rank == 0 else _mix64(_distributed.salted_seed(seed, rank))


def _mix64(z: int) -> int:
    """splitmix64's finalizer: a bijection of 64-bit words that scrambles every bit."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


class KeyStreamState:
    """``state_dict`` support for a module with a key stream (``self._keys``): its position (the calls made) is
    saved, so a run resumed from a checkpoint continues the stream instead of replaying it; a checkpoint saved
    before this entry loads as before (the position left at 0)."""

    def get_extra_state(self):
        return {"key_stream_calls": self._keys.calls}

    def set_extra_state(self, state):
        self._keys.calls = int(state.get("key_stream_calls", 0)) if isinstance(state, dict) else 0

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "_extra_state"
        present = key in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not present and key in missing_keys:
            missing_keys.remove(key)


def device_key(seed=None, device="cuda") -> torch.Tensor:
    """A device key for :meth:`SamplePatches.set_device_key`, salted with this process's rank.

    A one-element int64 tensor on ``device`` holding ``salted_seed(seed)``
    (``seed`` None: a seed drawn from torch's default generator, as host keys
    are). The kernels advance it by one per draw, so rank ``r`` draws with
    ``salted_seed(seed, r), salted_seed(seed, r) + 1, ...``: rank 0 keeps
    ``seed``; for any seed, the sequences of two of the first 1024 ranks are
    more than 2**42 draws apart, so they never share a key. Call it after
    ``torch.distributed.init_process_group`` (or under ``torchrun``, which
    sets ``RANK``).
    """
    seed = check_seed(seed)
    seed = int(F.random_key()) if seed is None else seed
    key = F.key_tensor(_distributed.salted_seed(seed))
    return key.reshape(1).to(device)


class SamplePatches(KeyStreamState, nn.Module):
    """Sample positions from an attention map and extract ``x_high`` patches around them.

    ``forward(x_low, x_high, attention)`` with ``x_low`` ``(B, C, *low)`` (the
    view the attention network read), ``x_high`` ``(B, C, *high)`` and
    ``attention`` ``(B, *grid)``; returns ``(patches, sampled_attention)``,
    ``(B, n_patches, C, *patch_size)`` and ``(B, n_patches)`` (differentiable
    with respect to ``attention``; ``patches`` with respect to ``x_high``).
    ``x_high`` may also be a list of slides (paths or ``atskern.io.Slide``):
    the patches are then read from level 0 of each slide file (see
    :mod:`ats.torch.slides`).

    Arguments
    ---------
    n_patches : int
    patch_size : int or tuple, one entry per spatial dimension
    receptive_field : int
        The attention network's receptive field in ``x_low`` pixels (0 for
        ``padding="same"``): maps grid cells to ``x_high`` positions.
    replace : bool
        Sample with replacement; pass the same value to :class:`Expectation`.
    use_logits : bool
        ``attention`` holds unnormalized log-probabilities (float16 ones are normalized in float32: the sampled
        attention's gradient, ``<g, f_k> / (n a_k)`` and more, exceeds float16's range on large maps).
    mode : ``"sample"``, ``"topk"`` or ``"auto"``
        ``"topk"`` takes the most attended positions (deterministic);
        ``"auto"`` samples in training and takes the top-k in ``eval()``.
    seed : None or int in [0, 2**64)
        None: keys from torch's default generator (``torch.manual_seed``
        repeats a run). An int: a reproducible key stream of its own. In a
        multi-process job (``torch.distributed``, ``torchrun``) both are
        salted with the rank, so each rank draws its own patches; rank 0
        draws what a single process would.
    fill : number
        Value of patch pixels outside ``x_high``.
    """

    def __init__(self, n_patches, patch_size, receptive_field=0, replace=False, use_logits=False,
                 mode="sample", seed=None, fill=0):
        super().__init__()
        self.n_patches, self.receptive_field, self.fill = check_sampling_args(n_patches, mode, receptive_field, fill)
        self.patch_size = patch_size
        self.replace = check_flag(replace, "replace")
        self.use_logits = check_flag(use_logits, "use_logits")
        self.mode = mode
        self._keys = _KeyStream(seed)
        self._device_key = None
        self.validate = True

    def set_device_key(self, key: torch.Tensor | None) -> None:
        """Draw with a device key: a one-element int64 CUDA tensor that the sampling kernels read on the device
        and that each call advances by one in place, so a training step makes no host round trip and a
        ``torch.cuda.CUDAGraph`` capture of it draws fresh patches on every replay (validation then raises
        asynchronously; set ``self.validate = False`` to opt out of it). ``None`` returns to host keys.

        The key is used as given: in a multi-process job make it with :func:`device_key`, which salts its seed
        with the process rank, so that the ranks draw different patches."""
        if key is not None and not (isinstance(key, torch.Tensor) and key.device.type == "cuda"
                                    and key.dtype == torch.int64 and key.numel() == 1):
            raise TypeError(f"key must be None or a one-element int64 CUDA tensor, got {key!r}")
        self._device_key = key

    def extra_repr(self) -> str:
        return (f"n_patches={self.n_patches}, patch_size={self.patch_size}, receptive_field={self.receptive_field}, "
                f"replace={self.replace}, mode={self.mode!r}")

    def deterministic(self) -> bool:
        return self.mode == "topk" or (self.mode == "auto" and not self.training)

    def _check(self, x_low, x_high, attention):
        for name, x in (("x_low", x_low), ("x_high", x_high), ("attention", attention)):
            F.require_tensor(x, name)
        if x_high.dim() not in (3, 4, 5):
            raise ValueError(
                "x_high must be (batch, channels, *spatial) with 1 to 3 spatial dimensions (rank 3 to 5), "
                f"got shape {tuple(x_high.shape)}"
            )
        if x_low.dim() != x_high.dim():
            raise ValueError(f"x_low must have x_high's rank {x_high.dim()}, got shapes {tuple(x_low.shape)} and {tuple(x_high.shape)}")
        if attention.dim() != x_high.dim() - 1:
            raise ValueError(
                f"attention must be (batch, *grid) with rank {x_high.dim() - 1} (x_high's rank without channels; "
                f"use SampleSoftmax(squeeze_channels=True)), got shape {tuple(attention.shape)}"
            )
        if not (x_low.shape[0] == x_high.shape[0] == attention.shape[0]):
            raise ValueError(f"x_low, x_high and attention must share the batch size, got {x_low.shape[0]}, "
                             f"{x_high.shape[0]} and {attention.shape[0]}")
        dims = x_high.dim() - 2
        size = F.size_tuple(self.patch_size, dims)
        high = tuple(x_high.shape[2:])
        if any(p > h for p, h in zip(size, high)):
            raise ValueError(f"patch_size {size} is larger than x_high's spatial shape {high}")
        return size

    def forward(self, x_low, x_high, attention):
        if isinstance(x_high, (list, tuple)):  # slide files (atskern.io) as the high-resolution source
            from .slides import sample_from_slides

            return sample_from_slides(self, x_low, x_high, attention)
        size = self._check(x_low, x_high, attention)
        if self.use_logits:  # float16 logits are normalized in float32: the sampled attention's gradient overflows float16
            attention = F.sample_softmax(attention.float() if attention.dtype == torch.float16 else attention)
        deterministic = self.deterministic()
        if deterministic:
            key = None
        elif self._device_key is not None and attention.device == self._device_key.device:
            _refuse_recomputation("a device key (set_device_key)")
            key = self._device_key
        else:
            if self._keys.seed is not None:
                _refuse_recomputation(f"seed={self._keys.seed}")
            key = self._keys.next()
        indices, sampled = F.sample(attention, self.n_patches, replace=self.replace, key=key, deterministic=deterministic,
                                    validate=self.validate)
        if self.receptive_field:
            offsets = _offsets_with_margin(indices, attention.shape[1:], x_high.shape[2:], size, self.receptive_field,
                                           x_low)
        else:
            offsets = F.sampled_offsets(indices, attention.shape[1:], x_high.shape[2:], size)
        patches = F.extract_patches(x_high, offsets, size, fill=self.fill, channels_first=True)
        return patches, sampled


def _refuse_recomputation(source: str) -> None:
    """A RuntimeError where the forward runs inside a backward pass: ``torch.utils.checkpoint`` recomputing it.
    Checkpoint restores torch's generators for the recomputation, not a module's own key stream or device key,
    so the recomputed draw would take other patches and the gradient would belong to them, not to the loss."""
    graph_task = getattr(torch._C, "_current_graph_task_id", None)
    if graph_task is not None and not torch.compiler.is_compiling() and graph_task() != -1:
        raise RuntimeError(
            f"SamplePatches with {source} is being run inside a backward pass (torch.utils.checkpoint recomputing "
            "it?): the recomputation would draw other patches than the forward did, so the gradients would be wrong. "
            "Keys from seed=None come from torch's generator, which checkpoint restores; or checkpoint only the "
            "feature network")


@torch.compiler.disable
def _offsets_with_margin(indices, grid, level, size, receptive_field, x_low):
    """:func:`F.patch_offsets` with the margin ``receptive_field / 2 / low`` in each dim, exactly: run eagerly under
    ``torch.compile`` (a graph break), where dynamic shapes would make the low sizes symbolic, which the exact
    fractions cannot take."""
    low = tuple(int(s) for s in x_low.shape[2:])
    return F.sampled_offsets(indices, tuple(int(s) for s in grid), tuple(int(s) for s in level), size,
                             margin=(receptive_field, low))


class Expectation(nn.Module):
    """The ATS estimate of the expected features, with unbiased gradients (see :func:`ats.torch.functional.expectation`).

    ``forward(features, sampled_attention)``: ``(B, n, *F)`` and ``(B, n)`` to
    ``(B, *F)``. ``replace`` must match :class:`SamplePatches`.
    """

    def __init__(self, replace=False):
        super().__init__()
        self.replace = check_flag(replace, "replace")

    def extra_repr(self) -> str:
        return f"replace={self.replace}"

    def forward(self, features, sampled_attention):
        return F.expectation(features, sampled_attention, replace=self.replace)


class SampleSoftmax(nn.Module):
    """Softmax over every position of a sample (all axes but the batch).

    ``squeeze_channels=True`` drops the size-1 channels axis (axis 1), turning
    ``(B, 1, *grid)`` into the ``(B, *grid)`` map :class:`SamplePatches` takes.
    ``smooth`` in ``[0, 1)`` mixes in the uniform distribution.
    """

    def __init__(self, squeeze_channels=False, smooth=0.0):
        super().__init__()
        if not 0 <= float(smooth) < 1:
            raise ValueError(f"smooth must be in [0, 1), got {smooth}")
        self.squeeze_channels = check_flag(squeeze_channels, "squeeze_channels")
        self.smooth = float(smooth)

    def forward(self, x):
        if self.squeeze_channels and (x.dim() < 2 or x.shape[1] != 1):
            raise ValueError(f"SampleSoftmax(squeeze_channels=True) needs 1 channel (axis 1), got shape {tuple(x.shape)}")
        p = F.sample_softmax(x, smooth=self.smooth)
        return p.squeeze(1) if self.squeeze_channels else p


class MultinomialEntropy(nn.Module):
    """Entropy regularizer of an attention distribution: ``strength * sum(x log(x + eps)) / batch``.

    A positive ``strength`` rewards entropy (exploration); add the returned
    scalar to the loss.
    """

    def __init__(self, strength=1.0, eps=1e-6):
        super().__init__()
        self.strength = float(strength)
        self.eps = float(eps)

    def forward(self, x):
        return F.multinomial_entropy(x, self.strength, self.eps)


def multinomial_entropy(strength=1.0, eps=1e-6):
    """The :class:`MultinomialEntropy` regularizer (2019 name)."""
    return MultinomialEntropy(strength, eps)


class AttentionSampling(RegularizedModel):
    """An attention network and a feature network wired into an attention-sampling model.

    ``forward(x_low, x_high)`` returns ``(features, attention, patches)``:
    ``attention(x_low)`` gives the ``(B, *grid)`` map, :class:`SamplePatches`
    draws ``n_patches`` patches of ``patch_size`` from ``x_high``, ``feature``
    runs on all of them as one batch of ``B * n_patches`` images
    ``(C, *patch_size)``, and :class:`Expectation` averages their features into
    ``(B, *F)``. With ``attention_regularizer`` (e.g. :class:`MultinomialEntropy`)
    its value on the map is kept in ``self.regularization_loss`` after each
    forward (add it to the loss). ``patch_size=None`` uses ``x_low``'s spatial
    shape. ``mode``/``seed``/``fill`` as in :class:`SamplePatches`.
    """

    def __init__(self, attention, feature, patch_size=None, n_patches=10, replace=False,
                 attention_regularizer=None, receptive_field=0, *, mode="sample", seed=None, fill=0):
        super().__init__()
        self.attention = attention
        self.feature = feature
        self.attention_regularizer = attention_regularizer
        self.patch_size = patch_size
        self.sample_patches = SamplePatches(n_patches, 1 if patch_size is None else patch_size, receptive_field,
                                            replace, mode=mode, seed=seed, fill=fill)
        self.expectation = Expectation(replace)
        self.regularization_loss = None

    def forward(self, x_low, x_high):
        if self.patch_size is None:
            self.sample_patches.patch_size = tuple(x_low.shape[2:])
        attention = self.attention(x_low)
        if self.attention_regularizer is not None:
            self.regularization_loss = self.attention_regularizer(attention)
        patches, sampled = self.sample_patches(x_low, x_high, attention)
        batch, n = patches.shape[:2]
        per_patch = self.feature(patches.flatten(0, 1))
        features = self.expectation(per_patch.unflatten(0, (batch, n)), sampled)
        return features, attention, patches
