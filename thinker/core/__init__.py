"""Configuration, the error tree and safe paths: the bottom layer, imported by every other."""
