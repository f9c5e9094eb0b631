"""`python -m agent` runs the healthgate command line."""

from agent.cli import main

raise SystemExit(main())
