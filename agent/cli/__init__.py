"""The command line: `main` parses the arguments and runs one command; `remote` asks a running agent over its
socket or HTTP, `render` draws what it answers, `oneshot` runs the checks once without an agent."""
