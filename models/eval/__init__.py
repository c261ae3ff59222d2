"""Evaluation of text-to-image models on the captioned-shapes grammar (models/train/data_shapes.py).

`prompts` parses captions into what they ask for, `judge` checks an image against that, `features`
holds our own Fréchet-distance feature network, and `evaluate` ties them to a pipeline.
"""
