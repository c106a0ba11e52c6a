"""keras-hub's own backbone test helpers, run on phi3lab's `Phi3Backbone`.

Not collected by pytest: `tests/test_keras_hub_suite.py` runs this file as a
script in a subprocess whose `PYTHONPATH` adds the side folder holding
TensorFlow and grain (which keras-hub's `TestCase` imports), so they never
reach the main test process. The constructor arguments and inputs are those
of keras-hub's Phi-3 backbone test (`keras_hub/src/models/phi3/`): a
4-over-2-head model, and a 2-over-1-head model with "su" rotary factors.
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "jax"

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras_hub.src.tests import test_case  # noqa: E402

from phi3lab import Phi3Backbone  # noqa: E402

PLAIN = dict(
    vocabulary_size=10, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=8, intermediate_dim=8
)
SU_ROTARY = dict(
    vocabulary_size=10,
    num_layers=2,
    num_query_heads=2,
    num_key_value_heads=1,
    hidden_dim=8,
    intermediate_dim=12,
    max_sequence_length=10,
    pretraining_sequence_length=5,
    rope_scaling_type="su",
    rope_scaling_short_factor=[1.2, 1.4],
    rope_scaling_long_factor=[0.8, 0.6],
)


def int8_kernels(default="float32"):
    """keras' DTypePolicyMap that gives phi3lab's kernel layers int8."""
    int8 = keras.dtype_policies.get(f"int8_from_{default}")
    return keras.dtype_policies.DTypePolicyMap(default, {"decoder/attention": int8, "decoder/mlp": int8})


class Phi3BackboneKerasHubCases(test_case.TestCase):
    def setUp(self):
        self.inputs = {
            "token_ids": keras.ops.ones((2, 5), dtype="int32"),
            "padding_mask": keras.ops.ones((2, 5), dtype="int32"),
        }

    def test_side_folder_does_not_shadow_the_venv(self):
        suite = os.path.realpath(os.environ["PHI3LAB_KERAS_HUB_SUITE"])
        import jax

        for module in (np, jax, keras):
            self.assertFalse(os.path.realpath(module.__file__).startswith(suite), module.__file__)

    def test_backbone_basics(self):
        # Config and serialization round trips, eager, variable-length and
        # compiled calls, tf.data predict, three mixed-precision policies and
        # keras-hub's int8 / float8 DTypePolicyMap check.
        self.run_backbone_test(Phi3Backbone, PLAIN, self.inputs, expected_output_shape=(2, 5, 8))

    def test_backbone_basics_with_su_rotary(self):
        self.run_backbone_test(Phi3Backbone, SU_ROTARY, self.inputs, expected_output_shape=(2, 5, 8))

    def test_saved_model(self):
        self.run_model_saving_test(Phi3Backbone, PLAIN, self.inputs)

    def test_saved_model_with_su_rotary(self):
        self.run_model_saving_test(Phi3Backbone, SU_ROTARY, self.inputs)

    def test_int8_policy_map_serializes_and_saves(self):
        # keras-hub's helpers on a model quantized through its dtype: the
        # kernel layers report int8; config and .keras file round-trip with
        # equal outputs, as they do for model.quantize("int8").
        kwargs = {**SU_ROTARY, "dtype": int8_kernels()}
        model = Phi3Backbone(**kwargs)
        self.assertEqual(model.decoder.mlp.quantization_mode, "int8")
        self.run_serialization_test(model)
        self.run_model_saving_test(Phi3Backbone, kwargs, self.inputs)
        quantized = Phi3Backbone(**SU_ROTARY)
        quantized.quantize("int8")
        self.assertEqual(quantized.get_config()["dtype"], model.get_config()["dtype"])


if __name__ == "__main__":
    import unittest

    cases = unittest.TestLoader().loadTestsFromTestCase(Phi3BackboneKerasHubCases)
    sys.exit(not unittest.TextTestRunner(verbosity=2).run(cases).wasSuccessful())
