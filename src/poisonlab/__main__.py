"""`python -m poisonlab`: the poisonlab command."""

from poisonlab.launch import entry

entry()
