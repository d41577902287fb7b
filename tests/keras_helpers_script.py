"""Run in a fresh process per Keras backend by tests/test_keras_helpers_backends.py.

``python -m tests.keras_helpers_script OUT.json MODEL_DIR`` (``KERAS_BACKEND``
set) runs every check of the 2019 helpers on that backend and writes the
results as JSON: output values (compared in the parent with NumPy and across
backends), seed behaviour, errors, save/load. The TensorFlow run also saves
``MODEL_DIR/helpers.keras``, which the other backends load.

:func:`inputs` is NumPy only, so the parent imports it for its references.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def inputs() -> dict:
    rng = np.random.default_rng(20191)
    p = rng.uniform(0.05, 1, size=(3, 4)).astype(np.float32)
    att = rng.uniform(0.1, 1, size=(3, 5, 6)).astype(np.float32)
    return {
        "softmax_x": rng.normal(size=(2, 4, 5, 1)).astype(np.float32),
        "l2_x": np.concatenate([rng.normal(size=(2, 4)), np.zeros((1, 4))]).astype(np.float32),
        "reshape_x": rng.normal(size=(2, 3, 4)).astype(np.float32),
        "entropy_p": p / p.sum(axis=1, keepdims=True),
        "resize_x": rng.uniform(size=(2, 6, 8, 2)).astype(np.float32),
        "linear_x": rng.uniform(size=(6, 5, 7, 2)).astype(np.float32),
        "pan_x": rng.uniform(0.5, 1, size=(6, 9, 9, 1)).astype(np.float32),
        "attention": att / att.sum(axis=(1, 2), keepdims=True),
        "features": rng.normal(size=(3, 4, 2)).astype(np.float32),
        "weights": rng.uniform(0.1, 0.5, size=(3, 4)).astype(np.float32),
        "upstream": rng.normal(size=(3, 2)).astype(np.float32),
        "level_samples": rng.integers(0, 5, size=(2, 3, 2)).astype(np.int32),
        "level_offsets": rng.integers(0, 4, size=(2, 3, 2)).astype(np.float32) / 2,
        "level_x": rng.uniform(size=(2, 40, 30, 3)).astype(np.float32),
        "model_x": rng.uniform(size=(2, 32, 32, 1)).astype(np.float32),
    }


# level_offsets case: sample space, previous patch, patch, level shapes (odd sizes: .5 ties occur)
LEVEL = dict(sample_space=[5, 5], previous_patch_size=[9, 7], patch_size=[6, 5], shape_from=[10, 8], shape_to=[40, 30])
SEED = 11


def _np(x):
    import keras

    return np.asarray(keras.ops.convert_to_numpy(x))


def _error(make):
    try:
        make()
    except Exception as error:  # noqa: BLE001 - the parent checks the type and message
        return [type(error).__name__, str(error)]
    return None


def _grad(fn, *args):
    """Gradients of ``sum(fn(*args) * upstream)`` with respect to ``args`` (the backend's autodiff)."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tensors = [tf.convert_to_tensor(a) for a in args]
        with tf.GradientTape() as tape:
            tape.watch(tensors)
            out = fn(*tensors)
        return [g.numpy() for g in tape.gradient(out, tensors)]
    if backend == "torch":
        import torch

        tensors = [torch.tensor(a, requires_grad=True) for a in args]
        fn(*tensors).backward()
        return [t.grad.numpy() for t in tensors]
    import jax

    return [np.asarray(g) for g in jax.grad(lambda *a: fn(*a), argnums=tuple(range(len(args))))(*args)]


def _layers(data, out):
    import keras
    from keras import ops

    from ats.utils.layers import ActivityRegularizer, L2Normalize, ResizeImages, SampleSoftmax, TotalReshape
    from ats.utils.regularizers import MultinomialEntropy, multinomial_entropy

    out["softmax"] = _np(SampleSoftmax(squeeze_channels=True, smooth=0.1)(data["softmax_x"])).tolist()
    out["l2"] = _np(L2Normalize()(data["l2_x"])).tolist()
    out["reshape"] = _np(TotalReshape((-1, 4))(data["reshape_x"])).tolist()
    out["entropy"] = float(_np(MultinomialEntropy(0.5)(data["entropy_p"])))
    layer = ActivityRegularizer(multinomial_entropy(0.5))
    same = _np(layer(data["entropy_p"]))
    out["activity"] = [bool(np.array_equal(same, data["entropy_p"])), [float(_np(v)) for v in layer.losses]]
    out["resize_bilinear"] = _np(ResizeImages((4, 5))(data["resize_x"])).tolist()
    out["resize_nearest"] = _np(ResizeImages((4, 5), mode="nearest")(data["resize_x"])).tolist()
    out["softmax_grad_finite"] = bool(
        np.isfinite(_grad(lambda x: ops.sum(SampleSoftmax(smooth=0.1)(x) ** 2), data["softmax_x"])[0]).all()
    )
    from ats import utils

    x = data["reshape_x"]
    out["casts"] = [
        str(_np(utils.to_float16(x)).dtype), str(_np(utils.to_dtype(x, "int", 8, sign=False)).dtype),
        str(_np(utils.to_tensor([1, 2])).dtype), str(_np(utils.to_tensor([1, 2], "float64")).dtype),
        list(_np(utils.expand_many(x, [0, -1])).shape), _error(lambda: utils.to_dtype(x, "float", 8)),
    ]
    keras.backend.clear_session()


def _augmentations(data, out):
    from ats.utils.layers import ImageLinearTransform, ImagePan

    x, pan_x = data["linear_x"], data["pan_x"]
    kwargs = dict(a=(0.5, 1.5), b=(-0.2, 0.2))
    seeded = ImageLinearTransform(p=0.5, seed=3, **kwargs)
    first, second = _np(seeded(x, training=True)), _np(seeded(x, training=True))
    again = _np(ImageLinearTransform(p=0.5, seed=3, **kwargs)(x, training=True))
    fresh = [_np(ImageLinearTransform(p=1, **kwargs)(x, training=True)) for _ in range(2)]
    out["linear"] = first.tolist()
    out["linear_seed"] = {
        "same_seed_same_output": bool(np.array_equal(first, again)),
        "second_call_differs": not np.array_equal(first, second),
        "unseeded_differ": not np.array_equal(*fresh),
        "inference_identity": bool(np.array_equal(_np(seeded(x)), x)),
    }
    out["linear_fixed"] = _np(ImageLinearTransform(a=(0.75, 0.75), b=(0.125, 0.125), p=1)(x, training=True)).tolist()
    both = ImagePan(pixels=3, p=1, horizontally=True, vertically=True, seed=4)
    first, second = _np(both(pan_x, training=True)), _np(both(pan_x, training=True))
    again = _np(ImagePan(pixels=3, p=1, horizontally=True, vertically=True, seed=4)(pan_x, training=True))
    fresh = [_np(ImagePan(pixels=3, p=1, vertically=True)(pan_x, training=True)) for _ in range(2)]
    out["pan"] = first.tolist()
    out["pan_horizontal"] = _np(ImagePan(pixels=3, p=1, seed=5)(pan_x, training=True)).tolist()
    out["pan_half"] = _np(ImagePan(pixels=3, p=0.5, horizontally=False, vertically=True, seed=6)(pan_x, training=True)).tolist()
    out["pan_seed"] = {
        "same_seed_same_output": bool(np.array_equal(first, again)),
        "second_call_differs": not np.array_equal(first, second),
        "unseeded_differ": not np.array_equal(*fresh),
        "inference_identity": bool(np.array_equal(_np(both(pan_x)), pan_x)),
    }


def _errors(out):
    from ats.core.sampling import sample
    from ats.utils.layers import ImageLinearTransform, ImagePan, L2Normalize, ResizeImages, SampleSoftmax, TotalReshape
    from ats.utils.regularizers import MultinomialEntropy
    from ats.utils.training import Batcher

    cases = {
        "smooth": lambda: SampleSoftmax(smooth=1.5),
        "axis": lambda: L2Normalize(axis="last"),
        "shape": lambda: TotalReshape((-1, -1)),
        "size": lambda: ResizeImages((0, 2)),
        "mode": lambda: ResizeImages((2, 2), mode="fancy"),
        "area": lambda: ResizeImages((2, 2), mode="area"),
        "pixels": lambda: ImagePan(pixels=-1),
        "p": lambda: ImagePan(p=1.5),
        "seed": lambda: ImagePan(seed=-1),
        "pan_mode": lambda: ImagePan(mode="cubic"),
        "a": lambda: ImageLinearTransform(a=(1.2, 0.8)),
        "b": lambda: ImageLinearTransform(b="wide"),
        "strength": lambda: MultinomialEntropy(strength=float("nan")),
        "eps": lambda: MultinomialEntropy(eps=0),
        "batch_size": lambda: Batcher([(0, 0)], 0),
        "n_samples": lambda: sample(0, np.ones((1, 3), np.float32), (3,)),
    }
    out["errors"] = {name: _error(make) for name, make in cases.items()}
    from ats.data.from_tensors import level_offsets

    big = dict(sample_space=[997], previous_patch_size=[99991], patch_size=[255], shape_from=[100003],
               shape_to=[400009])  # no common divisor: the products need more than 31 bits
    out["level_overflow"] = _error(lambda: _np(level_offsets(np.zeros((1, 1, 1), np.int32), np.zeros((1, 1, 1)), **big)))


def _functions(data, out):
    from keras import ops

    from ats.data.from_tensors import FromTensors, level_offsets

    from ats.core.expectation import expected
    from ats.core.sampling import sample

    att = data["attention"]
    samples, sampled = sample(4, att, (5, 6), seed=SEED)
    replaced, _ = sample(4, att, (5, 6), replace=True, seed=SEED)
    out["sample"] = [_np(samples).tolist(), _np(sampled).tolist(), _np(replaced).tolist(), str(_np(samples).dtype)]
    logits_samples, logits_at = sample(4, np.log(att), (5, 6), use_logits=True, seed=SEED)
    # seed forms: an integer scalar tensor (negative: its two's complement), a seed above 2**32, and rank 1 of a
    # multi-process job (torchrun's RANK), which salts the seed
    seeds = [sample(4, att, (5, 6), seed=ops.convert_to_tensor(np.int32(SEED)))[0],
             sample(4, att, (5, 6), seed=ops.convert_to_tensor(np.int32(-SEED)))[0],
             sample(4, att, (5, 6), seed=2**40 + SEED)[0]]
    os.environ["RANK"] = "1"
    try:
        seeds.append(sample(4, att, (5, 6), seed=SEED)[0])
    finally:
        del os.environ["RANK"]
    out["sample_seed_forms"] = [_np(v).tolist() for v in seeds]
    out["sample_logits"] = [_np(logits_samples).tolist(), _np(logits_at).tolist()]
    probs = _np(sampled)
    f, w, g = data["features"], data["weights"], data["upstream"]
    for replace in (False, True):
        key = "replace" if replace else "noreplace"
        value = expected(probs, f, replace=replace, weights=w)
        grads = _grad(lambda a, x: ops.sum(expected(a, x, replace=replace, weights=w) * ops.convert_to_tensor(g)), probs, f)
        default = _np(expected(probs, f, replace=replace))
        out[f"expected_{key}"] = [_np(value).tolist(), grads[0].tolist(), grads[1].tolist(), default.tolist()]
    starts = level_offsets(data["level_samples"], data["level_offsets"], **LEVEL)
    out["level_offsets"] = _np(starts).tolist()
    zeros = np.zeros((2, 3, 2), np.float32)
    patches, offsets = FromTensors([data["level_x"][:, ::4, ::4], data["level_x"]], None).patches(
        data["level_samples"], zeros, [5, 5], [10, 8], [6, 5], 0, 1)
    out["from_tensors"] = [_np(patches).tolist(), _np(offsets).tolist()]
    import keras

    levels = [keras.Input((10, 8, 3)), keras.Input((40, 30, 3))]
    cells, starts = keras.Input((3, 2), dtype="int32"), keras.Input((3, 2))
    symbolic, _ = FromTensors(levels, None).patches(cells, starts, 5, [10, 8], 6, 0, 1)  # ints: every dimension
    out["symbolic_int_size"] = list(symbolic.shape)


def _model(data, out, model_dir):
    import keras
    from keras import layers as L

    from ats.core.builder import ATSBuilder
    from ats.utils import layers as U  # the 2019 path of the helper layers
    from ats.utils.regularizers import multinomial_entropy
    from ats.utils.training import Batcher

    backend = keras.backend.backend()
    keras.utils.set_random_seed(0)
    x_in = L.Input((32, 32, 1))
    x = U.ImagePan(pixels=2, vertically=True, seed=1)(U.ImageLinearTransform(seed=2)(x_in))
    x_low = U.ResizeImages((8, 8))(x)
    att = L.Conv2D(1, 3, padding="same")(x_low)
    att = U.ActivityRegularizer(multinomial_entropy(0.01))(U.SampleSoftmax(squeeze_channels=True, smooth=1e-3)(att))
    result = (ATSBuilder().from_tensors([x_low, x], None).attention(lambda t: att)
              .feature(keras.Sequential([L.Conv2D(3, 3, activation="relu"), L.GlobalMaxPooling2D()]))
              .patch_size((8, 8)).n_patches(3).get())
    y = L.Dense(2)(U.L2Normalize()(result.outputs))
    trained = keras.Model(x_in, y)
    model = keras.Model(x_in, [y, U.TotalReshape((-1, 64))(att)])
    for layer in model._flatten_layers():
        if type(layer).__name__ == "Sample":
            layer.seed = 5  # reproducible draws for the comparisons
    trained.compile("sgd", "mse", jit_compile="auto")
    state = [layer.seed_generator.state for layer in model._flatten_layers()
             if type(layer).__name__ in ("ImagePan", "ImageLinearTransform")]
    before = [_np(s).tolist() for s in state]

    class Items:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return data["model_x"][i % 2], np.float32([i, -i])

    history = trained.fit(Batcher(Items(), 2), epochs=2, verbose=0)
    out["fit"] = {
        "finite_loss": bool(np.isfinite(history.history["loss"]).all()),
        "augmentation_state_advanced": len(state) == 2 and all(_np(s).tolist() != b for s, b in zip(state, before)),
        "jit": bool(getattr(trained, "jit_compile", False)),
    }
    prediction = [_np(p) for p in model.predict(data["model_x"], verbose=0)]
    path = os.path.join(model_dir, f"helpers-{backend}.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for layer in loaded._flatten_layers():
        if type(layer).__name__ == "Sample":
            layer.seed = 5
    again = [_np(p) for p in loaded.predict(data["model_x"], verbose=0)]
    out["save_load_same"] = all(np.array_equal(a, b) for a, b in zip(prediction, again))
    out["prediction"] = [p.tolist() for p in prediction]
    configs = {}
    for layer in model._flatten_layers():
        if type(layer).__name__ in ("ImagePan", "ImageLinearTransform", "ResizeImages", "SampleSoftmax", "TotalReshape",
                                    "L2Normalize", "ActivityRegularizer", "Sample", "LevelPatches", "Expected"):
            config = layer.get_config()
            configs[type(layer).__name__] = type(layer).from_config(config).get_config() == config
    out["config_round_trip"] = configs
    if backend == "tensorflow":
        model.save(os.path.join(model_dir, "helpers.keras"))
    else:  # the model saved under TensorFlow predicts the same here
        foreign = keras.models.load_model(os.path.join(model_dir, "helpers.keras"))
        for layer in foreign._flatten_layers():
            if type(layer).__name__ == "Sample":
                layer.seed = 5
        out["tensorflow_model_prediction"] = [_np(p).tolist() for p in foreign.predict(data["model_x"], verbose=0)]


def main(path, model_dir):
    import keras

    data = inputs()
    out = {"backend": keras.backend.backend()}
    _layers(data, out)
    _augmentations(data, out)
    _errors(out)
    _functions(data, out)
    _model(data, out, model_dir)
    with open(path, "w") as handle:
        json.dump(out, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
