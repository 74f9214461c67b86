"""The ``brainiac`` command line."""
