"""Checkpoint conversion: any committed step to any world size and strategy, and to and from
Hugging Face. See neutral.py for the shape every format is read into and written from.
"""
