"""Pieces that two or more problems share: schedules, seeding, devices, images, checkpoints, datasets, DDIM.

Importing anything from `common` first puts the Hugging Face libraries offline: weights come only from
paths the user gives, and no call may reach a hub. huggingface_hub reads HF_HUB_OFFLINE once, when it is
imported, and Lightning imports it early, so an already-imported copy is switched off as well."""
import os as _os
import sys as _sys

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "DISABLE_TELEMETRY"):
    _os.environ.setdefault(_name, "1")
if "huggingface_hub.constants" in _sys.modules:
    _sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
