"""The SGRAF retrieval network (SGR and SAF heads)."""
