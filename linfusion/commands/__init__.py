"""Small sub-commands of the ``linfusion`` CLI that belong to no larger area."""
