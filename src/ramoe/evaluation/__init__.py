"""Evaluation of model outputs: answer extraction and scoring."""
