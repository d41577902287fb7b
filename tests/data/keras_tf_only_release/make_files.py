# Wrote auto.keras / topk.keras (and the predictions .npy) with the TensorFlow-only ats.core of commit bf6f5ec
# (KERAS_BACKEND=tensorflow, PYTHONPATH=<that checkout>:<that checkout>/adapters; python make_files.py DIR).
# The "seeded" model it also writes is not kept: seeded draws changed with ats.keras (README, migration notes).
import sys, numpy as np, keras
from keras import layers as L
from ats.core import attention_sampling
from ats.utils.layers import SampleSoftmax
from ats.utils.regularizers import multinomial_entropy
out = sys.argv[1]
for name, kw in [("auto", dict(mode="auto")), ("seeded", dict(seed=7)), ("topk", dict(deterministic=True, attention_regularizer=multinomial_entropy(0.01)))]:
    x_high = L.Input((32, 32, 1)); x_low = L.AveragePooling2D(4)(x_high)
    att = keras.Sequential([L.Conv2D(1, 3, padding="same"), SampleSoftmax(squeeze_channels=True)])
    feat = keras.Sequential([L.Conv2D(5, 3, activation="relu"), L.GlobalMaxPooling2D()])
    f, _, _ = attention_sampling(att, feat, patch_size=6, n_patches=3, **kw)([x_low, x_high])
    m = keras.Model(x_high, L.Dense(2)(f))
    x = np.random.default_rng(9).uniform(size=(3, 32, 32, 1)).astype("float32")
    m.save(f"{out}/{name}.keras"); np.save(f"{out}/{name}.npy", m.predict(x, verbose=0))
print("saved")
