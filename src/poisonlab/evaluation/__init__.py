"""Evaluation protocols: techniques in, measured numbers out."""
