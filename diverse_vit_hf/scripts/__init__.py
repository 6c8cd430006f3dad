"""What only the example scripts and the `diverse-vit` command use: argument dataclasses (`arguments`), building the
classifier (`model_builder`), dataset splits (`splits`), the DeiT recipe's derived settings (`recipe`), evaluation
metrics (`evaluation`), multi-seed study statistics (`study_statistics`) and the command line (`cli`). The top tier:
nothing in the library imports it."""
