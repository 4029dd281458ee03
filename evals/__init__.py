"""Evaluation: measuring speed-ups and output equality (`selfspec eval`)."""
