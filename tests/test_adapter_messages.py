"""Clear errors naming the argument, in the adapters' own terms (issue 11, item 10)."""

from __future__ import annotations

import numpy as np
import pytest

import atskern


def test_scatter_multiscale_names_grads():
    samples = np.zeros((1, 2, 2), np.int32)
    with pytest.raises(TypeError, match=r"grads\[0\] must be float32 or float64"):
        atskern.scatter_multiscale([np.zeros((1, 2, 3, 3, 1), np.int32)], samples, (4, 4), [(8, 8)], [3])
    with pytest.raises(ValueError, match=r"samples has batch size 1 but the grads have batch size 2"):
        atskern.scatter_multiscale([np.zeros((2, 2, 3, 3, 1))], samples, (4, 4), [(8, 8)], [3])
    with pytest.raises(ValueError, match=r"samples has batch size 1 but the levels have batch size 2"):
        atskern.extract_multiscale([np.zeros((2, 8, 8, 1))], samples, (4, 4), [3])
    with pytest.raises(TypeError, match=r"levels\[1\] must have a numeric dtype"):
        atskern.extract_multiscale([np.zeros((1, 8, 8, 1)), np.zeros((1, 8, 8, 1), object)], samples, (4, 4), [3, 3])


class TestTorch:
    torch = pytest.importorskip("torch")

    def test_logits_hint_names_use_logits(self):
        from ats.torch import functional as F

        with pytest.raises(ValueError, match=r"negative weights.*pass use_logits=True to SamplePatches") as info:
            F.sample(self.torch.tensor([[1.0, -1.0, 2.0]]), 1)
        assert "logits=True" not in str(info.value).replace("use_logits=True", "")

    def test_batch_zero_is_a_value_error(self):
        import ats.torch as at
        from ats.torch import functional as F

        torch = self.torch
        with pytest.raises(ValueError, match=r"attention must not be empty .*got shape \(0, 5\)"):
            F.sample(torch.zeros(0, 5), 2)
        with pytest.raises(ValueError, match=r"attention must not be empty .*got shape \(0, 4, 4\)"):
            at.SamplePatches(2, 2)(torch.zeros(0, 1, 4, 4), torch.zeros(0, 1, 8, 8), torch.zeros(0, 4, 4))

    def test_patch_offsets_checks_like_atskern(self):
        from ats.torch import functional as F

        torch = self.torch
        with pytest.raises(ValueError, match=r"samples must be \(batch, K, D\) .*got shape \(\)"):
            F.patch_offsets(torch.tensor(3), [5], [10], [2])
        with pytest.raises(TypeError, match=r"samples must be an integer tensor"):
            F.patch_offsets(torch.tensor([[[1.5]]]), [5], [10], [2])
        with pytest.raises(ValueError, match=r"margin must be in \[0, 0.5\), got 0.7"):
            F.patch_offsets(torch.tensor([[[1]]]), [5], [10], [2], margin=0.7)

    def test_fill_is_exact_or_refused(self):
        from ats.torch import functional as F

        torch = self.torch
        outside = torch.full((1, 1, 2), -5, dtype=torch.int64)
        x = torch.zeros(1, 1, 4, 4, dtype=torch.int64)
        assert F.extract_patches(x, outside, 2, fill=2**62 + 1).flatten()[0].item() == 2**62 + 1
        with pytest.raises(ValueError, match=r"fill=300 cannot be represented"):
            F.extract_patches(x.to(torch.uint8), outside, 2, fill=300)
        with pytest.raises(ValueError, match=r"fill=0.5 cannot be represented"):
            F.extract_patches(x, outside, 2, fill=0.5)

    def test_one_size_check(self):
        from ats.torch import functional as F

        from atskern import _validation

        assert F.size_tuple is _validation.check_patch_size

    def test_multiscale_batch_mismatch_names_samples(self):
        from ats.torch import functional as F

        torch = self.torch
        with pytest.raises(ValueError, match=r"samples and levels\[0\] must share the batch size, got 3 and 2"):
            F.extract_multiscale([torch.zeros(2, 1, 8, 8)], torch.zeros(3, 2, 2, dtype=torch.int64), (4, 4), [2])


class TestTensorFlow:
    tf = pytest.importorskip("tensorflow")

    def test_logits_hint_names_use_logits(self):
        from ats import core, ops

        tf = self.tf
        with pytest.raises(ValueError, match=r"pass use_logits=True to SamplePatches"):
            ops.sample(tf.constant([[1.0, -1.0, 2.0]]), 1)
        with pytest.raises(ValueError, match=r"pass use_logits=True to SamplePatches"):
            core.SamplePatches(2, 2)([tf.zeros((1, 4, 4, 1)), tf.zeros((1, 8, 8, 1)), -tf.ones((1, 4, 4))])

    def test_layer_names_its_inputs_not_offsets(self):
        from ats import core, ops

        tf = self.tf
        with pytest.raises(ValueError, match=r"x_low, x_high and attention must share the batch size") as info:
            core.SamplePatches(2, 2)([tf.zeros((2, 4, 4, 1)), tf.zeros((3, 8, 8, 1)), tf.ones((2, 4, 4))])
        assert "offsets" not in str(info.value)
        with pytest.raises(ValueError, match=r"samples and levels\[0\] must share the batch size") as info:
            ops.extract_multiscale([tf.zeros((2, 8, 8, 1))], tf.zeros((3, 2, 2), tf.int32), (4, 4), [(2, 2)])
        assert "offsets" not in str(info.value)

    def test_one_size_check(self):
        from ats import ops

        from atskern import _validation

        assert ops._size_tuple is _validation.check_patch_size
        with pytest.raises(ValueError, match=r"patch_size must be > 0 in every dim"):
            ops.patch_offsets(self.tf.constant([[[1]]]), [4], [8], [0])
