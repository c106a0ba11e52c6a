"""Architectures of the Phi-3 family checkpoints on the Hugging Face hub.

Each dict holds `Phi3Backbone` arguments transcribed from the checkpoint's
`config.json` (microsoft/<repo> on huggingface.co), so `from_preset(name,
load_weights=False)` builds the real architecture offline (tests/test_family.py
checks each `count_params()` against the count published with the checkpoint).
"""

from __future__ import annotations

_PHI3_MINI = {
    "vocabulary_size": 32064,
    "num_layers": 32,
    "hidden_dim": 3072,
    "intermediate_dim": 8192,
    "num_query_heads": 32,
    "num_key_value_heads": 32,
    "layer_norm_epsilon": 1e-5,
    "dropout": 0.0,
    "pretraining_sequence_length": 4096,
    "rope_max_wavelength": 10000,
}

_PHI3_MEDIUM = {
    **_PHI3_MINI,
    "hidden_dim": 5120,
    "intermediate_dim": 17920,
    "num_layers": 40,
    "num_query_heads": 40,
    "num_key_value_heads": 10,
}

# microsoft/Phi-3.5-mini-instruct: "longrope", 48 pairs (head_dim 96).
_PHI3_5_MINI_SHORT = [
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842, 1.0499999523162842,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0699999332427979, 1.0999999046325684,
    1.1099998950958252, 1.1599998474121094, 1.1599998474121094, 1.1699998378753662, 1.2899998426437378,
    1.339999794960022, 1.679999828338623, 1.7899998426437378, 1.8199998140335083, 1.8499997854232788,
    1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745, 2.0199997425079346,
    2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0799996852874756,
    2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533, 2.729999542236328,
    2.749999523162842, 2.8399994373321533,
]
_PHI3_5_MINI_LONG = [
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
    1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
    4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
    17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
    50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
    62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
    63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
    64.51000213623047, 64.52999877929688, 64.83999633789062,
]

# microsoft/Phi-4-mini-instruct: "longrope" on 96 of 128 head dimensions, 48 pairs.
_PHI4_MINI_LONG = [
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649,
    2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845,
    5.351743533, 5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158,
    11.70738129, 13.09260651, 14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105,
    25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71,
    32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
]

PHI3_MINI_4K = {**_PHI3_MINI, "max_sequence_length": 4096, "sliding_window": 2047}
PHI3_MINI_128K = {**_PHI3_MINI, "max_sequence_length": 131072, "rope_scaling_type": "su"}
PHI3_5_MINI = {
    **_PHI3_MINI,
    "max_sequence_length": 131072,
    "sliding_window": 262144,
    "rope_scaling_type": "su",
    "rope_scaling_short_factor": _PHI3_5_MINI_SHORT,
    "rope_scaling_long_factor": _PHI3_5_MINI_LONG,
}
PHI3_MEDIUM_4K = {**_PHI3_MEDIUM, "max_sequence_length": 4096, "sliding_window": 2047}
PHI4_MINI = {
    "vocabulary_size": 200064,
    "num_layers": 32,
    "hidden_dim": 3072,
    "intermediate_dim": 8192,
    "num_query_heads": 24,
    "num_key_value_heads": 8,
    "layer_norm_epsilon": 1e-5,
    "dropout": 0.0,
    "max_sequence_length": 131072,
    "pretraining_sequence_length": 4096,
    "rope_max_wavelength": 10000,
    "rope_scaling_type": "su",
    "rope_scaling_short_factor": [1.0] * 48,
    "rope_scaling_long_factor": _PHI4_MINI_LONG,
    "sliding_window": 262144,
    "partial_rotary_factor": 0.75,
    "tie_word_embeddings": True,
}
PHI4 = {
    "vocabulary_size": 100352,
    "num_layers": 40,
    "hidden_dim": 5120,
    "intermediate_dim": 17920,
    "num_query_heads": 40,
    "num_key_value_heads": 10,
    "layer_norm_epsilon": 1e-5,
    "dropout": 0.0,
    "max_sequence_length": 16384,
    "pretraining_sequence_length": 16384,
    "rope_max_wavelength": 250000,
}
