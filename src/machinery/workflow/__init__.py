"""Chains, groups and chords: sending them (``sending``), and on the worker their callbacks
(``callbacks``) and chord completion (``chords``), both built-in middleware."""

from .callbacks import Callbacks
from .chords import ChordCompletion
from .sending import send_chain, send_chord, send_group

__all__ = ["Callbacks", "ChordCompletion", "send_chain", "send_chord", "send_group"]
