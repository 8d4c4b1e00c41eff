"""`python -m poisonlab.cli`: the poisonlab command."""

from poisonlab.cli import entry

entry()
