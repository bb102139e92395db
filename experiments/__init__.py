"""The experiment YAMLs, installed as package data of ``lit_score.experiments`` (see lit_score/cli/resources.py)."""
