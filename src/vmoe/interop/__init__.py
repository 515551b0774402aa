"""Interoperability: sparse upcycling of dense ViTs and official V-MoE checkpoint conversion.

``msgpack`` (optional) is imported only when official checkpoint files are read or written.
"""

from vmoe.interop.official import (
    OfficialCheckpointError,
    convert_official_checkpoint,
    flax_to_state_dict,
    load_official,
    read_official_checkpoint,
    state_dict_to_flax,
    write_official_checkpoint,
)
from vmoe.interop.upcycle import load_dense_state_dict, upcycle, upcycle_checkpoint

__all__ = [
    "OfficialCheckpointError",
    "convert_official_checkpoint",
    "flax_to_state_dict",
    "load_dense_state_dict",
    "load_official",
    "read_official_checkpoint",
    "state_dict_to_flax",
    "upcycle",
    "upcycle_checkpoint",
    "write_official_checkpoint",
]
