"""Memory mechanisms, one file each (math in each module's docstring).

Each module registers its `model.kind` with memlm.models.lm.register_model when imported; build_model imports
only the module of the configured kind (memlm.models.lm.MEMORY_MODULES).
"""
