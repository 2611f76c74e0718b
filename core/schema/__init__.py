"""Pydantic schemas of the job file, one module per concern."""
