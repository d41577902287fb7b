"""Train a small Keras attention-sampling model with ``tf.distribute.MultiWorkerMirroredStrategy``.

Each worker is one process; ``TF_CONFIG`` tells it the cluster and its own
place in it. Two workers on this machine (run each line in its own shell)::

    TF_CONFIG='{"cluster": {"worker": ["localhost:12345", "localhost:12346"]}, "task": {"type": "worker", "index": 0}}' \\
        KERAS_BACKEND=tensorflow python -m examples.distributed.keras_mwms
    TF_CONFIG='{"cluster": {"worker": ["localhost:12345", "localhost:12346"]}, "task": {"type": "worker", "index": 1}}' \\
        KERAS_BACKEND=tensorflow python -m examples.distributed.keras_mwms

The model is built with ``ats.core.attention_sampling`` and a fixed
``seed``; every worker mixes its index into that seed
(``ats._distributed.salted_seed``, the index read from ``TF_CONFIG``), so the
workers draw different patches from the same image while the strategy's
all-reduce keeps their weights identical. ``--record DIR`` writes what the
tests compare: the patches drawn from one fixed batch before and after
training and the final weights (``worker<i>.npz``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

SIDE = 64  # x_high is SIDE x SIDE, x_low a quarter of that a side
PATCH = 8


def toy_data(n: int, seed: int = 0):
    """Noise images ``(n, SIDE, SIDE, 1)`` with one 8x8 block holding a 2-pixel bar; the label is the bar's
    orientation (0 horizontal, 1 vertical), which the 4x lower resolution view cannot show: only patches can."""
    rng = np.random.default_rng(seed)
    x = (rng.uniform(size=(n, SIDE, SIDE, 1)) * 0.1).astype("float32")
    labels = rng.integers(0, 2, n)
    for i, label in enumerate(labels):
        row, col = rng.integers(0, (SIDE - PATCH) // 4, 2) * 4
        block = x[i, row:row + PATCH, col:col + PATCH, 0]
        if label:
            block[:, 3:5] = 1.0
        else:
            block[3:5, :] = 1.0
    return x, labels.astype("int32")


def build(seed: int):
    """``(model, patches_model)``: the classifier and a view of the patches it samples (shared layers)."""
    import keras
    from keras import layers

    from ats.core import attention_sampling
    from ats.utils.layers import SampleSoftmax

    x_high = keras.Input(shape=(SIDE, SIDE, 1))
    x_low = layers.AveragePooling2D(pool_size=4)(x_high)
    attention = keras.Sequential(
        [layers.Conv2D(4, 3, padding="same", activation="relu"), layers.Conv2D(1, 3, padding="same"),
         SampleSoftmax(squeeze_channels=True)]
    )
    feature = keras.Sequential([layers.Conv2D(8, 3, activation="relu"), layers.GlobalMaxPooling2D()])
    features, _, patches = attention_sampling(attention, feature, patch_size=(PATCH, PATCH), n_patches=4, seed=seed)(
        [x_low, x_high]
    )
    y = layers.Dense(2, activation="softmax")(features)
    return keras.Model(x_high, y), keras.Model(x_high, patches)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--global-batch", type=int, default=8, help="batch size summed over the workers")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--lr", type=float, default=0.03, help="learning rate")
    parser.add_argument("--seed", type=int, default=1234, help="sampling seed (each worker salts it with its index)")
    parser.add_argument("--record", type=Path, default=None, help="write worker<i>.npz here")
    args = parser.parse_args(argv)

    import tensorflow as tf

    # The strategy must exist before any other TensorFlow op runs in the process.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()

    import keras

    from ats import _distributed

    rank = _distributed.process_index()
    keras.utils.set_random_seed(0)  # identical initial weights on every worker
    x, y = toy_data(64)
    probe = x[:2]
    with strategy.scope():
        model, patches_model = build(args.seed)
        optimizer = (keras.optimizers.Adam if args.optimizer == "adam" else keras.optimizers.SGD)(args.lr)
        optimizer.build(model.trainable_variables)
    per_example = keras.losses.SparseCategoricalCrossentropy(reduction=None)

    # Keras 3's model.fit fails under MultiWorkerMirroredStrategy (keras-team/keras#20585: it reduces the
    # (x, y) batch structure across workers to build the model), so this is the strategy's own loop: each
    # worker computes its gradients, the optimizer all-reduces them (a sum; the loss is already divided by
    # the global batch) and every worker applies the same update.
    @tf.function
    def train_step(batch):
        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.nn.compute_average_loss(per_example(yb, model(xb, training=True)),
                                                  global_batch_size=args.global_batch)
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return loss, grads

        loss, grads = strategy.run(replica_step, args=batch)
        return strategy.reduce("SUM", loss, axis=None), grads

    before = np.asarray(patches_model(probe, training=True))
    data = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(args.global_batch)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    batches = iter(strategy.experimental_distribute_dataset(data.with_options(options)))
    initial = [np.asarray(w) for w in model.trainable_variables]
    losses, first_grads, after_first = [], None, None
    for step in range(args.steps):
        loss, grads = train_step(next(batches))
        losses.append(float(loss))
        if step == 0:  # this worker's own gradients (before the all-reduce) and the weights after the update
            first_grads = [np.asarray(strategy.experimental_local_results(g)[0]) for g in grads]
            after_first = [np.asarray(w) for w in model.trainable_variables]
    after = np.asarray(patches_model(probe, training=True))
    tail = max(1, len(losses) // 5)
    print(json.dumps({"worker": rank, "workers": strategy.num_replicas_in_sync, "steps": args.steps,
                      "first_loss": float(np.mean(losses[:tail])), "last_loss": float(np.mean(losses[-tail:]))}),
          flush=True)
    if args.record is not None:
        args.record.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for name, values in (("initial", initial), ("grad", first_grads), ("step1", after_first),
                             ("final", [np.asarray(w) for w in model.trainable_variables])):
            arrays.update({f"{name}_{i}": v for i, v in enumerate(values)})
        np.savez(args.record / f"worker{rank}.npz", before=before, after=after, loss=np.asarray(losses),
                 replicas=strategy.num_replicas_in_sync, lr=args.lr, **arrays)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
