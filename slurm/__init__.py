"""The sbatch templates, installed as package data of ``lit_score.sbatch`` (see lit_score/cli/resources.py)."""
