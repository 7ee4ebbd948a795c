"""`python -m gpt2repro …` (what `torchrun -m gpt2repro train …` runs)."""

from gpt2repro.cli import main

raise SystemExit(main())
