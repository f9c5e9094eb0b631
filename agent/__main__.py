"""`python -m agent` runs the healthgate command line."""

from agent.cli.main import main

raise SystemExit(main())
