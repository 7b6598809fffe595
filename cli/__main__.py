"""`python -m edgezo.cli` (what `torchrun ... -m edgezo.cli finetune` runs)."""

from edgezo.cli.main import main

main()
