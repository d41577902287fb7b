"""``patch_size=None`` in ``attention_sampling``: the feature network's input shape, as 2019's code took it."""

from __future__ import annotations

import keras


def _feature_input_shape(feature):
    """The single input shape of a built Keras model or layer, or None where it is not known."""
    if not isinstance(feature, keras.layers.Layer):
        return None
    try:
        inputs = feature.inputs  # functional and Sequential models with an Input
    except (AttributeError, ValueError):
        inputs = None
    if isinstance(inputs, (list, tuple)) and len(inputs) == 1:
        return tuple(inputs[0].shape)
    return None


def infer_patch_size(feature, x_low) -> tuple[int, ...]:
    """The patch size ``attention_sampling(patch_size=None)`` uses.

    2019's code took the feature network's input shape (without batch and
    channels); its docs promised ``x_low``'s spatial shape. Here the feature
    network's input shape wins where it is known (a Keras model built on an
    ``Input``, e.g. ``Sequential([Input(shape), ...])``), and ``x_low``'s
    spatial shape is used otherwise (a plain callable, an unbuilt model),
    where 2019 raised an error.
    """
    channels_first = keras.config.image_data_format() == "channels_first"
    shape = _feature_input_shape(feature)
    if shape is not None and len(shape) >= 3:
        spatial = shape[2:] if channels_first else shape[1:-1]
        if any(s is None for s in spatial):
            raise ValueError(f"patch_size=None: the feature network's input shape {shape} has unknown spatial sizes; pass patch_size")
        return tuple(int(s) for s in spatial)
    spatial = tuple(x_low.shape[2:] if channels_first else x_low.shape[1:-1])
    if any(s is None for s in spatial):
        raise ValueError(
            "patch_size=None needs the feature network's input shape (a Keras model built on an Input) "
            f"or x_low's spatial shape to be static, got x_low {tuple(x_low.shape)}; pass patch_size"
        )
    return spatial
