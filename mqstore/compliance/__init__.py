"""Compliance: immutability (retention modes, legal holds), the compliance clock, the audit log."""
