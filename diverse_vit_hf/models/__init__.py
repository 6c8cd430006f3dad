"""The diversified classifiers of the supported families (`modeling`), where each family keeps its blocks and
projections (`families`), and the named DeiT configurations (`presets`). Imports `utils` and `losses`."""
