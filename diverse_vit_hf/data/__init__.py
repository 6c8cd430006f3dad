"""Image data: embedded and Hub datasets in one form (`image_datasets`), single-image decoding (`images`),
processor-derived transforms (`transforms`), DeiT's augmentation (`augmentation`), repeated-augmentation sampling
(`sampling`) and per-sample seeds for exact resume (`sample_seeding`). Imports only `utils`."""
