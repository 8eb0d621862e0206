"""The `latentbank` command line (grows with the service; see README)."""
