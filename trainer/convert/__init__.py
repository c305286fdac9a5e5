"""Checkpoints that travel: our models to OpenCLIP and timm, SLIP-reference and OpenCLIP models to ours.

One module per foreign format (`openclip.py`, `timm.py`, `slip_reference.py`), the name-by-name
layouts they share (`layout.py`), the accounting that maps or drops every key (`mapping.py`), safe
file reading (`files.py`), our checkpoint file for a converted model (`converted.py`) and a new
run's initialisation from any of them (`initialise.py`). The command line is
tools/convert_checkpoint.py; docs/CONVERT.md explains what exports where.
"""
from trainer.convert.converted import Converted, tower_differences
from trainer.convert.files import load_pickle
from trainer.convert.initialise import init_from, read_any
from trainer.convert.mapping import ConversionError
from trainer.convert.openclip import export_openclip, known_models, read_openclip
from trainer.convert.slip_reference import read_slip_reference
from trainer.convert.timm import ImageTower, export_timm, read_timm

__all__ = ["ConversionError", "Converted", "ImageTower", "export_openclip", "export_timm", "init_from",
           "known_models", "load_pickle", "read_any", "read_openclip", "read_slip_reference", "read_timm",
           "tower_differences"]
