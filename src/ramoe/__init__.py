"""RA-MoE."""
