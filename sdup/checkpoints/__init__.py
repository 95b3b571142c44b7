"""Checkpoint formats -> sdup modules. One module per key layout: ``ldm`` (original single files),
``diffusers`` (folders), ``hf_clip`` (text encoders), ``kdiffusion`` (x2 original); ``keymap`` is the
shared engine, ``detect`` names the family from key shapes, ``loader`` ties it together."""
from .detect import Detection, detect
from .io import CheckpointError, read_shapes, read_state_dict
from .keymap import KeyMap, KeyMismatch
from .loader import LoadedModel, load, save_sdup
