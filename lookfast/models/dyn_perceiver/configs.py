"""The official constructor names: name -> (cnn_arch, num_latents), and the README's per-family depth_factor."""
from __future__ import annotations

_REGNET = {"reg400m": "regnet_y_400mf", "reg800m": "regnet_y_800mf", "reg1x6g": "regnet_y_1_6gf",
           "reg3x2g": "regnet_y_3_2gf"}
_REGNET_TOKENS = {"reg400m": (32, 64, 128, 256, 512), "reg800m": (32, 64, 128, 256, 512),
                  "reg1x6g": (128, 256, 512), "reg3x2g": (128, 256, 512)}
_RESNET_TOKENS = {"resnet18": (128, 256, 512), "resnet34": (128, 256, 512), "resnet50": (64, 128, 256, 512),
                  "resnet50_050": (64, 128, 256), "resnet50_0375": (64, 128, 256),
                  "resnet50_0625": (128, 160, 192, 256), "resnet50_075": (128, 256)}
_MOBILENET = {"mobilenetV3": "mobilenet_v3_large", "mobilenetV3_0x5": "mobilenet_v3_large_0x5",
              "mobilenetV3_0x75": "mobilenet_v3_large_0x75", "mobilenetV3_1x25": "mobilenet_v3_large_1x25",
              "mobilenetV3_1x5": "mobilenet_v3_large_1x5", "mobilenetV3_2x0": "mobilenet_v3_large_2x0"}

CONFIGS: dict[str, tuple[str, int]] = {}
for prefix, arch in _REGNET.items():
    for t in _REGNET_TOKENS[prefix]:
        CONFIGS[f"{prefix}_perceiver_t{t}"] = (arch, t)
for arch, tokens in _RESNET_TOKENS.items():
    for t in tokens:
        CONFIGS[f"{arch}_perceiver_t{t}"] = (arch, t)
for prefix, arch in _MOBILENET.items():
    for t in (128, 256, 512):
        CONFIGS[f"{prefix}_perceiver_t{t}"] = (arch, t)

# depth_factor of the README training commands, per backbone family (released checkpoints use these).
DEPTH_FACTOR = {"regnet": [1, 1, 1, 2], "resnet": [1, 1, 1, 1], "mobilenet": [1, 1, 1, 3]}

RELEASED = ("reg800m_perceiver_t128", "resnet50_0375_perceiver_t128", "mobilenetV3_0x75_perceiver_t128")

