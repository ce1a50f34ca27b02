"""Evaluation: concepts, prompts, metrics (UA/IRA/CRA), work units, plans, variants, image quality."""
