"""`python -m edgezo.cli` (what `torchrun ... -m edgezo.cli finetune` runs)."""

from .main import main

main()
