"""Training objectives as pure functions: SREM's losses and readings, NCR's, the GMMs."""
