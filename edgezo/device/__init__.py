"""The machine a run computes on: its profile (the memory budget), what its CPU does fast,
and how many threads it may take."""
