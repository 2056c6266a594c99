"""`python -m textgen ...` runs the command line."""

from textgen.cli import main

raise SystemExit(main())
